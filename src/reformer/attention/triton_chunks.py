"""The fused chunk-window attention on Triton: `fused_chunks.ChunkedAttention`'s forward and backward on the GPU.

Legend (as in fused_chunks): per head row (one of bh), g chunks of c query
slots; chunk i's window is the w extended rows i * c .. i * c + w - 1 of its
head row (e extended rows in all); d the head width. A plan's index tensors
say which row of q, k, v each query slot and extended row reads; its mask
recipe gives the positions the mask is computed from.

Three kernels, each one launch over all the head rows of a group:
- `_forward_kernel`: a program takes BQ queries of one chunk, gathered through
  the plan's row indices, and walks its window in blocks of BK keys (gathered
  likewise) with an online softmax, the additive mask computed in registers
  from the recipe's positions (causal, the key's validity, band, the self
  rule); it writes the outputs and the natural log-sum-exps in slot order.
- `_dq_kernel`: the same walk, recomputing P = exp(s - lse) from the saved
  log-sum-exps: dS = P * (dO . v - delta), dq = scale * dS . k (flash attention's backward).
- `_dkdv_kernel`: a program takes BK extended rows and walks the query blocks
  of every chunk whose window holds them: dv = P^T . dO, dk = scale * dS^T . q.
  Each extended row belongs to one program: no atomics, the same bits every run.

Several hash rounds: dO and delta of a round's slot are scaled by the round's
share exp(lse_r - lse) of the joint softmax, as in fused_chunks. What is not
attention is PyTorch on the rows' device: the unit-length keys of shared
query-keys, the rounds' combination by log-sum-exp (float64), and the folding
of the gradients of the wrapped extended rows and of the rounds onto positions.
Head rows go in groups so that these slot-ordered buffers stay within
GROUP_BYTES.

Precision: float32, bfloat16 and float16 rows; every product accumulates in
float32, the softmax and the log-sum-exps are float32. Products of float32 rows
are IEEE float32 unless PyTorch allows TF32 for CUDA matmuls
(`torch.backends.cuda.matmul.fp32_precision`, fixed for a call by its forward);
bfloat16 and float16 rows multiply in
their own type (P and dS are rounded to it, as in FlashAttention). The backward
recomputes each logit with the forward's operations (no kernel contracts a
multiply and an add into one fused operation: `enable_fp_fusion=False`), so
that a query that sees only itself (the -1e5 self logit, where float32 steps
are 0.0078) gets P = 1 again; its logit's gradient is 0 in any case (dO . v =
dO . o for a lone key).

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run
on CPU tensors, which is how the tests run them. The interpreter multiplies
bfloat16 tiles as raw integers (Triton 3.9's `create_dot`), so there bfloat16
tiles are widened to float32 before each product: the same values, since
products of bfloat16 numbers are exact in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunking import add_normalize_keys_backward_, unit_length_keys
from .fused_chunks import BLOCKED, POSITION_SCALE, _add_wrapped

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the rows the kernels take
GROUP_BYTES = 1 << 30  # slot-ordered buffers of one group of head rows (forward outputs, backward gradients)
MAX_GRID_Y = 65535  # head rows per launch: CUDA's limit on a grid's second dimension


def interpreted() -> bool:
    """Do the kernels run under Triton's interpreter (on CPU tensors)? Fixed when Triton's language and this module
    were first imported: both under TRITON_INTERPRET=1, or the interpreter cannot run them."""
    return all(type(function).__name__ == "InterpretedFunction" for function in (_forward_kernel, tl.zeros))


# --- the kernels -------------------------------------------------------------------------------------

@triton.jit
def _logits(q, k, scale, qp, kp, cols, rows, col_ok, band, diagonal, self_value, masked_value, blocked,
            CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, SELF_MODE: tl.constexpr, DOT: tl.constexpr,
            PRECISION: tl.constexpr):
    """(BQ, BK) float32 logits scale * q.k + mask; keys outside the window (col_ok False) at -inf.

    The mask as `fused_chunks.MaskRecipe.block` computes it: qp (BQ,) and kp (BK,) are positions scaled by
    2^30, kp at `blocked` for a key no query may see; cols the keys' window columns, rows the queries' index
    in their chunk.
    """
    s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale
    later = kp[None, :] > qp[:, None]
    if CAUSAL:
        add = tl.where(later, masked_value, 0.0)
        if HAS_BAND:
            add += tl.where(qp[:, None] - kp[None, :] > band, masked_value, 0.0)
    else:
        add = tl.where(kp[None, :] < blocked, 0.0, masked_value) + tl.zeros_like(s)
        if HAS_BAND:
            add += tl.where(tl.abs(qp[:, None] - kp[None, :]) > band, masked_value, 0.0)
    if SELF_MODE == 1:  # the query's own key is window column diagonal + its row
        add = tl.where(cols[None, :] == diagonal + rows[:, None], self_value, add)
    if SELF_MODE == 2:  # the key at the query's own position
        add = tl.where(kp[None, :] == qp[:, None], self_value, add)
    return tl.where(col_ok[None, :], s + add, float("-inf"))


@triton.jit
def _row_offsets(index, d, dims, NARROW: tl.constexpr):
    """(B, BD) element offsets of rows `index` (B,) of width d; int32 when every offset fits (fewer registers)."""
    return (index.to(tl.int32 if NARROW else tl.int64) * d)[:, None] + dims[None, :]


@triton.jit
def _window_keys(K, V, KV, KP, head_row, chunk, start, c, e, g, w, d, dims, dim_ok, blocked, BK: tl.constexpr,
                 NARROW: tl.constexpr):
    """Window columns start .. start + BK of a chunk: the columns, which are inside the window, their keys and
    values (gathered through KV) and their scaled positions (`blocked` outside)."""
    cols = start + tl.arange(0, BK)
    col_ok = cols < w
    kv_index = tl.load(KV + head_row * e + chunk * c + cols, mask=col_ok, other=0)
    kv_ok = col_ok[:, None] & dim_ok[None, :]
    kv_offsets = _row_offsets(kv_index, d, dims, NARROW)
    k = tl.load(K + kv_offsets, mask=kv_ok, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_ok, other=0.0)
    kp = tl.load(KP + (head_row * g + chunk) * w + cols, mask=col_ok, other=blocked)
    return cols, col_ok, k, v, kp


@triton.jit
def _forward_kernel(Q, K, V, ROWS, KV, QP, KP, OUT, LSE,
                    scale, band, diagonal, self_value, masked_value, blocked,
                    c, w, e, g, d, q_blocks,
                    CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, SELF_MODE: tl.constexpr,
                    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
                    PRECISION: tl.constexpr, NARROW: tl.constexpr):
    head_row = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0) // q_blocks
    rows = (tl.program_id(0) % q_blocks) * BQ + tl.arange(0, BQ)  # the queries' index in their chunk
    row_ok = rows < c
    dims = tl.arange(0, BD)
    dim_ok = dims < d
    slots = head_row * g * c + chunk * c + rows  # (BQ,) slots of the (bh, g * c) slot order
    q_index = tl.load(ROWS + slots, mask=row_ok, other=0)
    q = tl.load(Q + _row_offsets(q_index, d, dims, NARROW), mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    qp = tl.load(QP + slots, mask=row_ok, other=0.0)

    m_i = tl.full([BQ], -3.0e38, tl.float32)  # finite: a row of -inf logits (padding) stays NaN-free
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BD], tl.float32)
    for start in range(0, w, BK):
        cols, col_ok, k, v, kp = _window_keys(K, V, KV, KP, head_row, chunk, start, c, e, g, w, d, dims, dim_ok,
                                              blocked, BK, NARROW)
        s = _logits(q, k, scale, qp, kp, cols, rows, col_ok, band, diagonal, self_value, masked_value, blocked,
                    CAUSAL, HAS_BAND, SELF_MODE, DOT, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + _row_offsets(slots, d, dims, NARROW), out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + slots, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _query_block(Q, DO, ROWS, QP, LSE, SHARE, DELTA, head_row, chunk, rows, row_ok, dims, dim_ok, c, g, d,
                 HAS_SHARE: tl.constexpr, NARROW: tl.constexpr):
    """A block of one chunk's queries for the backward: q, dO (scaled by the round's share, float32), and the
    queries' positions, log-sum-exps and delta (scaled likewise)."""
    slots = head_row * g * c + chunk * c + rows
    q_index = tl.load(ROWS + slots, mask=row_ok, other=0)
    ok = row_ok[:, None] & dim_ok[None, :]
    q_offsets = _row_offsets(q_index, d, dims, NARROW)
    q = tl.load(Q + q_offsets, mask=ok, other=0.0)
    do = tl.load(DO + q_offsets, mask=ok, other=0.0).to(tl.float32)
    delta = tl.load(DELTA + q_index, mask=row_ok, other=0.0)
    if HAS_SHARE:
        share = tl.load(SHARE + slots, mask=row_ok, other=0.0)
        do = do * share[:, None]
        delta = delta * share
    qp = tl.load(QP + slots, mask=row_ok, other=0.0)
    lse = tl.load(LSE + slots, mask=row_ok, other=0.0)
    return slots, q, do, delta, qp, lse


@triton.jit
def _dq_kernel(Q, K, V, DO, ROWS, KV, QP, KP, LSE, SHARE, DELTA, DQ,
               scale, band, diagonal, self_value, masked_value, blocked,
               c, w, e, g, d, q_blocks,
               CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, SELF_MODE: tl.constexpr, HAS_SHARE: tl.constexpr,
               BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
               NARROW: tl.constexpr):
    head_row = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0) // q_blocks
    rows = (tl.program_id(0) % q_blocks) * BQ + tl.arange(0, BQ)
    row_ok = rows < c
    dims = tl.arange(0, BD)
    dim_ok = dims < d
    slots, q, do, delta, qp, lse = _query_block(Q, DO, ROWS, QP, LSE, SHARE, DELTA, head_row, chunk, rows, row_ok,
                                                dims, dim_ok, c, g, d, HAS_SHARE, NARROW)
    dq = tl.zeros([BQ, BD], tl.float32)
    for start in range(0, w, BK):
        cols, col_ok, k, v, kp = _window_keys(K, V, KV, KP, head_row, chunk, start, c, e, g, w, d, dims, dim_ok,
                                              blocked, BK, NARROW)
        s = _logits(q, k, scale, qp, kp, cols, rows, col_ok, band, diagonal, self_value, masked_value, blocked,
                    CAUSAL, HAS_BAND, SELF_MODE, DOT, PRECISION)
        p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do.to(V.dtype.element_ty).to(DOT), tl.trans(v.to(DOT)), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT), k.to(DOT), input_precision=PRECISION)
    tl.store(DQ + _row_offsets(slots, d, dims, NARROW), dq * scale, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, ROWS, KV, QP, KP, LSE, SHARE, DELTA, DK, DV,
                 scale, band, diagonal, self_value, masked_value, blocked,
                 c, w, e, g, d, q_blocks,
                 CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, SELF_MODE: tl.constexpr, HAS_SHARE: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
               NARROW: tl.constexpr):
    head_row = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BK
    extended = first + tl.arange(0, BK)  # (BK,) extended rows of this program
    ext_ok = extended < e
    dims = tl.arange(0, BD)
    dim_ok = dims < d
    kv_index = tl.load(KV + head_row * e + extended, mask=ext_ok, other=0)
    kv_ok = ext_ok[:, None] & dim_ok[None, :]
    kv_offsets = _row_offsets(kv_index, d, dims, NARROW)
    k = tl.load(K + kv_offsets, mask=kv_ok, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_ok, other=0.0)
    dk = tl.zeros([BK, BD], tl.float32)
    dv = tl.zeros([BK, BD], tl.float32)
    # chunk i's window holds extended rows i * c .. i * c + w - 1: the chunks from ceil((first - w + 1) / c)
    reach = first - w + 1
    lowest = tl.where(reach > 0, (reach + c - 1) // c, 0)
    highest = tl.minimum(g - 1, (first + BK - 1) // c)
    for chunk in range(lowest, highest + 1):
        cols = extended - chunk * c  # these keys' columns in the chunk's window
        col_ok = ext_ok & (cols >= 0) & (cols < w)
        kp = tl.load(KP + (head_row * g + chunk) * w + cols, mask=col_ok, other=blocked)
        for block in range(q_blocks):
            rows = block * BQ + tl.arange(0, BQ)
            row_ok = rows < c
            _, q, do, delta, qp, lse = _query_block(Q, DO, ROWS, QP, LSE, SHARE, DELTA, head_row, chunk, rows,
                                                    row_ok, dims, dim_ok, c, g, d, HAS_SHARE, NARROW)
            s = _logits(q, k, scale, qp, kp, cols, rows, col_ok, band, diagonal, self_value, masked_value,
                        blocked, CAUSAL, HAS_BAND, SELF_MODE, DOT, PRECISION)
            p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)  # (BQ, BK)
            do_dot = do.to(V.dtype.element_ty).to(DOT)
            dv += tl.dot(tl.trans(p.to(V.dtype.element_ty).to(DOT)), do_dot, input_precision=PRECISION)
            dp = tl.dot(do_dot, tl.trans(v.to(DOT)), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(DOT)), q.to(DOT), input_precision=PRECISION)
    out = _row_offsets(head_row * e + extended, d, dims, NARROW)
    tl.store(DK + out, dk * scale, mask=kv_ok)
    tl.store(DV + out, dv, mask=kv_ok)


# --- launching them ----------------------------------------------------------------------------------

def tiles(c: int, w: int, d: int, dtype: torch.dtype, kernel: str = "forward") -> dict:
    """Tile sizes and warps of `kernel` ("forward", "dq", "dkdv") for chunks of c queries, windows of w keys and
    heads of width d: what their registers and shared memory allow when compiled for sm_80 and sm_90.

    16-bit rows: blocks of 64 queries and 64 keys, the dk, dv kernel's walk in blocks of 32 queries (64 spills
    registers); float32 rows: 32 and 32 (64 x 64 IEEE float32 products spill kilobytes, and the dk, dv kernel's
    tiles of 64 x 128 exceed an A100's shared memory). 8 warps for heads wider than 64. At least 16 each
    (tl.dot's smallest).
    """
    bd = max(16, triton.next_power_of_2(d))
    side = 32 if dtype == torch.float32 else 64
    queries = 32 if kernel == "dkdv" else side
    return dict(BQ=min(queries, max(16, triton.next_power_of_2(c))), BK=min(side, max(16, triton.next_power_of_2(w))),
                BD=bd, num_warps=8 if bd > 64 else 4)


def float32_products() -> str:
    """How float32 rows multiply: "tf32" where PyTorch lets CUDA float32 matmuls use TF32
    (`torch.backends.cuda.matmul.fp32_precision`, or the `allow_tf32` of older versions), else "ieee"."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


class _Launch:
    """What every kernel of one call takes: the plan's constants, tile sizes and the products' dtype."""

    def __init__(self, plan, dtype: torch.dtype, d: int):
        recipe = plan.recipe
        _, self.g, self.c = plan.rows.shape
        self.w, self.e = recipe.k_pos.shape[-1], plan.kv_source.shape[1]
        self.tiles = {kernel: tiles(self.c, self.w, d, dtype, kernel) for kernel in ("forward", "dq", "dkdv")}
        self.d = d
        elements = max(plan.n_rows, plan.rows.numel(), plan.kv_source.numel()) * d  # of the largest tensor read
        self.narrow = elements < 2**31  # offsets fit in int32
        self.scalars = dict(scale=float(plan.scale), band=0.0 if recipe.band is None else float(recipe.band),
                            diagonal=int(recipe.diagonal),
                            self_value=0.0 if recipe.self_value is None else float(recipe.self_value),
                            masked_value=float(recipe.masked_value),
                            blocked=BLOCKED * POSITION_SCALE)  # a key's scaled position when no query may see it
        self_mode = 0 if recipe.self_value is None else (1 if recipe.self_on_diagonal else 2)
        widened = dtype == torch.bfloat16 and interpreted()  # the interpreter's bfloat16 products are wrong
        precision = plan.float32_products if dtype == torch.float32 and not interpreted() else "ieee"
        self.flags = dict(CAUSAL=bool(recipe.causal), HAS_BAND=recipe.band is not None, SELF_MODE=self_mode,
                          DOT=tl.float32 if widened else _TRITON_DTYPES[dtype], PRECISION=precision)
        tensors = (plan.rows, plan.kv_source, recipe.q_pos, recipe.k_pos)
        if not all(tensor.is_contiguous() for tensor in tensors):
            raise ValueError("the Triton kernels read the plan's rows, kv_source, q_pos and k_pos as contiguous")

    def grid(self, kernel: str, head_rows: int) -> tuple[int, int]:
        """(blocks, head rows): blocks of BQ queries of every chunk, or (dkdv) of BK extended rows."""
        tile = self.tiles[kernel]
        blocks = triton.cdiv(self.e, tile["BK"]) if kernel == "dkdv" else self.g * triton.cdiv(self.c, tile["BQ"])
        return blocks, head_rows

    def options(self, kernel: str, **flags) -> dict:
        """The keyword arguments of a launch of `kernel`: sizes, scalars, flags, tiles and compiler options."""
        tile = self.tiles[kernel]
        return dict(c=self.c, w=self.w, e=self.e, g=self.g, d=self.d, q_blocks=triton.cdiv(self.c, tile["BQ"]),
                    **self.scalars, **self.flags, **flags, **tile, NARROW=self.narrow, enable_fp_fusion=False)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _groups(b: int, h: int, bytes_per_head_row: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) groups of head rows (batch b0..b1, heads h0..h1), consecutive in the b * h head rows,
    each within GROUP_BYTES of slot-ordered buffers (at least one head row) and MAX_GRID_Y head rows."""
    per_group = min(MAX_GRID_Y, max(1, GROUP_BYTES // max(1, bytes_per_head_row)))
    if per_group >= h:
        batches = per_group // h
        return [(b0, min(b, b0 + batches), 0, h) for b0 in range(0, b, batches)]
    return [(b0, b0 + 1, h0, min(h, h0 + per_group)) for b0 in range(b) for h0 in range(0, h, per_group)]


def _head_rows(plan, group) -> slice:
    b0, b1, h0, h1 = group
    h = plan.shape[2]
    return slice(b0 * h + h0, (b1 - 1) * h + h1)


def _by_head(rows: torch.Tensor, plan, group) -> torch.Tensor:
    """The group's (B', H', n, ...) strided view of rows in the (b * n * h, ...) layout."""
    b, n, h = plan.shape
    b0, b1, h0, h1 = group
    return rows.view(b, n, h, *rows.shape[1:]).transpose(1, 2)[b0:b1, h0:h1]


def _same_dtype(q_rows, k_rows, v_rows):
    return [None if x is None else x.to(q_rows.dtype).contiguous() for x in (q_rows, k_rows, v_rows)]


def attend(q_rows: torch.Tensor, k_rows: torch.Tensor | None, v_rows: torch.Tensor, plan):
    """out (n_rows, d) in the rows' dtype, lse_slots (bh, g, c) float32 and lse (n_rows,) float64 of a plan's
    chunk-window attention; k_rows None: shared query-keys (keys are the query rows at unit length)."""
    q_rows, k_rows, v_rows = _same_dtype(q_rows, k_rows, v_rows)
    keys = _unit_length_keys(q_rows) if k_rows is None else k_rows
    if not plan.float32_products:  # fixed here, for the backward too: it recomputes the forward's logits
        plan.float32_products = float32_products()
    b, _, h = plan.shape
    bh, g, c = plan.rows.shape
    d = q_rows.shape[1]
    launch = _Launch(plan, q_rows.dtype, d)
    out = torch.empty_like(q_rows)
    lse = q_rows.new_empty(plan.n_rows, dtype=torch.float64)
    lse_slots = q_rows.new_empty(bh, g, c, dtype=torch.float32)
    for group in _groups(b, h, g * c * d * q_rows.element_size()):
        head_rows = _head_rows(plan, group)
        count = head_rows.stop - head_rows.start
        out_slots = q_rows.new_empty(count, g * c, d)
        _forward_kernel[launch.grid("forward", count)](
            q_rows, keys, v_rows, plan.rows[head_rows], plan.kv_source[head_rows], plan.recipe.q_pos[head_rows],
            plan.recipe.k_pos[head_rows], out_slots, lse_slots[head_rows], **launch.options("forward"))
        _combine_rounds(plan, group, head_rows, out_slots, lse_slots[head_rows].view(count, -1), out, lse)
    return out, lse_slots, lse


def _combine_rounds(plan, group, head_rows, out_slots, lse_slots, out, lse) -> None:
    """The group's rounds -> positions: out = sum_r exp(lse_r - lse) o_r, lse = logsumexp_r lse_r (float64)."""
    count, _, d = out_slots.shape
    shape = _by_head(lse, plan, group).shape  # (B', H', n)
    n = shape[-1]
    if plan.rank is None:  # slots are positions
        _by_head(out, plan, group).copy_(out_slots.view(*shape, d))
        _by_head(lse, plan, group).copy_(lse_slots.view(shape))
        return
    rank = plan.rank[head_rows]  # (count, r, n)
    r = rank.shape[1]
    per_round = lse_slots.gather(1, rank.reshape(count, r * n)).view(count, r, n).double()
    total = torch.logsumexp(per_round, dim=1)  # (count, n)
    _by_head(lse, plan, group).copy_(total.view(shape))
    if r == 1:
        _by_head(out, plan, group).copy_(out_slots.gather(1, rank[:, 0, :, None].expand(-1, -1, d)).view(*shape, d))
        return
    weights = torch.exp(per_round - total[:, None]).float()  # (count, r, n)
    combined = torch.zeros(count, n, d, dtype=torch.float32, device=out.device)
    for k in range(r):  # round by round: one (count, n, d) gather at a time
        combined.addcmul_(out_slots.gather(1, rank[:, k, :, None].expand(-1, -1, d)), weights[:, k, :, None])
    _by_head(out, plan, group).copy_(combined.view(*shape, d))


def _unit_length_keys(rows: torch.Tensor, piece: int = 1 << 16) -> torch.Tensor:
    """Shared query-keys' keys: `unit_length_keys` of the rows in float32, rounded to their dtype, `piece` rows at
    a time (no float32 copy of all the rows)."""
    keys = torch.empty_like(rows)
    for start in range(0, rows.shape[0], piece):
        keys[start:start + piece] = unit_length_keys(rows[start:start + piece].float())
    return keys


def backward(grad_out: torch.Tensor, q_rows: torch.Tensor, k_rows: torch.Tensor | None, v_rows: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, lse_slots: torch.Tensor, plan, one_round: bool,
             accumulate: bool):
    """Gradients (dq, dk, dv) of the rows (dk None for shared query-keys: its part is in dq): float32 when
    `accumulate` (more is added onto them: the global tokens'), else in the rows' dtype, each head row's summed
    in float32 first.

    one_round: the window's softmax is the whole softmax (one round, no global tokens), every share is 1.
    """
    dtype = q_rows.dtype
    q_rows, k_rows, v_rows = _same_dtype(q_rows, k_rows, v_rows)
    shared = k_rows is None
    keys = _unit_length_keys(q_rows) if shared else k_rows
    b, _, h = plan.shape
    _, g, c = plan.rows.shape
    d, e = q_rows.shape[1], plan.kv_source.shape[1]
    launch = _Launch(plan, dtype, d)
    grad_out = grad_out.to(dtype).contiguous()
    delta = torch.linalg.vecdot(grad_out.float(), out.float(), dim=-1)  # (n_rows,) dO . o
    dq, dk, dv = (None if shared and name == "k" else torch.empty_like(q_rows, dtype=torch.float32 if accumulate
                                                                         else dtype) for name in "qkv")
    for group in _groups(b, h, (g * c + 2 * e) * d * 4):
        head_rows = _head_rows(plan, group)
        count = head_rows.stop - head_rows.start
        lse_group = lse_slots[head_rows]
        share = None
        if not one_round:  # each slot's share of its query's joint softmax: exp(lse_r - lse)
            share = torch.exp(lse_group.double() - lse[plan.rows[head_rows]]).float()  # (count, g, c)
        dq_slots = q_rows.new_empty(count, g * c, d, dtype=torch.float32)
        dk_extended, dv_extended = (q_rows.new_empty(count, e, d, dtype=torch.float32) for _ in range(2))
        arguments = (q_rows, keys, v_rows, grad_out, plan.rows[head_rows], plan.kv_source[head_rows],
                     plan.recipe.q_pos[head_rows], plan.recipe.k_pos[head_rows], lse_group,
                     lse_group if share is None else share, delta)
        _dq_kernel[launch.grid("dq", count)](*arguments, dq_slots, **launch.options("dq", HAS_SHARE=share is not None))
        _dkdv_kernel[launch.grid("dkdv", count)](*arguments, dk_extended, dv_extended,
                                                 **launch.options("dkdv", HAS_SHARE=share is not None))
        dq_group, dk_group, dv_group = (_slots_to_positions(plan, head_rows, slots) for slots in (
            dq_slots, _fold_wrapped(plan, dk_extended), _fold_wrapped(plan, dv_extended)))  # (count, n, d) each
        if shared:  # the keys' gradients through the unit-length scaling, onto the query-keys
            raw = _by_head(q_rows, plan, group).reshape(-1, d).float()  # (count * n, d), a copy
            add_normalize_keys_backward_(dq_group.view(-1, d), raw, dk_group.view(-1, d))
        for value, target in ((dq_group, dq), (dk_group, dk), (dv_group, dv)):
            if target is not None:
                view = _by_head(target, plan, group)  # (B', H', n, d)
                view.copy_(value.view(view.shape))
    return dq, dk, dv


def _fold_wrapped(plan, extended: torch.Tensor) -> torch.Tensor:
    """(count, e, d) gradients on extended rows -> (count, g * c, d) on the slots: the `before` chunks in front
    stand for the last slots, cyclically, and the `after` chunks behind for the first."""
    c = plan.rows.shape[2]
    before, after = plan.window[0] * c, plan.window[1] * c
    main = extended[:, before:extended.shape[1] - after]
    _add_wrapped(main.transpose(0, 1), extended[:, :before].transpose(0, 1),
                 extended[:, extended.shape[1] - after:].transpose(0, 1))  # slots first: one slice per piece
    return main


def _slots_to_positions(plan, head_rows: slice, slots: torch.Tensor) -> torch.Tensor:
    """(count, r * n, d) per slot -> (count, n, d) per position, summed over the rounds."""
    if plan.rank is None:
        return slots
    rank = plan.rank[head_rows]  # (count, r, n)
    d = slots.shape[-1]
    total = slots.gather(1, rank[:, 0, :, None].expand(-1, -1, d))
    for k in range(1, rank.shape[1]):
        total += slots.gather(1, rank[:, k, :, None].expand(-1, -1, d))
    return total

