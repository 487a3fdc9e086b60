"""The backward of one block of chunk-window attention, in batched matrix products (the fused kernel's, on CPU).

Legend: G chunks of c queries, d head width; the window of a chunk is m = w / c
consecutive chunks of the block's extended rows, of which there are
(G + m - 1) * c: chunk i sees extended chunks i, ..., i + m - 1 (window part p
is extended chunk i + p).

Given a round's softmax over each window (recomputed from its log-sum-exps),
the gradient of its logits is the flash-attention one,
    dS = P * (dO . v - delta),    delta = rowsum(dO * o),
with o the output the forward returned for the query and dO its gradient
(`fused_chunks` passes the combined output and dO scaled by the round's share,
which gives the gradient under the joint softmax over rounds).

The work runs window part by window part, so that no window of keys or values
is ever copied: part p of every chunk's scores is one batched product of the
queries with extended chunks p .. p + G - 1, and the key and value gradients of
part p are added onto those same extended chunks by `baddbmm_`, folding the
overlapping windows as they are computed. PyTorch's CPU flash-attention
backward, which this replaces, copies every window and returns window gradients
to fold afterwards (`benchmarks/profile_step.py` times this kernel as a part of
the step).

Underflow: exp of a masked logit (-1e9) takes a slow path of the vectorised exp,
and a probability that is nearly zero but not quite makes the products that use
it denormal, which is slower still. So the logits are clamped at `EXP_FLOOR`
before exp and probabilities below `PROBABILITY_FLOOR` are set to exactly 0:
the change is below 1e-30 per weight, of weights that sum to one.

Two implementations compute this. `window_block_backward` takes the native
kernel (`window_kernel.cpp`, built on first use by `native.py`) for float32
and float64 on the CPU: it runs chunk by chunk, each chunk's scores, softmax
and score gradients in one pass over a tile that stays in cache, where the
batched version below makes seven passes over the whole block's. Without the
native kernel (REFORMER_NATIVE=0, no compiler) it runs
`window_block_backward_batched`, the same math in batched PyTorch products;
tests hold the two to each other in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}  # exp of these is a normal number in that dtype
PROBABILITY_FLOOR = {torch.float32: 1e-30, torch.float64: 1e-290}  # above exp(EXP_FLOOR); smaller is set to 0


def window_block_backward(grad: torch.Tensor, q: torch.Tensor, k_extended: torch.Tensor, v_extended: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block: dq (G, c, d), and dk, dv on the extended rows ((G + m - 1) * c, d).

    grad, q, out: (G, c, d); k_extended, v_extended: ((G + m - 1) * c, d); lse: (G, c), the log-sum-exps of
    scale * q.k + mask over each window; mask: (G, c, w) additive. All float32 or float64.
    """
    lib = native.library() if q.device.type == "cpu" and q.dtype in _NATIVE_FUNCTIONS else None
    if lib is None:
        return window_block_backward_batched(grad, q, k_extended, v_extended, out, lse, mask, scale)
    return _native_block_backward(lib, grad, q, k_extended, v_extended, out, lse, mask, scale)


_NATIVE_FUNCTIONS = {torch.float32: "reformer_window_block_backward_f32",
                     torch.float64: "reformer_window_block_backward_f64"}


def _native_block_backward(lib, grad, q, k_extended, v_extended, out, lse, mask, scale):
    """`window_block_backward` by the native kernel: the same arguments and results."""
    g, c, d = q.shape
    w = mask.shape[-1]
    dtype = q.dtype
    inputs = [t.to(dtype).contiguous() for t in (grad, q, k_extended, v_extended, out, lse, mask)]
    if k_extended.shape != ((g + w // c - 1) * c, d) or v_extended.shape != k_extended.shape or w % c:
        raise ValueError(f"window_block_backward: keys {tuple(k_extended.shape)} and values "
                         f"{tuple(v_extended.shape)} do not cover {g} chunks of {c} with windows of {w}")
    dq, dk, dv = torch.empty_like(inputs[1]), torch.empty_like(inputs[2]), torch.empty_like(inputs[3])
    probabilities, d_scores = q.new_empty(g, c, w), q.new_empty(g, c, w)  # workspace
    getattr(lib, _NATIVE_FUNCTIONS[dtype])(g, c, d, w // c, *(t.data_ptr() for t in inputs), scale,
                                           EXP_FLOOR[dtype], PROBABILITY_FLOOR[dtype],
                                           *(t.data_ptr() for t in (dq, dk, dv, probabilities, d_scores)))
    return dq, dk, dv


def window_block_backward_batched(grad: torch.Tensor, q: torch.Tensor, k_extended: torch.Tensor,
                                  v_extended: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`window_block_backward` in batched PyTorch products, window part by window part."""
    g, c, d = q.shape
    parts = mask.shape[-1] // c
    keys = k_extended.view(g + parts - 1, c, d)  # extended chunks
    values = v_extended.view(g + parts - 1, c, d)
    probabilities = _window_probabilities(q, keys, lse, mask, scale)  # (m, G, c, c): P, part by part
    d_values = torch.zeros_like(values)
    d_scores = torch.empty_like(probabilities)
    for part in range(parts):
        d_values[part:part + g].baddbmm_(probabilities[part].transpose(1, 2), grad)
        torch.bmm(grad, values[part:part + g].transpose(1, 2), out=d_scores[part])  # dO . v
    delta = torch.mul(grad, out).sum(-1)  # (G, c)
    d_scores.sub_(delta[None, :, :, None]).mul_(probabilities)  # dS; the logits' scale goes into the products
    dq = torch.zeros_like(q)
    d_keys = torch.zeros_like(keys)
    for part in range(parts):
        dq.baddbmm_(d_scores[part], keys[part:part + g], alpha=scale)
        d_keys[part:part + g].baddbmm_(d_scores[part].transpose(1, 2), q, alpha=scale)
    return dq, d_keys.view(-1, d), d_values.view(-1, d)


def _window_probabilities(q, keys, lse, mask, scale) -> torch.Tensor:
    """P = exp(scale * q.k + mask - lse) over each window, as (m, G, c, c): window part p in [p]."""
    g, c, _ = q.shape
    parts = mask.shape[-1] // c
    scores = q.new_empty(parts, g, c, c)
    for part in range(parts):
        torch.baddbmm(mask[:, :, part * c:(part + 1) * c], q, keys[part:part + g].transpose(1, 2), alpha=scale,
                      out=scores[part])
    scores.sub_(lse[None, :, :, None]).clamp_(min=EXP_FLOOR[q.dtype]).exp_()
    return F.threshold_(scores, PROBABILITY_FLOOR[q.dtype], 0.0)
