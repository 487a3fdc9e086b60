"""Fast chunked attention over a permutation: LSH's sorted chunks, or local attention's plain ones.

Legend: per head row (one of b * h): g chunks of c query slots (over all rounds),
w window keys per chunk ((before + 1 + after) * c), e = (before + g + after) * c
extended slots: the slots in chunk order with the `before` chunks that wrap
around in front and the `after` chunks behind.

The inputs are the rows of the projections, untouched; a `Plan` says which
rows each block of chunks gathers: its queries, and its keys and values over
its extended slots. Each chunk's window is a run of consecutive extended rows.

Everything is written in slot order, never scattered by position. The work
runs in blocks of chunks of one head row (across rounds). Forward, per block:
the window kernel attends each chunk's queries to its window under an additive
mask for that block only (0 allowed, `self_value` for the query itself, -1e9
not allowed) and returns outputs and log-sum-exps into the head row's slots.
The native kernel (float32 and float64 rows) reads the block's rows through
the plan's indices and builds the mask from its recipe chunk by chunk, in
cache (`window_kernel.gathered_block_forward`); otherwise the rows are gathered
(`_block_rows`), the mask is built (`MaskRecipe.block`) and PyTorch's CPU flash
attention runs on them, as it does for bfloat16. After its last block, a head
row's rounds are combined position by position: each round's slots are
gathered by rank and weighted by
exp(lse_r - lse), with lse their log-sum-exp, kept in float64 (near the -1e5
self logit float32 is 0.0078 coarse), so the rounds combine exactly as one
softmax. A plan in position order (local attention) writes its blocks straight
into the output.

Backward, per block, by the window kernel's backward: the gradient of a
round's logits under the joint softmax is
P_r * w_r * (dO . v - dO . o), with w_r the round's share exp(lse_r - lse) and
o the combined output; that is the flash-attention backward given
dout = w_r * dO and out = o. Query gradients are added onto the head row's
slots, key and value gradients (folded over the overlapping windows as they are
computed) onto its extended slots; the slots are gathered back into position
order once per head row (the native kernel reads the rows and adds onto the
slot buffers itself). Nothing of size (chunks, c, w) outlives a block.

Longformer's global tokens (a plan's `global_tokens`, one round) join each head
row after its blocks (`global_tokens.py`): their keys as columns of every
query's softmax, merged by log-sum-exp, and their own rows over every key,
written over their positions; the backward adds their gradients after the
head row's blocks, from the same log-sum-exps.

bfloat16 rows (autocast): the forward kernel runs in bfloat16 (faster than
float32 on CPUs with AMX); masks, log-sum-exps, the rounds' combination and
the gradient sums are float32. The backward upcasts each block to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .chunking import (accumulation_dtype, add_normalize_keys_backward_, explicit_precision, mask_values,
                        neighbour_mask,
                        unit_length_keys)

from .global_tokens import (GlobalTokens, columns_backward, global_rows_backward, global_rows_forward,
                            merge_columns)
from .window_kernel import (BlockMask, GatheredBlock, gathered_block_backward, gathered_block_forward,
                            window_block_backward, window_block_forward, windows)

BLOCK_ELEMENTS = 1 << 19  # mask elements per block (2 MiB in float32): 64 chunks of 64 with a 128-key window
BLOCKED = float(1 << 30)  # the position of a key no query may see (exact in float32 and float64)
POSITION_SCALE = float(1 << 30)  # the mask recipe's positions are scaled by this (exact), see MaskRecipe
EXACT_FLOAT32 = 1 << 24  # positions below this are exact integers in float32


def fused_kernel_available(device: torch.device, backend: str) -> bool:
    """Does the fused path run calls on `backend` (`backend.choose`'s pick) for tensors on `device`?

    Its native and Triton blocks run wherever the backend was chosen; its PyTorch blocks run PyTorch's CPU
    flash attention: CPU tensors only (elsewhere "torch" is the explicit chunk scores).
    """
    return backend in ("native", "triton") or (backend == "torch" and device.type == "cpu")


@dataclass
class MaskRecipe:
    """What the additive mask of any block is built from (all small: per chunk, not per query-key pair).

    Positions are floats scaled by 2^30 (exact: powers of two), so that a
    block's causal mask is two vectorised float passes,
    clamp((q - k) * 2^30, masked, 0): 0 where k <= q, and exactly `masked` where
    k > q, as (q - k) * 2^30 <= -2^30 < -1e9. Comparisons that produce bool
    tensors, and `where` on them, are several times slower on the CPU. A key
    that is not allowed sits at BLOCKED, after every query.
    """

    q_pos: torch.Tensor  # (bh, g, c): the position of each query, times POSITION_SCALE
    k_pos: torch.Tensor  # (bh, g, w): each window key's, BLOCKED * POSITION_SCALE where it is not allowed
    bias: torch.Tensor  # (bh, g, w): 0, or the masked value where the key is not allowed (non-causal masks)
    causal: bool
    band: float | None  # a key farther than this from the query (scaled positions) is not allowed; None: any
    self_value: float | None  # the query itself (LSH); None: no self mask (local attention)
    self_on_diagonal: bool  # each position is in a window once: the query itself is its own chunk's diagonal
    diagonal: int  # window offset of the own chunk: before * c
    masked_value: float
    dtype: torch.dtype  # of the mask: the queries' dtype

    def block(self, row: int, start: int, end: int) -> torch.Tensor:
        """(1, end - start, c, w) additive mask of chunks start..end of head row `row`."""
        q_pos = self.q_pos[row:row + 1, start:end, :, None]  # (1, G, c, 1)
        k_pos = self.k_pos[row:row + 1, start:end, None, :]  # (1, G, 1, w)
        if self.band is not None:
            additive = self._band_block(q_pos, k_pos, row, start, end)
        elif self.causal:
            additive = torch.sub(q_pos, k_pos).clamp_(self.masked_value, 0.0).to(self.dtype)  # (1, G, c, w)
        else:
            additive = self.bias[row:row + 1, start:end, None, :].expand(-1, -1, q_pos.shape[2], -1).clone()
        if self.self_value is not None:
            if self.self_on_diagonal:
                additive.diagonal(offset=self.diagonal, dim1=2, dim2=3).fill_(self.self_value)
            else:
                additive.masked_fill_(k_pos == q_pos, self.self_value)
        return additive

    def native_block(self, row: int, start: int, end: int) -> BlockMask:
        """What the native kernel builds the mask of chunks start..end of head row `row` from (the same values)."""
        self_mode = 0 if self.self_value is None else (1 if self.self_on_diagonal else 2)
        return BlockMask(q_pos=self.q_pos[row, start:end].to(torch.float64),
                         k_pos=self.k_pos[row, start:end].to(torch.float64),
                         bias=None if self.causal else self.bias[row, start:end], causal=self.causal, band=self.band,
                         self_mode=self_mode, diagonal=self.diagonal,
                         self_value=0.0 if self.self_value is None else self.self_value,
                         masked_value=self.masked_value)

    def _band_block(self, q_pos, k_pos, row: int, start: int, end: int) -> torch.Tensor:
        """(1, G, c, w) additive mask of a band: a key more than `band` away (or, causal, later) is masked.

        clamp(band - |q - k|, masked, 0) in scaled positions: 0 inside the band, and exactly `masked`
        one position outside it or farther. Causal adds clamp(q - k, masked, 0), non-causal the key bias.
        """
        offset = torch.sub(q_pos, k_pos)  # (1, G, c, w): q - k, times POSITION_SCALE
        if self.causal:
            additive = torch.rsub(offset, self.band).clamp_(self.masked_value, 0.0)
            additive += offset.clamp_(self.masked_value, 0.0)
        else:
            additive = offset.abs_().neg_().add_(self.band).clamp_(self.masked_value, 0.0)
            additive += self.bias[row:row + 1, start:end, None, :]
        return additive.to(self.dtype)


def blocks(g: int, c: int, w: int) -> list[tuple[int, int]]:
    """(first chunk, end chunk) blocks of one head row, of at most BLOCK_ELEMENTS mask elements."""
    size = max(1, min(g, BLOCK_ELEMENTS // (c * w)))
    return [(start, min(start + size, g)) for start in range(0, g, size)]


@dataclass
class Plan:
    """Where every row of the work comes from and goes to (index tensors; small next to the activations)."""

    rows: torch.Tensor  # (bh, g, c): the row of each query slot in q and in the output
    kv_source: torch.Tensor  # (bh, e): the row of each extended slot's key and value
    rank: torch.Tensor | None  # (bh, r, n): the slot of each position in each round; None: slots are positions
    recipe: MaskRecipe
    shape: tuple[int, int, int]  # (b, n, h) of the (b, n, h, d) rows
    window: tuple[int, int]  # chunks before and after
    scale: float  # logit scale
    global_tokens: GlobalTokens | None = None  # Longformer's global tokens: columns and rows (one round only)
    backend: str = "torch"  # who runs its blocks, the call's backend: "native", "triton", else PyTorch's CPU ones
    float32_products: str = ""  # Triton, float32 rows: "ieee" or "tf32", fixed by the forward for its backward

    @property
    def n_rows(self) -> int:
        b, n, h = self.shape
        return b * n * h

    def nbytes(self) -> int:
        """The bytes of its tensors (index tensors and mask recipe)."""
        recipe = self.recipe
        tokens = 0 if self.global_tokens is None else self.global_tokens.nbytes()
        return tokens + sum(tensor.nbytes for tensor in (self.rows, self.kv_source, self.rank, recipe.q_pos,
                                                         recipe.k_pos, recipe.bias) if tensor is not None)

    def head_row(self, rows: torch.Tensor, index: int) -> torch.Tensor:
        """Head row `index`'s (n, ...) strided view of rows in the (b, n, h, ...) layout."""
        b, n, h = self.shape
        return rows.view(b, n, h, *rows.shape[1:])[index // h, :, index % h]


class Budget(Protocol):
    """Room for what a replay keeps (the model hands down its step's `keep.KeepBudget`)."""

    def take(self, holder, nbytes: int) -> bool: ...  # make room for nbytes, or False


class Unlimited:
    """A budget that always has room."""

    def take(self, holder, nbytes: int) -> bool:
        return True


@dataclass(eq=False)
class KernelReplay:
    """What one kernel call keeps from its forward for an identical second call, the reversible recompute.

    The second call takes the plan and the output with its log-sum-exps from here instead of computing them
    again (`reversible_keep_attention`); the output is handed out once. When they do not fit in the budget,
    or a later layer's need the room, the replay gives up: it keeps nothing, and the second call computes
    everything again.
    """

    plan: Plan | None = None
    saved: tuple[torch.Tensor, ...] | None = None  # out, lse_slots, lse, lse_global (global tokens' rows)
    budget: Budget = field(default_factory=Unlimited)
    declined: bool = False  # it kept nothing, or it has served: it never keeps again

    def keep(self, plan: Plan, saved: tuple[torch.Tensor, ...]) -> None:
        """Keep the plan and `saved` if the budget makes room for them; otherwise give up."""
        if self.budget.take(self, plan.nbytes() + sum(tensor.nbytes for tensor in saved)):
            self.saved = saved
        else:
            self.give_up()

    def give_up(self) -> None:
        self.plan, self.saved, self.declined = None, None, True


def cached_plan(replay: KernelReplay | None, build) -> Plan:
    """The replay's plan, or build() (under no_grad), kept in the replay when there is one that has not declined."""
    if replay is not None and replay.plan is not None:
        return replay.plan
    with torch.no_grad():
        plan = build()
    if replay is not None and not replay.declined:
        replay.plan = plan
    return plan


class ChunkedAttention(torch.autograd.Function):
    """Rows of q, k, v (N, d) -> out (n_rows, d): each query row attends to its chunk's window, one softmax per row.

    k_rows None means shared query-keys (LSH): the keys are the query rows
    scaled to unit length (`normalize_keys`), block by block as they are
    gathered, and the gradient of both roles comes back as one.

    Everything of the size of (rows, d) or more is gathered, computed and
    written block by block; only the output, its log-sum-exps and the
    per-slot log-sum-exps are kept for the backward.
    """

    @staticmethod
    def forward(ctx, q_rows, k_rows, v_rows, plan: Plan, replay: KernelReplay | None = None, q_g_rows=None,
                k_g_rows=None, v_g_rows=None):
        """q_g_rows, k_g_rows, v_g_rows: the global tokens' own projections (all three or none: then q, k, v)."""
        if k_rows is None and plan.rank is None:
            raise ValueError("shared query-keys (k_rows None) need a sorted plan: build it without "
                             "in_position_order, as lsh_attention does")
        if plan.global_tokens is not None and (k_rows is None or plan.rank is not None and plan.rank.shape[1] > 1):
            raise ValueError("global tokens need separate keys (k_rows) and one round")
        if len({q_g_rows is None, k_g_rows is None, v_g_rows is None}) > 1:
            raise ValueError("give the global projections' rows q_g_rows, k_g_rows, v_g_rows all three, or none")
        global_rows = (q_rows, k_rows, v_rows) if q_g_rows is None else (q_g_rows, k_g_rows, v_g_rows)
        if replay is not None and replay.saved is not None:
            out, lse_slots, lse, lse_global = replay.saved
            replay.saved, replay.declined = None, True  # served once: a later call computes and keeps nothing
        else:
            out, lse_slots, lse, lse_global = ChunkedAttention._attend(q_rows, k_rows, v_rows, plan, *global_rows)
            if replay is not None and not replay.declined:
                replay.keep(plan, (out, lse_slots, lse, lse_global))
        ctx.save_for_backward(q_rows, k_rows, v_rows, lse_slots, out, lse, lse_global, q_g_rows, k_g_rows, v_g_rows)
        ctx.plan = plan
        return out

    @staticmethod
    def _attend(q_rows, k_rows, v_rows, plan: Plan, q_g_rows, k_g_rows, v_g_rows):
        """out (n_rows, d), lse_slots (bh, g, c), lse (n_rows,) float64 and the global rows' lse_global (bh, G)
        float64 (empty without global tokens), block by block."""
        bh, g, c = plan.rows.shape
        d, w = q_rows.shape[1], plan.recipe.k_pos.shape[-1]
        tokens = plan.global_tokens
        lse_global = q_rows.new_empty((bh, 0 if tokens is None else tokens.position.shape[1]), dtype=torch.float64)
        if plan.backend == "triton":  # every head row's blocks in one launch, then the global tokens row by row
            from . import triton_chunks
            out, lse_slots, lse = triton_chunks.attend(q_rows, k_rows, v_rows, plan)
            if tokens is not None:
                for row in range(bh):
                    with explicit_precision(q_rows.device):
                        _global_tokens_forward(plan, row, q_rows, k_rows, v_rows, q_g_rows, k_g_rows, v_g_rows, out,
                                               lse, lse_global[row])
            return out, lse_slots, lse, lse_global
        out = q_rows.new_empty(plan.n_rows, d)
        lse = q_rows.new_empty((plan.n_rows,), dtype=torch.float64)  # float64: exact near -1e5
        lse_slots = q_rows.new_empty(bh, g, c, dtype=accumulation_dtype(q_rows.dtype))  # as the kernel returns it
        out_slots = None if plan.rank is None else q_rows.new_empty(g * c, d)  # one head row's, reused
        gathered = _gathers_natively(plan, q_rows, k_rows, v_rows)
        for row in range(bh):
            target = plan.head_row(out, row) if plan.rank is None else out_slots  # (g * c, d) in slot order
            for start, end in blocks(g, c, w):
                if gathered:  # straight from the rows into out (position order) or the slots
                    block = _gathered_block(plan, row, start, end, q_rows, k_rows, v_rows)
                    into, index = (out, block.q_index) if plan.rank is None else (out_slots[start * c:end * c], None)
                    gathered_block_forward(block, into, index, lse_slots[row, start:end])
                    continue
                q, k_extended, v_extended, _ = _block_rows(plan, row, start, end, q_rows, k_rows, v_rows)
                out_block, lse_block = window_block_forward(q, k_extended, v_extended,
                                                            plan.recipe.block(row, start, end)[0], plan.scale,
                                                            native_kernel=False)
                target[start * c:end * c] = out_block.view(-1, d)  # (G, c, d) -> slots
                lse_slots[row, start:end] = lse_block
            if plan.rank is None:
                plan.head_row(lse, row).copy_(lse_slots[row].view(-1))
            else:
                _combine_rounds(plan.head_row(out, row), plan.head_row(lse, row), out_slots,
                                lse_slots[row].view(-1), plan.rank[row])
            if tokens is not None:
                with explicit_precision(q_rows.device):  # its products in float32 at least, under autocast too
                    _global_tokens_forward(plan, row, q_rows, k_rows, v_rows, q_g_rows, k_g_rows, v_g_rows, out,
                                           lse, lse_global[row])
        return out, lse_slots, lse, lse_global

    @staticmethod
    def backward(ctx, grad_out):  # (n_rows, d)
        q_rows, k_rows, v_rows, lse_slots, out, lse, lse_global, q_g_rows, k_g_rows, v_g_rows = ctx.saved_tensors
        plan = ctx.plan
        bh, g, c = plan.rows.shape
        d, w = q_rows.shape[1], plan.recipe.k_pos.shape[-1]
        # one round and no global tokens: the window's softmax is the whole softmax (its share is 1)
        one_round = (plan.rank is None or plan.rank.shape[1] == 1) and plan.global_tokens is None
        separate = q_g_rows is not None  # global projections of their own: their gradients too
        global_grads = [torch.zeros_like(x, dtype=accumulation_dtype(x.dtype)) for x in (q_g_rows, k_g_rows, v_g_rows)
                        ] if separate else [None] * 3
        if plan.backend == "triton":
            from . import triton_chunks
            grads = _TritonGradients(*triton_chunks.backward(grad_out, q_rows, k_rows, v_rows, out, lse, lse_slots,
                                                             plan, one_round, plan.global_tokens is not None),
                                     q_rows, k_rows, v_rows)
            rows = range(bh) if plan.global_tokens is not None else ()
        else:
            grads = _SlotGradients(plan, q_rows, k_rows, v_rows)
            rows = range(bh)
        work = accumulation_dtype(q_rows.dtype)  # bfloat16: the kernel's float32 backward is the faster one
        grad_out = grad_out.contiguous()
        gathered = _gathers_natively(plan, q_rows, k_rows, v_rows) and grad_out.dtype == q_rows.dtype
        for row in rows:
            grads.begin(row)
            for start, end in blocks(g, c, w) if plan.backend != "triton" else ():  # (Triton: done above)
                if gathered:
                    block = _gathered_block(plan, row, start, end, q_rows, k_rows, v_rows)
                    grads.add_gathered(block, start, end, grad_out, out, lse_slots[row, start:end],
                                       None if one_round else lse)
                    continue
                q, k_extended, v_extended, raw = _block_rows(plan, row, start, end, q_rows, k_rows, v_rows, work)
                rows = plan.rows[row, start:end].reshape(-1)  # (G * c,)
                lse_block = lse_slots[row, start:end]  # (G, c)
                grad_rows = grad_out.index_select(0, rows).to(work)
                if not one_round:
                    share = torch.exp(lse_block.reshape(-1).double() - lse.index_select(0, rows))  # w_r
                    grad_rows *= share.to(work)[:, None]
                dq, dk, dv = window_block_backward(grad_rows.view(end - start, c, d), q, k_extended, v_extended,
                                                   out.index_select(0, rows).to(work).view(end - start, c, d),
                                                   lse_block, plan.recipe.block(row, start, end)[0],
                                                   plan.scale, native_kernel=False)  # dq (G, c, d); dk, dv extended
                grads.add(start, end, dq, dk, dv, raw)
            grads.end()
            if plan.global_tokens is not None:
                own = (q_rows, k_rows, v_rows, grads.q, grads.k, grads.v)
                projections = (q_g_rows, k_g_rows, v_g_rows, *global_grads) if separate else own
                with explicit_precision(q_rows.device):
                    _global_tokens_backward(plan, row, own, projections, grad_out, out, lse, lse_global[row])
        if separate:
            global_grads = [grad.to(x.dtype) for grad, x in zip(global_grads, (q_g_rows, k_g_rows, v_g_rows))]
        return (*grads.result(), None, *global_grads)


def _global_tokens_forward(plan: Plan, row: int, q_rows, k_rows, v_rows, q_g_rows, k_g_rows, v_g_rows,
                           out: torch.Tensor, lse: torch.Tensor, lse_global: torch.Tensor) -> None:
    """Head row `row`'s global tokens: their columns merged into every query's softmax, then their rows written
    over their positions of out, with lse +inf there (`global_tokens`); lse_global (G,) gets the rows' own."""
    tokens = plan.global_tokens
    batch, work = row // plan.shape[2], accumulation_dtype(q_rows.dtype)
    position, present = tokens.position[batch], tokens.present[batch]  # (G,)
    outputs, sums = plan.head_row(out, row), plan.head_row(lse, row)  # (m, d), (m,)
    column_source = (k_g_rows, v_g_rows) if tokens.columns_from_global else (k_rows, v_rows)
    keys, values = (plan.head_row(x, row).index_select(0, position).to(work) for x in column_source)  # (G, d)
    merge_columns(tokens, batch, plan.head_row(q_rows, row), keys, values, outputs, sums, plan.scale)
    queries = plan.head_row(q_g_rows, row).index_select(0, position).to(work)  # (G, d)
    rows, lse_global[:] = global_rows_forward(tokens, batch, queries, plan.head_row(k_g_rows, row),
                                              plan.head_row(v_g_rows, row), plan.scale)
    written = position[present]
    outputs[written] = rows[present].to(outputs.dtype)
    sums[written] = torch.inf  # the overwritten window and columns get no gradient (their share is 0)


def _global_tokens_backward(plan: Plan, row: int, own: tuple, projections: tuple, grad_out, out, lse,
                            lse_global) -> None:
    """Head row `row`'s global tokens' gradients, added onto the gradient rows of the columns' keys and values
    and of the global projections. own, projections: (q, k, v rows, their gradient rows), for the window's
    projections and the global tokens' (the same when the layer has no separate ones)."""
    tokens = plan.global_tokens
    batch = row // plan.shape[2]
    position, present = tokens.position[batch], tokens.present[batch]  # (G,)
    q_rows, k_rows, v_rows, dq_rows, dk_rows, dv_rows = own
    q_g_rows, k_g_rows, v_g_rows, dq_g_rows, dk_g_rows, dv_g_rows = projections
    work = dq_rows.dtype
    grads, outputs, sums = plan.head_row(grad_out, row), plan.head_row(out, row), plan.head_row(lse, row)

    column_source = (k_g_rows, v_g_rows, dk_g_rows, dv_g_rows) if tokens.columns_from_global else (
        k_rows, v_rows, dk_rows, dv_rows)
    keys, values = (plan.head_row(x, row).index_select(0, position).to(work) for x in column_source[:2])
    d_keys, d_values = columns_backward(tokens, batch, plan.head_row(q_rows, row), keys, values, grads, outputs,
                                        sums, plan.head_row(dq_rows, row), plan.scale)
    for target, grad in zip(column_source[2:], (d_keys, d_values)):
        plan.head_row(target, row).index_add_(0, position, grad.to(target.dtype))

    queries = plan.head_row(q_g_rows, row).index_select(0, position).to(work)  # (G, d)
    grad_rows = grads.index_select(0, position).to(work).mul_(present[:, None])  # absent slots: no gradient
    d_queries = global_rows_backward(tokens, batch, queries, plan.head_row(k_g_rows, row),
                                     plan.head_row(v_g_rows, row), grad_rows,
                                     outputs.index_select(0, position).to(work), lse_global,
                                     plan.head_row(dk_g_rows, row), plan.head_row(dv_g_rows, row), plan.scale)
    plan.head_row(dq_g_rows, row).index_add_(0, position, d_queries.to(dq_g_rows.dtype))


class _TritonGradients:
    """The Triton kernels' gradients of q, k, v rows (k None for shared query-keys; float32 where the global
    tokens' backward adds onto them)."""

    def __init__(self, dq, dk, dv, q_rows, k_rows, v_rows):
        self.q, self.k, self.v = dq, dk, dv
        self.dtypes = [None if rows is None else rows.dtype for rows in (q_rows, k_rows, v_rows)]

    def begin(self, row: int) -> None:
        pass

    def end(self) -> None:
        pass

    def result(self) -> tuple:
        return _SlotGradients.result(self)


class _SlotGradients:
    """The gradients of q, k, v rows of one head row at a time, accumulated on its extended slots.

    A sorted plan (LSH) adds them onto buffers in slot order (`_SortedSlots`)
    and writes them by position at the end of the head row; a plan in position
    order (local attention) adds them straight onto the rows (`_PositionSlots`)
    and writes query gradients in place. Shared query-keys (sorted plans only):
    the keys' gradients go through the unit-length normalisation onto the
    query-key slots.
    """

    def __init__(self, plan: Plan, q_rows, k_rows, v_rows):
        self.plan, self.shared = plan, k_rows is None
        self.dtypes = [None if rows is None else rows.dtype for rows in (q_rows, k_rows, v_rows)]
        sums = [None if rows is None else torch.empty_like(rows, dtype=accumulation_dtype(rows.dtype))
                for rows in (q_rows, k_rows, v_rows)]  # bfloat16 rows: the gradients add up in float32
        self.q, self.k, self.v = sums
        slots = _PositionSlots if plan.rank is None else _SortedSlots
        self.q_slots = None if plan.rank is None else _SortedSlots(plan, self.q)  # None: dq goes in place
        self.k_slots = None if self.shared else slots(plan, self.k)
        self.v_slots = slots(plan, self.v)
        self.row = 0

    def begin(self, row: int) -> None:
        self.row = row
        for slots in (self.q_slots, self.k_slots, self.v_slots):
            if slots is not None:
                slots.begin(row)

    def add(self, start: int, end: int, dq, dk, dv, raw) -> None:
        """Block start..end's dq (G, c, d) and key and value gradients dk, dv on its extended rows
        ((G - 1) * c + w, d); raw: its extended query-keys (shared)."""
        c = dq.shape[1]
        if self.q_slots is None:  # position order: a query's slot is its position
            self.plan.head_row(self.q, self.row)[start * c:end * c].view(end - start, c, -1).copy_(dq)
        else:  # the queries' own slots follow the `before` chunks of the extended slots
            own = self.plan.window[0] * c
            self.q_slots.buffer[own + start * c:own + end * c].view(end - start, c, -1).add_(dq)
        if self.shared:  # through the unit-length keys, onto the query-key slots
            buffer = self.q_slots.buffer
            add_normalize_keys_backward_(buffer[start * c:start * c + dk.shape[0]], raw.to(buffer.dtype), dk)
        else:
            self.k_slots.add(start, dk)
        self.v_slots.add(start, dv)

    def add_gathered(self, block: GatheredBlock, start: int, end: int, grad_rows, out_rows, lse_block,
                     lse_rows) -> None:
        """Block start..end's gradients by the native kernel, straight onto the slot buffers (sorted plans), or
        dq onto the query rows and the key and value gradients folded as in `add` (position order)."""
        c, extended, d = block.q_index.shape[1], block.kv_index.shape[0], block.q_rows.shape[1]
        if self.q_slots is None:
            dk, dv = (block.q_rows.new_empty(extended, d) for _ in range(2))
            gathered_block_backward(block, grad_rows, out_rows, lse_block, lse_rows, self.q, block.q_index, False,
                                    dk, dv, False)
            self.k_slots.add(start, dk)
            self.v_slots.add(start, dv)
            return
        own = self.plan.window[0] * c  # the queries' own slots follow the `before` chunks of the extended slots
        span = slice(start * c, start * c + extended)
        dk = (self.q_slots if self.shared else self.k_slots).buffer[span]
        gathered_block_backward(block, grad_rows, out_rows, lse_block, lse_rows,
                                self.q_slots.buffer[own + start * c:own + end * c], None, True, dk,
                                self.v_slots.buffer[span], True)

    def end(self) -> None:
        for slots in (self.q_slots, self.k_slots, self.v_slots):
            if slots is not None:
                slots.end()

    def result(self) -> tuple:
        """The gradients of q_rows, k_rows, v_rows (each in its rows' dtype), and None for the plan."""
        return (*(None if grad is None else grad.to(dtype) for grad, dtype in zip((self.q, self.k, self.v),
                                                                                   self.dtypes)), None)


class _SortedSlots:
    """A head row's gradients on its extended slots in sorted order, a buffer, written by position at the end."""

    def __init__(self, plan: Plan, rows: torch.Tensor):
        self.plan, self.rows, self.row = plan, rows, 0
        self.c = plan.rows.shape[2]
        self.buffer = rows.new_empty(plan.kv_source.shape[1], rows.shape[1])  # (e, d), reused by every head row

    def begin(self, row: int) -> None:
        self.row = row
        self.buffer.zero_()

    def add(self, start: int, grad_extended: torch.Tensor) -> None:
        """Add the gradients of the extended rows ((G - 1) * c + w, d) of the block from chunk `start`."""
        self.buffer[start * self.c:start * self.c + grad_extended.shape[0]] += grad_extended

    def end(self) -> None:
        _slots_to_positions(self.plan, self.row, self.rows, self.buffer)


class _PositionSlots:
    """A position-ordered head row's extended slots without a copy: the row itself, and the wrapped chunks apart.

    Extended chunk j is one of the `before` chunks in front (j < before), the
    row's chunk j - before, or one of the `after` chunks behind. The chunks in
    front stand for the row's last chunks and those behind for its first, so
    `end` adds them there.
    """

    def __init__(self, plan: Plan, rows: torch.Tensor):
        self.plan, self.rows = plan, rows
        self.c = plan.rows.shape[2]
        self.before, self.after = plan.window
        self.edges = rows.new_empty(self.before + self.after, self.c, rows.shape[1])  # (before + after, c, d)
        self.main = None

    def begin(self, row: int) -> None:
        head_row = self.plan.head_row(self.rows, row)  # (n, d), a strided view: the gradients land there
        self.main = head_row.zero_().view(-1, self.c, head_row.shape[-1])  # (g, c, d)
        self.edges.zero_()

    def add(self, start: int, grad_extended: torch.Tensor) -> None:
        """Add the gradients of the extended rows ((G - 1) * c + w, d) of the block from chunk `start`."""
        values = grad_extended.view(-1, self.c, grad_extended.shape[-1])  # (G - 1 + w / c, c, d): extended chunks
        g, last = self.main.shape[0], start + values.shape[0]
        segments = ((0, self.before, self.edges[:self.before]), (self.before, self.before + g, self.main),
                    (self.before + g, self.before + g + self.after, self.edges[self.before:]))
        for low, high, target in segments:
            a, b = max(start, low), min(last, high)
            if a < b:
                target[a - low:b - low] += values[a - start:b - start]

    def end(self) -> None:
        _add_wrapped(self.main, self.edges[:self.before], self.edges[self.before:])


def _gathers_natively(plan: Plan, q_rows, k_rows, v_rows) -> bool:
    """Does the native kernel read this call's blocks straight from its rows (its backend, the rows' layout)?"""
    rows = [t for t in (q_rows, k_rows, v_rows) if t is not None]
    return (plan.backend == "native" and plan.recipe.dtype == q_rows.dtype
            and all(t.dtype == q_rows.dtype and t.is_contiguous() for t in rows))


def _gathered_block(plan: Plan, row: int, start: int, end: int, q_rows, k_rows, v_rows) -> GatheredBlock:
    """Chunks start..end of head row `row` for the native kernel: indices into the rows, and the mask's recipe."""
    c, w = plan.rows.shape[2], plan.recipe.k_pos.shape[-1]
    return GatheredBlock(q_rows=q_rows, k_rows=k_rows, v_rows=v_rows, q_index=plan.rows[row, start:end],
                         kv_index=plan.kv_source[row, start * c:(end - 1) * c + w],
                         mask=plan.recipe.native_block(row, start, end), scale=plan.scale)


def _block_rows(plan: Plan, row: int, start: int, end: int, q_rows, k_rows, v_rows, dtype=None):
    """Queries (G, c, d), keys and values of the extended rows ((G - 1) * c + w, d) of chunks start..end, and
    (shared) the raw extended rows.

    Shared query-keys (k_rows None): the queries are the middle of the
    gathered extended rows, and the keys a unit-length copy of them, computed
    in float32 at least and rounded to the rows' dtype. dtype: the dtype of
    the returned queries, keys and values (default: the rows').
    """
    c, d, w = plan.rows.shape[2], q_rows.shape[1], plan.recipe.k_pos.shape[-1]
    g = end - start
    dtype = dtype or q_rows.dtype
    extended = plan.kv_source[row, start * c:(end - 1) * c + w]
    raw = None
    if k_rows is None:
        raw = q_rows.index_select(0, extended)  # ((G - 1) * c + w, d)
        own = plan.window[0] * c  # the block's own chunks start after the `before` chunks
        q = raw[own:own + g * c].to(dtype).view(g, c, d)
        k_extended = unit_length_keys(raw.to(accumulation_dtype(raw.dtype))).to(raw.dtype).to(dtype)
    else:
        q = q_rows.index_select(0, plan.rows[row, start:end].reshape(-1)).to(dtype).view(g, c, d)
        k_extended = k_rows.index_select(0, extended).to(dtype)
    return q, k_extended, v_rows.index_select(0, extended).to(dtype), raw


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor, out_slots: torch.Tensor, lse_slots: torch.Tensor,
                    rank: torch.Tensor) -> None:
    """One head row's rounds -> its positions: out (n, d) = sum_r exp(lse_r - lse) o_r, lse (n,) = logsumexp_r."""
    r, n = rank.shape
    per_round = lse_slots.index_select(0, rank.view(-1)).view(r, n).double()  # (r, n)
    total = torch.logsumexp(per_round, dim=0)  # (n,)
    lse.copy_(total)
    if r == 1:
        out.copy_(out_slots.index_select(0, rank[0]))
        return
    dtype = accumulation_dtype(out.dtype)
    weights = torch.exp(per_round - total).to(dtype)  # (r, n)
    combined = out_slots.index_select(0, rank[0]).to(dtype).mul_(weights[0, :, None])  # (n, d): round 0 by position
    for round_rank, weight in zip(rank[1:], weights[1:]):  # round by round: cache-sized gathers
        combined.addcmul_(out_slots.index_select(0, round_rank), weight[:, None])
    out.copy_(combined)


def _add_wrapped(main: torch.Tensor, front: torch.Tensor, back: torch.Tensor) -> None:
    """Fold wrapped-around rows onto main (L, ...): front (F, ...) stands for main's last F rows, cyclically,
    and back (B, ...) for its first B (a window may wrap around more than once when it is longer than main)."""
    _add_cyclic(main, front, -front.shape[0])
    _add_cyclic(main, back, 0)


def _add_cyclic(main: torch.Tensor, rows: torch.Tensor, first: int) -> None:
    """main[(first + t) mod L] += rows[t] for every t, in contiguous pieces."""
    length, t = main.shape[0], 0
    while t < rows.shape[0]:
        at = (first + t) % length
        size = min(length - at, rows.shape[0] - t)
        main[at:at + size] += rows[t:t + size]
        t += size


def _slots_to_positions(plan: Plan, row: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Write head row `row`'s gradients from its extended slots (e, d), in sorted order, into rows by position."""
    c = plan.rows.shape[2]
    before, after = plan.window[0] * c, plan.window[1] * c
    main = slots[before:slots.shape[0] - after]  # fold the chunks that wrap around onto the slots they stand for
    _add_wrapped(main, slots[:before], slots[slots.shape[0] - after:])
    rank = plan.rank[row]  # (r, n)
    total = main.index_select(0, rank[0])  # (n, d): round by round, not one (r * n, d) gather (cache-sized)
    for round_rank in rank[1:]:
        total += main.index_select(0, round_rank)
    plan.head_row(rows, row).copy_(total)


# --- plans: index tensors and mask recipes ---------------------------------------------------------

def projection_rows(x: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) as rows (b*n*h, d) of the (b, n, h, d) layout: a view of the projections' own output."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n * h, d)


def chunk_plan(flat_order, mask, n, c, causal, wrap, window, dtype, *, scale, self_value, self_on_diagonal,
               in_position_order: bool = False, band: int | None = None,
               mask_positions: torch.Tensor | None = None, global_tokens: GlobalTokens | None = None,
               backend: str = "torch") -> Plan:
    """Index tensors and mask recipe of the fused kernel for slot -> position maps flat_order (b, h, r*n).

    Rounds are n positions long; a window is (before + 1 + after) chunks of c.
    in_position_order: flat_order is 0..n-1 in every head row (local attention).
    band: a query sees no key more than `band` away, in mask positions (sliding windows).
    mask_positions: (b, h, r*n) integer positions of the slots that the causal and band masks compare
    (default flat_order); dilated sliding windows give each residue class its own range.
    global_tokens: Longformer's global tokens (`global_tokens.GlobalTokens`; one round only).
    backend: the call's backend, who runs the blocks: "native", "triton", else PyTorch's CPU flash attention.
    """
    b, h, rn = flat_order.shape
    g, per_round = rn // c, n // c
    before, after = window
    w = (before + 1 + after) * c
    slot_index = torch.arange(-before * c, rn + after * c, device=flat_order.device) % rn
    extended = flat_order[..., slot_index]  # (b, h, e)
    positions = flat_order if mask_positions is None else mask_positions
    recipe = window_recipe(positions, positions[..., slot_index], extended, mask, g, c, w, per_round, causal,
                           wrap, window, accumulation_dtype(dtype), self_value=self_value,
                           self_on_diagonal=self_on_diagonal, band=band)
    rank = None
    if not in_position_order:
        r = rn // n
        slots = torch.arange(rn, device=flat_order.device).view(r, n).expand(b, h, r, n)
        rank = torch.empty_like(slots).scatter_(-1, flat_order.view(b, h, r, n), slots).view(b * h, r, n)
    return Plan(rows=output_rows(flat_order, n).view(b * h, g, c), kv_source=output_rows(extended, n).view(b * h, -1),
                rank=rank, recipe=recipe, shape=(b, n, h), window=window, scale=scale,
                global_tokens=global_tokens, backend=backend)


def output_rows(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of a (b, n, h, d) output viewed as (b*n*h, d) for (b, h, m) positions."""
    b, h = positions.shape[:2]
    batch = torch.arange(b, device=positions.device).view(b, 1, 1)
    head = torch.arange(h, device=positions.device).view(1, h, 1)
    return (batch * n + positions) * h + head


def window_recipe(q_positions, k_positions, extended, mask, g, c, w, per_round, causal, wrap, window, dtype, *,
                  self_value, self_on_diagonal, band=None) -> MaskRecipe:
    """The small tensors the fused kernel builds each block's additive mask from.

    q_positions (b, h, r*n) and k_positions (b, h, e): the mask positions of the query and extended slots;
    extended (b, h, e): the extended slots' sequence positions (which keys are real).
    """
    b, h = q_positions.shape[:2]
    _, masked_value = mask_values(dtype)
    key_real = mask[:, None, :].expand(b, h, mask.shape[1]).gather(-1, extended).view(b * h, -1)  # (bh, e)
    in_layout = neighbour_mask(g, per_round, *window, wrap, q_positions.device).repeat_interleave(c, dim=1)  # (g, w)
    key_ok = windows(key_real, g, c, w) & in_layout  # (bh, g, w)
    largest = q_positions.shape[-1] if band is None else max(q_positions.shape[-1], int(q_positions.max()) + band + 1)
    exact = dtype == torch.float64 or largest >= EXACT_FLOAT32  # float32 holds these positions exactly
    position_dtype = torch.float64 if exact else torch.float32
    k_pos = windows(k_positions.reshape(b * h, -1).to(position_dtype), g, c, w).masked_fill(~key_ok, BLOCKED)
    k_pos *= POSITION_SCALE
    bias = torch.zeros(key_ok.shape, dtype=dtype, device=key_ok.device).masked_fill_(~key_ok, masked_value)
    q_pos = q_positions.reshape(b * h, g, c).to(position_dtype) * POSITION_SCALE
    return MaskRecipe(q_pos=q_pos, k_pos=k_pos, bias=bias, causal=causal,
                      band=None if band is None else band * POSITION_SCALE,
                      self_value=self_value, self_on_diagonal=self_on_diagonal, diagonal=window[0] * c,
                      masked_value=masked_value, dtype=dtype)
