"""One block of chunk-window attention on the CPU: its forward and its backward (the fused kernel's).

Legend: G chunks of c queries, d head width; the window of a chunk is m = w / c
consecutive chunks of the block's extended rows, of which there are
(G + m - 1) * c: chunk i sees extended chunks i, ..., i + m - 1 (window part p
is extended chunk i + p).

Forward: each chunk's queries attend to their window under an additive mask
(0 allowed, -1e9 not, the self value for the query itself); it returns the
outputs and the log-sum-exps of the logits, which the rounds' combination and
the backward need.

Backward: given a round's softmax over each window (recomputed from its
log-sum-exps), the gradient of its logits is the flash-attention one,
    dS = P * (dO . v - delta),    delta = rowsum(dO * o),
with o the output the forward returned for the query and dO its gradient
(`fused_chunks` passes the combined output and dO scaled by the round's share,
which gives the gradient under the joint softmax over rounds).

Two implementations of each:
- native (`window_kernel.cpp`, built on first use by `native.py`), for float32
  and float64 rows: chunk by chunk, two or three small products per chunk
  with the softmax (and the score gradients) done on a tile that stays in
  cache; the key and value gradients of the overlapping windows are folded
  extended chunk by extended chunk. It is registered as the operators
  `torch.ops.reformer.window_block_forward` and `window_block_backward`, so
  that dispatch modes (the benchmarks' product recorder) see it.
- PyTorch, when the native kernel is unavailable (REFORMER_NATIVE=0, no
  compiler, or bfloat16 rows): the forward is PyTorch's CPU flash-attention
  kernel over strided window views; the backward
  (`window_block_backward_batched`) runs window part by window part in batched
  products, so that no window is ever copied: part p of every chunk's scores
  is one batched product of the queries with extended chunks p .. p + G - 1,
  and the key and value gradients of part p are added onto those same extended
  chunks by `baddbmm_`.
Tests hold the two to each other in float64.

Underflow: exp of a masked logit (-1e9) takes a slow path of the vectorised exp,
and a probability that is nearly zero but not quite makes the products that use
it denormal, which is slower still. So the logits are clamped at `EXP_FLOOR`
before exp and probabilities below `PROBABILITY_FLOOR` are set to exactly 0:
the change is below 1e-30 per weight, of weights that sum to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}  # exp of these is a normal number in that dtype
PROBABILITY_FLOOR = {torch.float32: 1e-30, torch.float64: 1e-290}  # above exp(EXP_FLOOR); smaller is set to 0
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def windows(extended: torch.Tensor, g: int, c: int, w: int) -> torch.Tensor:
    """Overlapping chunk windows of extended rows: (bh, e, *rest) -> (bh, g, w, *rest), a strided view.

    `unfold` rather than `as_strided`: the same view, without reading strides in Python (a graph break
    for torch.compile).
    """
    return extended.unfold(1, w, c).movedim(-1, 2)[:, :g]  # (bh, g, *rest, w) -> (bh, g, w, *rest)


def window_block_forward(q: torch.Tensor, k_extended: torch.Tensor, v_extended: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (G, c, d) and log-sum-exps (G, c) of one block.

    q: (G, c, d); k_extended, v_extended: ((G + m - 1) * c, d); mask: (G, c, w) additive. The log-sum-exps are
    float32 for bfloat16 rows, else in the rows' dtype.
    """
    if native.library_for(q) is not None:
        return torch.ops.reformer.window_block_forward(q, k_extended, v_extended, mask, scale)
    g, c, _ = q.shape
    w = mask.shape[-1]
    out, lse = _FLASH(q[None], windows(k_extended[None], g, c, w), windows(v_extended[None], g, c, w), 0.0, False,
                      attn_mask=mask[None], scale=scale)  # (1, G, c, d), (1, G, c)
    return out[0], lse[0]


def window_block_backward(grad: torch.Tensor, q: torch.Tensor, k_extended: torch.Tensor, v_extended: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block: dq (G, c, d), and dk, dv on the extended rows ((G + m - 1) * c, d).

    grad, q, out: (G, c, d); k_extended, v_extended: ((G + m - 1) * c, d); lse: (G, c), the log-sum-exps of
    scale * q.k + mask over each window; mask: (G, c, w) additive. All float32 or float64.
    """
    if native.library_for(q) is not None:
        return torch.ops.reformer.window_block_backward(grad, q, k_extended, v_extended, out, lse, mask, scale)
    return window_block_backward_batched(grad, q, k_extended, v_extended, out, lse, mask, scale)


# --- the native kernel, as operators ----------------------------------------------------------------

def _check_block(q: torch.Tensor, k_extended: torch.Tensor, v_extended: torch.Tensor, mask: torch.Tensor) -> int:
    """The window parts m of a block, after checking that its shapes agree."""
    g, c, d = q.shape
    w = mask.shape[-1]
    if w % c or mask.shape != (g, c, w):
        raise ValueError(f"window kernel: the mask {tuple(mask.shape)} is not (G, c, w) for queries "
                         f"{tuple(q.shape)} with w a multiple of c")
    if k_extended.shape != ((g + w // c - 1) * c, d) or v_extended.shape != k_extended.shape:
        raise ValueError(f"window kernel: keys {tuple(k_extended.shape)} and values {tuple(v_extended.shape)} "
                         f"do not cover {g} chunks of {c} with windows of {w}")
    return w // c


def _native_function(kind: str, dtype: torch.dtype):
    lib = native.library()
    if lib is None:
        raise RuntimeError("the native window kernel is unavailable (see the warning above); "
                           "call window_kernel.window_block_forward/backward, which fall back to PyTorch")
    return getattr(lib, f"reformer_window_block_{kind}_{native.SUFFIXES[dtype]}")


def _native_block_forward(q, k_extended, v_extended, mask, scale):
    parts = _check_block(q, k_extended, v_extended, mask)
    g, c, d = q.shape
    dtype = q.dtype
    inputs = [t.to(dtype).contiguous() for t in (q, k_extended, v_extended, mask)]
    out, lse = q.new_empty(g, c, d), q.new_empty(g, c)
    _native_function("forward", dtype)(g, c, d, parts, *(t.data_ptr() for t in inputs), scale, EXP_FLOOR[dtype],
                                       PROBABILITY_FLOOR[dtype], out.data_ptr(), lse.data_ptr())
    return out, lse


def _native_block_backward(grad, q, k_extended, v_extended, out, lse, mask, scale):
    parts = _check_block(q, k_extended, v_extended, mask)
    g, c, d = q.shape
    dtype = q.dtype
    inputs = [t.to(dtype).contiguous() for t in (grad, q, k_extended, v_extended, out, lse, mask)]
    dq, dk, dv = (torch.empty_like(t) for t in inputs[1:4])
    probabilities, d_scores = q.new_empty(g, c, parts * c), q.new_empty(g, c, parts * c)  # workspace
    _native_function("backward", dtype)(g, c, d, parts, *(t.data_ptr() for t in inputs), scale, EXP_FLOOR[dtype],
                                        PROBABILITY_FLOOR[dtype],
                                        *(t.data_ptr() for t in (dq, dk, dv, probabilities, d_scores)))
    return dq, dk, dv


_OPERATORS = torch.library.Library("reformer", "DEF")
_OPERATORS.define("window_block_forward(Tensor q, Tensor k_extended, Tensor v_extended, Tensor mask, float scale) "
                  "-> (Tensor, Tensor)")
_OPERATORS.define("window_block_backward(Tensor grad, Tensor q, Tensor k_extended, Tensor v_extended, Tensor out, "
                  "Tensor lse, Tensor mask, float scale) -> (Tensor, Tensor, Tensor)")
_OPERATORS.impl("window_block_forward", _native_block_forward, "CPU")
_OPERATORS.impl("window_block_backward", _native_block_backward, "CPU")
_OPERATORS.impl("window_block_forward", lambda q, k, v, mask, scale: (torch.empty_like(q), q.new_empty(q.shape[:2])),
                "Meta")
_OPERATORS.impl("window_block_backward", lambda grad, q, k, v, out, lse, mask, scale: (
    torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)), "Meta")


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
