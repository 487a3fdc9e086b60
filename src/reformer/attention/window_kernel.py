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
  extended chunk by extended chunk, most of them right after the last chunk
  that sees them, while its tiles are in cache. It reads a block's rows
  through indices and builds its mask from the recipe (`BlockMask`) chunk by
  chunk: that is
  `gathered_block_forward` / `gathered_block_backward`, which fused_chunks
  calls; a dense block (`window_block_forward`, ...) is the same kernel over
  identity indices under a dense mask. It is registered as the operators
  `torch.ops.reformer.window_block_*` and `window_gathered_*`, so that
  dispatch modes (the benchmarks' product recorder) see it.
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

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .chunking import KEY_EPS

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
                         scale: float, native_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (G, c, d) and log-sum-exps (G, c) of one block.

    q: (G, c, d); k_extended, v_extended: ((G + m - 1) * c, d); mask: (G, c, w) additive. The log-sum-exps are
    float32 for bfloat16 rows, else in the rows' dtype.
    """
    if native.library_for(q) is not None if native_kernel is None else native_kernel:
        return torch.ops.reformer.window_block_forward(q, k_extended, v_extended, mask, scale)
    g, c, _ = q.shape
    w = mask.shape[-1]
    out, lse = _FLASH(q[None], windows(k_extended[None], g, c, w), windows(v_extended[None], g, c, w), 0.0, False,
                      attn_mask=mask[None], scale=scale)  # (1, G, c, d), (1, G, c)
    return out[0], lse[0]


def window_block_backward(grad: torch.Tensor, q: torch.Tensor, k_extended: torch.Tensor, v_extended: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor, scale: float,
                          native_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block: dq (G, c, d), and dk, dv on the extended rows ((G + m - 1) * c, d).

    grad, q, out: (G, c, d); k_extended, v_extended: ((G + m - 1) * c, d); lse: (G, c), the log-sum-exps of
    scale * q.k + mask over each window; mask: (G, c, w) additive. All float32 or float64.
    """
    if native.library_for(q) is not None if native_kernel is None else native_kernel:
        return torch.ops.reformer.window_block_backward(grad, q, k_extended, v_extended, out, lse, mask, scale)
    return window_block_backward_batched(grad, q, k_extended, v_extended, out, lse, mask, scale)


# --- the native kernel, as operators ----------------------------------------------------------------

@dataclass(frozen=True)
class BlockMask:
    """A block's additive mask as the recipe the native kernel builds it from, chunk by chunk.

    Each value, as `fused_chunks.MaskRecipe.block` computes it from positions scaled so that every
    nonzero difference is at least 2^30: with offset = q_pos - k_pos,
    band and causal: clamp(band - offset) + clamp(offset); band: clamp(band - |offset|) + bias;
    causal: clamp(offset); otherwise bias; clamp(x) = min(max(x, masked_value), 0). Then the self
    value on the query's own key: self_mode 1, window column `diagonal` + row; 2, where the
    positions are equal.
    """

    q_pos: torch.Tensor  # (G, c) float64
    k_pos: torch.Tensor  # (G, w) float64
    bias: torch.Tensor | None  # (G, w) in the rows' dtype, or None (causal masks)
    causal: bool
    band: float | None
    self_mode: int  # 0 none, 1 diagonal, 2 equal positions
    diagonal: int
    self_value: float
    masked_value: float


@dataclass(frozen=True)
class GatheredBlock:
    """Chunks of a head row read straight from the rows: q_index (G, c) and kv_index (E,) pick its query rows
    and its extended rows; k_rows None: shared query-keys, the keys are the query rows at unit length."""

    q_rows: torch.Tensor  # (N, d), contiguous
    k_rows: torch.Tensor | None
    v_rows: torch.Tensor
    q_index: torch.Tensor  # (G, c) int64
    kv_index: torch.Tensor  # ((G + m - 1) * c,) int64
    mask: BlockMask
    scale: float


def gathered_block_forward(block: GatheredBlock, out: torch.Tensor, out_index: torch.Tensor | None,
                           lse: torch.Tensor) -> None:
    """The block's outputs into out (its G * c rows in order, or rows out_index of it) and log-sum-exps into
    lse (G, c), by the native kernel (`native.library_for(block.q_rows)` must not be None)."""
    torch.ops.reformer.window_gathered_forward(*_gathered_arguments(block), out, out_index, lse)


def gathered_block_backward(block: GatheredBlock, grad_rows: torch.Tensor, out_rows: torch.Tensor, lse: torch.Tensor,
                            lse_rows: torch.Tensor | None, dq: torch.Tensor, dq_index: torch.Tensor | None,
                            dq_accumulate: bool, dk: torch.Tensor, dv: torch.Tensor, kv_accumulate: bool) -> None:
    """The block's gradients, by the native kernel.

    grad_rows, out_rows (N, d): the output's gradient and the output, read at the query rows; lse (G, c): the
    block's log-sum-exps; lse_rows (N,) float64: every row's log-sum-exp over the combined rounds (None: one
    round). dq: the G * c query gradients' rows in order, or rows dq_index of it, added or written; dk, dv: the
    E extended rows in order, added or written (shared query-keys: dk is the query-key gradient through the
    unit-length scaling, always added).
    """
    torch.ops.reformer.window_gathered_backward(*_gathered_arguments(block), grad_rows, out_rows, lse, lse_rows, dq,
                                                dq_index, dq_accumulate, dk, dv, kv_accumulate)


def native_block_mask(mask: BlockMask, dtype: torch.dtype) -> torch.Tensor:
    """The (G, c, w) additive mask the native kernel builds from `mask` (to test it against the recipe's)."""
    g, c = mask.q_pos.shape
    w = mask.k_pos.shape[1]
    out = mask.q_pos.new_empty(g, c, w, dtype=dtype)
    bias = None if mask.bias is None else mask.bias.to(dtype)
    _check_mask(mask.q_pos, mask.k_pos, bias, c, dtype)
    spec = _mask_spec(None, mask.q_pos, mask.k_pos, bias, mask.causal, mask.band, mask.self_mode, mask.diagonal,
                      mask.self_value, mask.masked_value)  # holds pointers: the tensors stay referenced here
    _native_function("mask", dtype)(g, c, w, ctypes.byref(spec), out.data_ptr())
    return out


def _gathered_arguments(block: GatheredBlock) -> tuple:
    m = block.mask
    return (block.q_rows, block.k_rows, block.v_rows, block.q_index, block.kv_index, m.q_pos, m.k_pos, m.bias,
            m.causal, m.band, m.self_mode, m.diagonal, m.self_value, m.masked_value, block.scale)


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


def _check_gathered(q_rows, k_rows, v_rows, q_index, kv_index, q_pos, k_pos, bias) -> tuple[int, int, int, int]:
    """(G, c, d, m) of a gathered block, after checking its shapes and layouts (the kernel checks the index values).

    Without indices (None), the rows are the block's own in order: G * c query rows, E key and value rows.
    """
    g, c = q_pos.shape if q_pos.dim() == 2 else (-1, 1)
    d, w = q_rows.shape[-1], k_pos.shape[-1]
    rows = [t for t in (q_rows, k_rows, v_rows) if t is not None]
    _check_mask(q_pos, k_pos, bias, c, q_rows.dtype)
    extended = (g + w // c - 1) * c
    if any(t.dim() != 2 or t.shape[1] != d or not t.is_contiguous() or t.dtype != q_rows.dtype for t in rows):
        raise ValueError("window kernel: the rows must be contiguous (N, d) tensors of one dtype")
    if q_index is None:
        if q_rows.shape[0] != g * c:
            raise ValueError(f"window kernel: without q_index, the {g} chunks of {c} queries are the query rows")
    elif q_index.shape != (g, c) or not _is_index(q_index):
        raise ValueError(f"window kernel: q_index and kv_index must be contiguous int64 indices, q_index ({g}, {c})")
    if kv_index is None:
        if k_rows is None or k_rows.shape[0] != extended or v_rows.shape[0] != extended:
            raise ValueError(f"window kernel: without kv_index, the key and value rows are the {extended} extended "
                             "rows (and shared query-keys need indices)")
    elif kv_index.shape != (extended,):
        raise ValueError(f"window kernel: {kv_index.shape[0]} extended rows do not cover {g} chunks of {c} with "
                         f"windows of {w}")
    elif not _is_index(kv_index):
        raise ValueError("window kernel: q_index and kv_index must be contiguous int64 indices")
    return g, c, d, w // c


def _limits(q_rows, k_rows, v_rows, targets) -> torch.Tensor:
    """The rows q_index, kv_index and the output index may pick, for the kernel's bounds checks (as it reads)."""
    keys = q_rows if k_rows is None else k_rows
    return torch.tensor([q_rows.shape[0], min(keys.shape[0], v_rows.shape[0]), targets.shape[0]], dtype=torch.int64)


def _raise_if_out_of_range(status: int) -> None:
    if status != 0:
        raise ValueError("window kernel: q_index and kv_index must be indices of rows they read (and out_index, "
                         "dq_index of rows they write): one is out of range; the outputs are undefined")


def _check_mask(q_pos, k_pos, bias, c: int, dtype) -> None:
    """q_pos (G, c) and k_pos (G, w) contiguous float64, w a multiple of c; bias None or (G, w) in dtype."""
    g, w = k_pos.shape if k_pos.dim() == 2 else (-1, -1)
    shapes = q_pos.shape == (g, c) and w > 0 and w % c == 0 and (bias is None or bias.shape == (g, w))
    if not shapes:
        raise ValueError(f"window kernel: mask positions {tuple(q_pos.shape)}, {tuple(k_pos.shape)} do not fit "
                         f"chunks of {c} queries with windows of a multiple of {c} keys")
    layouts = [(t, torch.float64) for t in (q_pos, k_pos)] + ([] if bias is None else [(bias, dtype)])
    if any(t.dtype != wanted or not t.is_contiguous() for t, wanted in layouts):
        raise ValueError(f"window kernel: mask positions must be contiguous float64, the bias contiguous {dtype}")


def _is_index(index: torch.Tensor) -> bool:
    """A contiguous int64 tensor (its values are checked by the kernel as it reads them: no pass of their own)."""
    return index.dtype == torch.int64 and index.is_contiguous()


def _native_function(kind: str, dtype: torch.dtype):
    lib = native.library()
    if lib is None:
        raise RuntimeError("the native window kernel is unavailable (see the warning above); "
                           "call window_kernel.window_block_forward/backward, which fall back to PyTorch")
    return getattr(lib, f"reformer_window_{kind}_{native.SUFFIXES[dtype]}")


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _mask_spec(dense, q_pos, k_pos, bias, causal, band, self_mode, diagonal, self_value,
               masked_value) -> native.MaskSpec:
    return native.MaskSpec(_pointer(dense), _pointer(q_pos), _pointer(k_pos), _pointer(bias), int(causal), self_mode,
                           diagonal, band is not None, 0.0 if band is None else band, self_value, masked_value)


def _native_gathered_forward(q_rows, k_rows, v_rows, q_index, kv_index, q_pos, k_pos, bias, causal, band, self_mode,
                             diagonal, self_value, masked_value, scale, out, out_index, lse, dense=None):
    g, c, d, m = _check_gathered(q_rows, k_rows, v_rows, q_index, kv_index, q_pos, k_pos, bias)
    dtype = q_rows.dtype
    spec = _mask_spec(dense, q_pos, k_pos, bias, causal, band, self_mode, diagonal, self_value, masked_value)
    _check_outputs(g * c, d, dtype, [(out, out_index)], [lse])
    limits = _limits(q_rows, k_rows, v_rows, out)
    _raise_if_out_of_range(_native_function("forward", dtype)(
        g, c, d, m, *map(_pointer, (q_rows, k_rows, v_rows, q_index, kv_index)), ctypes.byref(spec), scale,
        EXP_FLOOR[dtype], PROBABILITY_FLOOR[dtype], KEY_EPS, *map(_pointer, (out, out_index, lse, limits))))


def _native_gathered_backward(q_rows, k_rows, v_rows, q_index, kv_index, q_pos, k_pos, bias, causal, band,
                              self_mode, diagonal, self_value, masked_value, scale, grad_rows, out_rows, lse,
                              lse_rows, dq, dq_index, dq_accumulate, dk, dv, kv_accumulate, dense=None):
    g, c, d, m = _check_gathered(q_rows, k_rows, v_rows, q_index, kv_index, q_pos, k_pos, bias)
    dtype = q_rows.dtype
    spec = _mask_spec(dense, q_pos, k_pos, bias, causal, band, self_mode, diagonal, self_value, masked_value)
    extended = (g + m - 1) * c
    _check_outputs(g * c, d, dtype, [(dq, dq_index)], [lse])
    _check_outputs(extended, d, dtype, [(dk, None), (dv, None)], [])
    for rows in (grad_rows, out_rows):
        if rows.shape != q_rows.shape or rows.dtype != dtype or not rows.is_contiguous():
            raise ValueError("window kernel: grad_rows and out_rows must be contiguous, shaped as the query rows")
    if lse_rows is not None and (lse_rows.shape != q_rows.shape[:1] or lse_rows.dtype != torch.float64):
        raise ValueError("window kernel: lse_rows must be one float64 per query row")
    workspace = [q_rows.new_empty(g, c, m * c), q_rows.new_empty(g, c, m * c), q_rows.new_empty(g, c, d),
                 q_rows.new_empty(g, c, d)]  # P, dS, scaled dO, queries
    limits = _limits(q_rows, k_rows, v_rows, dq)
    _raise_if_out_of_range(_native_function("backward", dtype)(
        g, c, d, m, *map(_pointer, (q_rows, k_rows, v_rows, q_index, kv_index)), ctypes.byref(spec), scale,
        EXP_FLOOR[dtype], PROBABILITY_FLOOR[dtype], KEY_EPS,
        *map(_pointer, (grad_rows, out_rows, lse, lse_rows, dq, dq_index)), int(dq_accumulate), _pointer(dk),
        _pointer(dv), int(kv_accumulate), *map(_pointer, workspace), limits.data_ptr()))


def _check_outputs(count: int, d: int, dtype, targets, per_query) -> None:
    """Each (tensor, index) target holds `count` rows in order (index None) or rows at index; per_query: count
    contiguous values each."""
    for tensor, index in targets:
        fits = tensor.dtype == dtype and tensor.is_contiguous() and tensor.dim() == 2 and tensor.shape[1] == d
        if index is None:
            fits = fits and tensor.shape[0] == count
        else:
            fits = fits and index.numel() == count and _is_index(index)
        if not fits:
            raise ValueError(f"window kernel: an output must be a contiguous ({count}, {d}) {dtype} tensor, or rows "
                             f"of one at an int64 index")
    for tensor in per_query:
        if tensor.numel() != count or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"window kernel: the log-sum-exps must be {count} contiguous {dtype} values")


def _dense_block(q, k_extended, v_extended, mask):
    """A dense block as a gathered one: its rows in order (no indices), under its dense mask."""
    parts = _check_block(q, k_extended, v_extended, mask)
    g, c, d = q.shape
    dtype = q.dtype
    q_rows, k_rows, v_rows = (t.to(dtype).reshape(-1, d).contiguous() for t in (q, k_extended, v_extended))
    positions = q_rows.new_zeros((g, c), dtype=torch.float64), q_rows.new_zeros((g, parts * c), dtype=torch.float64)
    return (q_rows, k_rows, v_rows, None, None, *positions, None), mask.to(dtype).contiguous()


def _mask_free(dense):
    return dict(causal=False, band=None, self_mode=0, diagonal=0, self_value=0.0, masked_value=0.0, dense=dense)


def _native_block_forward(q, k_extended, v_extended, mask, scale):
    rows, dense = _dense_block(q, k_extended, v_extended, mask)
    g, c, d = q.shape
    out, lse = rows[0].new_empty(g * c, d), rows[0].new_empty(g, c)
    _native_gathered_forward(*rows, scale=scale, out=out, out_index=None, lse=lse, **_mask_free(dense))
    return out.view(g, c, d), lse


def _native_block_backward(grad, q, k_extended, v_extended, out, lse, mask, scale):
    rows, dense = _dense_block(q, k_extended, v_extended, mask)
    g, c, d = q.shape
    dtype = rows[0].dtype
    dq, dk, dv = torch.empty_like(rows[0]), torch.empty_like(rows[1]), torch.empty_like(rows[2])
    _native_gathered_backward(*rows, scale=scale, grad_rows=grad.to(dtype).reshape(-1, d).contiguous(),
                              out_rows=out.to(dtype).reshape(-1, d).contiguous(), lse=lse.to(dtype).contiguous(),
                              lse_rows=None, dq=dq, dq_index=None, dq_accumulate=False, dk=dk, dv=dv,
                              kv_accumulate=False, **_mask_free(dense))
    return dq.view(g, c, d), dk, dv


_GATHERED = ("Tensor q_rows, Tensor? k_rows, Tensor v_rows, Tensor? q_index, Tensor? kv_index, Tensor q_pos, "
             "Tensor k_pos, Tensor? bias, bool causal, float? band, int self_mode, int diagonal, float self_value, "
             "float masked_value, float scale")
_OPERATORS = torch.library.Library("reformer", "DEF")
_OPERATORS.define("window_block_forward(Tensor q, Tensor k_extended, Tensor v_extended, Tensor mask, float scale) "
                  "-> (Tensor, Tensor)")
_OPERATORS.define("window_block_backward(Tensor grad, Tensor q, Tensor k_extended, Tensor v_extended, Tensor out, "
                  "Tensor lse, Tensor mask, float scale) -> (Tensor, Tensor, Tensor)")
_OPERATORS.define(f"window_gathered_forward({_GATHERED}, Tensor(a!) out, Tensor? out_index, Tensor(b!) lse) -> ()")
_OPERATORS.define(f"window_gathered_backward({_GATHERED}, Tensor grad_rows, Tensor out_rows, Tensor lse, "
                  "Tensor? lse_rows, Tensor(a!) dq, Tensor? dq_index, bool dq_accumulate, Tensor(b!) dk, "
                  "Tensor(c!) dv, bool kv_accumulate) -> ()")
_OPERATORS.impl("window_block_forward", _native_block_forward, "CPU")
_OPERATORS.impl("window_block_backward", _native_block_backward, "CPU")
_OPERATORS.impl("window_gathered_forward", _native_gathered_forward, "CPU")
_OPERATORS.impl("window_gathered_backward", _native_gathered_backward, "CPU")
_OPERATORS.impl("window_block_forward", lambda q, k, v, mask, scale: (torch.empty_like(q), q.new_empty(q.shape[:2])),
                "Meta")
_OPERATORS.impl("window_block_backward", lambda grad, q, k, v, out, lse, mask, scale: (
    torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)), "Meta")
_OPERATORS.impl("window_gathered_forward", lambda *args: None, "Meta")
_OPERATORS.impl("window_gathered_backward", lambda *args: None, "Meta")


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
        # the product first, then the mask: baddbmm would add the product onto the mask in pieces, rounding
        # each at the mask's magnitude (the self logit -1e5), which moves a lone self weight off exactly 1
        torch.bmm(q, keys[part:part + g].transpose(1, 2), out=scores[part])
        scores[part].mul_(scale).add_(mask[:, :, part * c:(part + 1) * c])
    scores.sub_(lse[None, :, :, None]).clamp_(min=EXP_FLOOR[q.dtype]).exp_()
    return F.threshold_(scores, PROBABILITY_FLOOR[q.dtype], 0.0)
