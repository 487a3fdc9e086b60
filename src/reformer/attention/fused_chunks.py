"""Fast chunked attention over a permutation: LSH's sorted chunks, or local attention's plain ones.

Legend: per head row (one of b * h): g chunks of c queries (over all rounds),
w window keys per chunk ((before + 1 + after) * c), e = (before + g + after) * c
rows of the extended keys; "rows" are (head row, sorted slot) pairs.

The inputs are the rows of the projections, untouched; a `Plan` says which
rows each block gathers: its queries, and its keys and values in chunk order,
extended with the `before` chunks that wrap around in front and the `after`
chunks behind. Each chunk's window is an overlapping strided view of those.

The work runs in blocks of chunks, each inside one round of one head row.
Forward, per block: PyTorch's CPU flash-attention kernel attends each chunk's
queries to its window under an additive mask built for that block only (0
allowed, `self_value` for the query itself, -1e9 not allowed) and returns
outputs and log-sum-exps; blocks merge into the output position by position
with an online log-sum-exp (kept in float64: near the -1e5 self logit float32
is 0.0078 coarse), so the rounds combine exactly as one softmax.

Backward, per block, with the same kernel: the gradient of a round's logits
under the joint softmax is P_r * w_r * (dO . v - dO . o), with w_r the round's
share exp(lse_r - lse) and o the combined output; that is what the flash
backward computes given dout = w_r * dO and out = o. Window gradients fold back
onto the extended rows. Nothing of size (chunks, c, w) outlives a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._chunking import add_normalize_keys_backward_, mask_values, neighbour_mask, unit_length_keys

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
BLOCK_ELEMENTS = 1 << 20  # mask elements per block: 4 MiB in float32, below the 8 MiB mmap threshold (memory.py)
BLOCKED = float(1 << 30)  # the position of a key no query may see (exact in float32 and float64)
EXACT_FLOAT32 = 1 << 24  # positions below this are exact integers in float32


def fused_kernel_available(device: torch.device) -> bool:
    return device.type == "cpu"


def windows(extended: torch.Tensor, g: int, c: int, w: int) -> torch.Tensor:
    """Overlapping chunk windows of extended rows: (bh, e, *rest) -> (bh, g, w, *rest), a strided view."""
    bh = extended.shape[0]
    rest, inner, row = extended.shape[2:], extended.stride()[2:], extended.stride(1)
    return extended.as_strided((bh, g, w, *rest), (extended.stride(0), c * row, row, *inner),
                               extended.storage_offset())


@dataclass
class MaskRecipe:
    """What the additive mask of any block is built from (all small: per chunk, not per query-key pair).

    Positions are floats (exact integers), so that a block's causal mask is
    three vectorised float passes, clamp(k_pos - q_pos, 0, 1) * masked:
    comparisons that produce bool tensors, and `where` on them, are several
    times slower on the CPU. A key that is not allowed sits at BLOCKED, after
    every query.
    """

    q_pos: torch.Tensor  # (bh, g, c): the position of each query
    k_pos: torch.Tensor  # (bh, g, w): the position of each window key, BLOCKED where it is not allowed
    bias: torch.Tensor  # (bh, g, w): 0, or the masked value where the key is not allowed (non-causal masks)
    causal: bool
    self_value: float | None  # the query itself (LSH); None: no self mask (local attention)
    self_on_diagonal: bool  # each position is in a window once: the query itself is its own chunk's diagonal
    diagonal: int  # window offset of the own chunk: before * c
    masked_value: float
    dtype: torch.dtype  # of the mask: the queries' dtype

    def block(self, row: int, start: int, end: int) -> torch.Tensor:
        """(1, end - start, c, w) additive mask of chunks start..end of head row `row`."""
        q_pos = self.q_pos[row:row + 1, start:end, :, None]  # (1, G, c, 1)
        k_pos = self.k_pos[row:row + 1, start:end, None, :]  # (1, G, 1, w)
        if self.causal:
            additive = torch.sub(k_pos, q_pos).clamp_(0, 1).mul_(self.masked_value).to(self.dtype)  # (1, G, c, w)
        else:
            additive = self.bias[row:row + 1, start:end, None, :].expand(-1, -1, q_pos.shape[2], -1).clone()
        if self.self_value is not None:
            if self.self_on_diagonal:
                additive.diagonal(offset=self.diagonal, dim1=2, dim2=3).fill_(self.self_value)
            else:
                additive.masked_fill_(k_pos == q_pos, self.self_value)
        return additive


def blocks(bh: int, g: int, per_round: int, c: int, w: int) -> list[tuple[int, int, int]]:
    """(head row, first chunk, end chunk) blocks of at most BLOCK_ELEMENTS mask elements, never across rounds."""
    size = max(1, min(per_round, BLOCK_ELEMENTS // (c * w)))
    return [(row, start, min(start + size, round_start + per_round))
            for row in range(bh) for round_start in range(0, g, per_round)
            for start in range(round_start, round_start + per_round, size)]


@dataclass
class Plan:
    """Where every row of the work comes from and goes to (index tensors; small next to the activations)."""

    rows: torch.Tensor  # (bh, g, c): each query's row in q and in the output
    kv_source: torch.Tensor  # (bh, e): source row of each extended key / value
    recipe: MaskRecipe
    per_round: int  # chunks per round
    n_rows: int  # output rows
    scale: float  # logit scale


class ChunkedAttention(torch.autograd.Function):
    """Rows of q, k, v (N, d) -> out (n_rows, d): each query row attends to its chunk's window, one softmax per row.

    k_rows None means shared query-keys (LSH): the keys are the query rows
    scaled to unit length (`normalize_keys`), block by block as they are
    gathered, and the gradient of both roles comes back as one.

    Everything of the size of (rows, d) or more is gathered, computed and
    scattered block by block; only the output, its log-sum-exps and the
    per-query log-sum-exps are kept for the backward.
    """

    @staticmethod
    def forward(ctx, q_rows, k_rows, v_rows, plan: Plan):
        bh, g, c = plan.rows.shape
        d = q_rows.shape[1]
        out = q_rows.new_empty(plan.n_rows, d)  # every row is written by the first round
        lse = q_rows.new_empty((plan.n_rows,), dtype=torch.float64)  # float64: exact near -1e5
        lse_sorted = q_rows.new_empty(bh, g, c)  # per query row
        for row, start, end in blocks(bh, g, plan.per_round, c, plan.recipe.k_pos.shape[-1]):
            rows = plan.rows[row, start:end].reshape(-1)  # (G * c,), unique: a block lies inside one round
            q, k, v = _block_inputs(plan, rows, row, start, end, q_rows, k_rows, v_rows)
            out_block, lse_block = _FLASH(q, k, v, 0.0, False, attn_mask=plan.recipe.block(row, start, end),
                                          scale=plan.scale)  # (1, G, c, d) in q's (contiguous) layout, (1, G, c)
            lse_sorted[row, start:end] = lse_block[0]
            out_rows, lse_rows = out_block[0].reshape(-1, d), lse_block[0].reshape(-1)
            if start < plan.per_round:  # the first round: nothing to merge with yet
                out.index_copy_(0, rows, out_rows)
                lse.index_copy_(0, rows, lse_rows.double())
            else:
                _merge(out, lse, rows, out_rows, lse_rows)
        ctx.save_for_backward(q_rows, k_rows, v_rows, lse_sorted, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (n_rows, d)
        q_rows, k_rows, v_rows, lse_sorted, out, lse = ctx.saved_tensors
        plan = ctx.plan
        bh, g, c = plan.rows.shape
        d, w = q_rows.shape[1], plan.recipe.k_pos.shape[-1]
        one_round = g == plan.per_round  # then each round's share of the softmax is 1
        dq_rows = torch.empty_like(q_rows) if one_round else torch.zeros_like(q_rows)
        dk_rows = torch.zeros_like(q_rows if k_rows is None else k_rows)  # of the (unit-length) keys
        dv_rows = torch.zeros_like(v_rows)
        grad_out = grad_out.contiguous()
        for row, start, end in blocks(bh, g, plan.per_round, c, w):
            rows = plan.rows[row, start:end].reshape(-1)  # (G * c,)
            q, k, v = _block_inputs(plan, rows, row, start, end, q_rows, k_rows, v_rows)
            lse_block = lse_sorted[row:row + 1, start:end]  # (1, G, c)
            grad_rows = grad_out.index_select(0, rows)
            if not one_round:
                grad_rows *= torch.exp(lse_block.reshape(-1).double() - lse.index_select(0, rows)).to(q.dtype)[:, None]
            grad_block = grad_rows.view(1, end - start, c, d)  # w_r * dO
            out_block = out.index_select(0, rows).view(1, end - start, c, d)  # the combined o
            dq, dk, dv = _FLASH_BACKWARD(grad_block, q, k, v, out_block, lse_block, 0.0, False,
                                         attn_mask=plan.recipe.block(row, start, end), scale=plan.scale)
            dq_rows_order = plan.rows[row, start:end].t().reshape(-1)  # dq comes in (c, G) memory
            dq_block = dq[0].transpose(0, 1).reshape(-1, d)
            if one_round:
                dq_rows.index_copy_(0, dq_rows_order, dq_block)
            else:
                dq_rows.index_add_(0, dq_rows_order, dq_block)
            extended = plan.kv_source[row, start * c:(end - 1) * c + w]
            dk_rows.index_add_(0, extended, _fold_windows(dk[0], c))
            dv_rows.index_add_(0, extended, _fold_windows(dv[0], c))
        if k_rows is None:
            add_normalize_keys_backward_(dq_rows, q_rows, dk_rows)
            return dq_rows, None, dv_rows, None
        return dq_rows, dk_rows, dv_rows, None


def _block_inputs(plan: Plan, rows: torch.Tensor, row: int, start: int, end: int, q_rows, k_rows, v_rows):
    """Queries (1, G, c, d) and window views (1, G, w, d) of chunks start..end.

    Shared query-keys (k_rows None): the queries are the middle of the
    gathered extended rows, and the keys a unit-length copy of them.
    """
    c, d, w = plan.rows.shape[2], q_rows.shape[1], plan.recipe.k_pos.shape[-1]
    g = end - start
    extended = plan.kv_source[row, start * c:(end - 1) * c + w]
    if k_rows is None:
        raw = q_rows.index_select(0, extended)  # ((G - 1) * c + w, d)
        own = plan.recipe.diagonal  # the block's own chunks start after the `before` chunks
        q = raw[own:own + g * c].view(1, g, c, d)
        k_extended = unit_length_keys(raw)
    else:
        q = q_rows.index_select(0, rows).view(1, g, c, d)
        k_extended = k_rows.index_select(0, extended)
    k = windows(k_extended[None], g, c, w)
    v = windows(v_rows.index_select(0, extended)[None], g, c, w)
    return q, k, v


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, out_new: torch.Tensor,
           lse_new: torch.Tensor) -> None:
    """Online softmax merge of one block into the per-position output and log-sum-exp, in place.

    With L = logaddexp(lse_old, lse_new): out = out_old + exp(lse_new - L) * (out_new - out_old).
    """
    lse_old, lse_new = lse.index_select(0, rows), lse_new.double()
    lse_both = torch.logaddexp(lse_old, lse_new)
    take = torch.exp(lse_new - lse_both).to(out.dtype)[:, None]
    out.index_copy_(0, rows, torch.lerp(out.index_select(0, rows), out_new, take))
    lse.index_copy_(0, rows, lse_both)


def _fold_windows(grad_windows: torch.Tensor, c: int) -> torch.Tensor:
    """Sum the gradients of overlapping windows (G, w, d) onto their extended rows ((G - 1) * c + w, d)."""
    g, w, d = grad_windows.shape
    folded = grad_windows.new_zeros(g + w // c - 1, c, d)  # window part p of chunk i is extended chunk i + p
    for part in range(w // c):
        folded[part:part + g] += grad_windows[:, part * c:(part + 1) * c]
    return folded.view(-1, d)


# --- plans: index tensors and mask recipes ---------------------------------------------------------

def projection_rows(x: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) as rows (b*n*h, d) of the (b, n, h, d) layout: a view of the projections' own output."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n * h, d)


def chunk_plan(flat_order, mask, n, c, causal, wrap, window, dtype, *, scale, self_value, self_on_diagonal) -> Plan:
    """Index tensors and mask recipe of the fused kernel for slot -> position maps flat_order (b, h, r*n).

    Rounds are n positions long; a window is (before + 1 + after) chunks of c.
    """
    b, h, rn = flat_order.shape
    g, per_round = rn // c, n // c
    before, after = window
    w = (before + 1 + after) * c
    extended = flat_order[..., torch.arange(-before * c, rn + after * c, device=flat_order.device) % rn]  # (b, h, e)
    recipe = window_recipe(flat_order, extended, mask, g, c, w, per_round, causal, wrap, window, dtype,
                           self_value=self_value, self_on_diagonal=self_on_diagonal)
    return Plan(rows=output_rows(flat_order, n).view(b * h, g, c),
                kv_source=output_rows(extended, n).view(b * h, -1), recipe=recipe, per_round=per_round,
                n_rows=b * n * h, scale=scale)


def output_rows(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of a (b, n, h, d) output viewed as (b*n*h, d) for (b, h, m) positions."""
    b, h = positions.shape[:2]
    batch = torch.arange(b, device=positions.device).view(b, 1, 1)
    head = torch.arange(h, device=positions.device).view(1, h, 1)
    return (batch * n + positions) * h + head


def window_recipe(flat_order, extended, mask, g, c, w, per_round, causal, wrap, window, dtype, *,
                  self_value, self_on_diagonal) -> MaskRecipe:
    """The small tensors the fused kernel builds each block's additive mask from."""
    b, h = flat_order.shape[:2]
    _, masked_value = mask_values(dtype)
    key_real = mask[:, None, :].expand(b, h, mask.shape[1]).gather(-1, extended).view(b * h, -1)  # (bh, e)
    in_layout = neighbour_mask(g, per_round, *window, wrap, flat_order.device).repeat_interleave(c, dim=1)  # (g, w)
    key_ok = windows(key_real, g, c, w) & in_layout  # (bh, g, w)
    exact = dtype == torch.float64 or flat_order.shape[-1] >= EXACT_FLOAT32  # positions < r * n
    position_dtype = torch.float64 if exact else torch.float32
    k_pos = windows(extended.view(b * h, -1).to(position_dtype), g, c, w).masked_fill(~key_ok, BLOCKED)
    bias = torch.zeros(key_ok.shape, dtype=dtype, device=key_ok.device).masked_fill_(~key_ok, masked_value)
    return MaskRecipe(q_pos=flat_order.view(b * h, g, c).to(position_dtype), k_pos=k_pos, bias=bias, causal=causal,
                      self_value=self_value, self_on_diagonal=self_on_diagonal, diagonal=window[0] * c,
                      masked_value=masked_value, dtype=dtype)
