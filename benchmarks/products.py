"""The matrix products a step makes, recorded under a dispatch mode: operators, operand layouts, FLOPs.

Used by benchmarks/profile_step.py (which counts each part's FLOPs from the
products made inside it). Products: `mm`, `addmm`, `bmm`, `baddbmm` (their in-place and
out= forms), PyTorch's CPU flash-attention kernel, whose FLOPs are its q.k
and p.v products, and our native window kernel's operators (forward: q.k and
p.v; backward: q.k, dO.v, dS.k, dS^T.q and P^T.dO), which include their softmax
as the flash kernel does (and, read through indices, their gathers and masks).
"""

from __future__ import annotations

import collections
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reformer.attention.window_kernel  # noqa: F401  (registers torch.ops.reformer.window_*)

aten = torch.ops.aten
PRODUCTS = {aten.mm.default: "mm", aten.mm.out: "mm", aten.addmm.default: "addmm", aten.addmm.out: "addmm",
            aten.addmm_.default: "addmm", aten.bmm.default: "bmm", aten.bmm.out: "bmm",
            aten.baddbmm.default: "baddbmm", aten.baddbmm.out: "baddbmm", aten.baddbmm_.default: "baddbmm",
            aten._scaled_dot_product_flash_attention_for_cpu.default: "flash attention",
            torch.ops.reformer.window_block_forward.default: "window kernel, forward",
            torch.ops.reformer.window_block_backward.default: "window kernel, backward",
            torch.ops.reformer.window_gathered_forward.default: "window kernel, forward",
            torch.ops.reformer.window_gathered_backward.default: "window kernel, backward"}
GATHERED = {torch.ops.reformer.window_gathered_forward.default, torch.ops.reformer.window_gathered_backward.default}
WINDOW_PRODUCTS = {"window kernel, forward": 2, "window kernel, backward": 5}  # (c, w, d) products per chunk


def layout(value):
    """A hashable description of an operand: ("tensor", shape, strides, dtype), or ("value", value)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype)
    return ("value", value)


def product_flops(func, args: tuple) -> int:
    """Multiply-adds x 2 of one call, from its operands' layouts."""
    shapes = [a[1] for a in args if a[0] == "tensor"]
    name = PRODUCTS[func]
    if func in GATHERED:  # q_rows (N, d), ..., q_index (G, c) 4th, ..., k_pos (G, w) 7th (k_rows may be None)
        (_, d), (g, c), (_, w) = args[0][1], args[3][1], args[6][1]
        return WINDOW_PRODUCTS[name] * 2 * g * c * w * d
    if name == "mm":
        (m, k), (_, n) = shapes[:2]
        return 2 * m * k * n
    if name == "addmm":
        (m, k), (_, n) = shapes[1:3]
        return 2 * m * k * n
    if name == "bmm":
        (b, m, k), (_, _, n) = shapes[:2]
        return 2 * b * m * k * n
    if name == "baddbmm":
        (b, m, k), (_, _, n) = shapes[1:3]
        return 2 * b * m * k * n
    if name in WINDOW_PRODUCTS:  # q (G, c, d) is the first tensor of the forward, the second of the backward
        g, c, d = shapes[0] if name == "window kernel, forward" else shapes[1]
        w = shapes[-1][-1]  # mask (G, c, w), the last tensor
        return WINDOW_PRODUCTS[name] * 2 * g * c * w * d
    q, k = shapes[:2]  # flash: (B, H, Lq, d), (B, H, Lk, d): q.k and p.v
    return 4 * q[0] * q[1] * q[2] * k[2] * q[3]


class RecordProducts(TorchDispatchMode):
    """Counts every matrix-product call by (operator, operand layouts, keyword layouts); with `tag`, also adds
    each call's FLOPs to `flops_by_tag[tag()]` (the part of the model running it, say)."""

    def __init__(self, tag: Callable[[], str] | None = None):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.flops_by_tag: collections.Counter = collections.Counter()
        self.tag = tag

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            key = (func, tuple(layout(a) for a in args), tuple(sorted((k, layout(v)) for k, v in kwargs.items())))
            self.calls[key] += 1
            if self.tag is not None:
                self.flops_by_tag[self.tag()] += product_flops(func, key[1])
        return func(*args, **kwargs)
