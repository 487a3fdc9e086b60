"""Longformer's global tokens inside the fused chunk attention, one head row at a time.

Legend: m positions of a head row, d head width, G global tokens (the most that any batch row has),
B rows or keys of a block (BLOCK_ELEMENTS // max(G, d): a block's scores stay small).

A global token plays two parts (Beltagy et al. 2020, section 3.1; HF's LongformerSelfAttention):
- a column: every query sees its key beside its window. Its scores join the query's softmax by a
  log-sum-exp merge after the window's (`merge_columns`): lse' = logaddexp(lse, lse_c) and
  o' = exp(lse - lse') o + exp(s_c - lse') v_c.
- a row: its own query over every key it may see (`global_rows_forward`), in blocks of keys merged the
  same way, then written over its position. That position's log-sum-exp becomes +inf, so that the window
  and the columns get no gradient from the overwritten output: their share exp(lse_part - lse) is 0.

The backward of each recomputes its scores from the saved log-sum-exps (flash-attention style):
dS = P (dO . v - rowsum(dO * o)), dq = scale dS k, dk = scale dS^T q, dv = P^T dO. Nothing of size
m * G outlives a block. The functions take a head row's tensors (views of the rows) and the batch row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunking import mask_values

BLOCK_ELEMENTS = 1 << 19  # scores per block (2 MiB in float32)


@dataclass(frozen=True)
class GlobalTokens:
    """Where the global tokens are, and what their rows may see; small next to the activations."""

    position: torch.Tensor  # (b, G) int64: each global token's position (absent slots: any position)
    present: torch.Tensor  # (b, G) bool: which slots are global tokens (batch rows have different counts)
    key_real: torch.Tensor  # (b, m) bool: the keys a global row may see (real tokens)
    causal: bool  # a column is seen from its position on; a row sees keys up to its position
    columns_from_global: bool  # the columns take the global projections' keys and values ("global_kv" rule)

    def nbytes(self) -> int:
        return self.position.nbytes + self.present.nbytes + self.key_real.nbytes

    def block(self, d: int) -> int:
        """Rows (columns) or keys (global rows) per block."""
        return max(1, BLOCK_ELEMENTS // max(1, self.position.shape[1], d))

    def column_mask(self, batch: int, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """(end - start, G) additive mask of the columns for the queries at positions start..end."""
        allowed = self.present[batch][None, :]  # (1, G)
        if self.causal:
            queries = torch.arange(start, end, device=allowed.device)[:, None]  # (B, 1)
            allowed = allowed & (self.position[batch][None, :] <= queries)  # (B, G)
        return _additive(allowed, dtype).expand(end - start, -1)

    def row_mask(self, batch: int, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """(G, end - start) additive mask of the global rows over the keys at positions start..end."""
        allowed = self.key_real[batch, start:end][None, :]  # (1, B)
        if self.causal:
            keys = torch.arange(start, end, device=allowed.device)[None, :]  # (1, B)
            allowed = allowed & (keys <= self.position[batch][:, None])  # (G, B)
        return _additive(allowed, dtype).expand(self.position.shape[1], -1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, masked_value = mask_values(dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, masked_value)


def _merge(out: torch.Tensor, lse: torch.Tensor, logits: torch.Tensor, values: torch.Tensor) -> None:
    """Merge a block of scores (R, K) over values (K, d) into out (R, d) with log-sum-exps lse (R,) float64,
    in place: out = exp(lse - lse') out + exp(s - lse') values, lse' = logaddexp(lse, logsumexp(s)). The
    logits are consumed (one exp over them); out is in the logits' dtype (it may be a strided view)."""
    peak = logits.amax(dim=-1, keepdim=True)  # (R, 1)
    weights = logits.sub_(peak).exp_()  # (R, K): exp(s - peak)
    peak = peak[:, 0].double()
    total = torch.logaddexp(lse, peak + weights.sum(dim=-1).double().log())  # with the block's log-sum-exp
    out.mul_(torch.exp(lse - total).to(out.dtype)[:, None])
    out.addmm_(weights.mul_(torch.exp(peak - total).to(weights.dtype)[:, None]), values)  # exp(s - lse') values
    lse.copy_(total)


def merge_columns(tokens: GlobalTokens, batch: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
    """The columns keys, values (G, d) into the head row's window outputs out (m, d) and log-sum-exps lse (m,)
    float64, in place, for its queries (m, d); keys and values in the dtype the scores are computed in."""
    step = tokens.block(keys.shape[1])
    for start in range(0, queries.shape[0], step):
        end = min(start + step, queries.shape[0])
        logits = torch.mm(queries[start:end].to(keys.dtype), keys.t()).mul_(scale)  # (B, G)
        logits += tokens.column_mask(batch, start, end, logits.dtype)
        block = out[start:end].to(keys.dtype)  # a copy only when out is in a lower precision (bfloat16)
        _merge(block, lse[start:end], logits, values)
        if block.data_ptr() != out[start:end].data_ptr():
            out[start:end] = block


def columns_backward(tokens: GlobalTokens, batch: int, queries: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns' share of the gradients: adds onto dq (m, d); returns dk, dv (G, d) of the columns.
    grad, out (m, d): the head row's output gradient and output; lse (m,): its merged log-sum-exps."""
    step = tokens.block(keys.shape[1])
    d_keys, d_values = torch.zeros_like(keys), torch.zeros_like(values)
    for start in range(0, queries.shape[0], step):
        end = min(start + step, queries.shape[0])
        q_block, grad_block = queries[start:end].to(keys.dtype), grad[start:end].to(keys.dtype)  # (B, d)
        logits = torch.mm(q_block, keys.t()).mul_(scale).add_(tokens.column_mask(batch, start, end, keys.dtype))
        probabilities = logits.sub_(lse[start:end].to(keys.dtype)[:, None]).exp_()  # (B, G)
        delta = (grad_block * out[start:end].to(keys.dtype)).sum(-1, keepdim=True)  # (B, 1)
        d_values.addmm_(probabilities.t(), grad_block)
        d_scores = torch.mm(grad_block, values.t()).sub_(delta).mul_(probabilities)  # (B, G)
        dq[start:end].addmm_(d_scores.to(dq.dtype), keys.to(dq.dtype), alpha=scale)
        d_keys.addmm_(d_scores.t(), q_block, alpha=scale)
    return d_keys, d_values


def global_rows_forward(tokens: GlobalTokens, batch: int, queries: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The global queries (G, d) over the head row's keys and values (m, d), block of keys by block:
    outputs (G, d) in the queries' dtype and log-sum-exps (G,) float64."""
    out = queries.new_zeros(queries.shape)
    lse = torch.full(queries.shape[:1], -torch.inf, dtype=torch.float64, device=queries.device)
    step = tokens.block(queries.shape[1])
    for start in range(0, keys.shape[0], step):
        end = min(start + step, keys.shape[0])
        logits = torch.mm(queries, keys[start:end].to(queries.dtype).t()).mul_(scale)  # (G, B)
        logits += tokens.row_mask(batch, start, end, logits.dtype)
        _merge(out, lse, logits, values[start:end].to(queries.dtype))
    return out, lse


def global_rows_backward(tokens: GlobalTokens, batch: int, queries: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         dk: torch.Tensor, dv: torch.Tensor, scale: float) -> torch.Tensor:
    """The global rows' gradients: adds onto dk, dv (m, d) of the head row's keys and values; returns dq (G, d).
    queries, grad, out (G, d): the global queries, their outputs' gradients (zero for absent slots) and
    outputs, in the dtype the scores are computed in; lse (G,) float64."""
    step = tokens.block(queries.shape[1])
    delta = (grad * out).sum(-1, keepdim=True)  # (G, 1)
    dq = torch.zeros_like(queries)
    for start in range(0, keys.shape[0], step):
        end = min(start + step, keys.shape[0])
        k_block, v_block = keys[start:end].to(queries.dtype), values[start:end].to(queries.dtype)  # (B, d)
        logits = torch.mm(queries, k_block.t()).mul_(scale).add_(tokens.row_mask(batch, start, end, queries.dtype))
        probabilities = logits.sub_(lse.to(queries.dtype)[:, None]).exp_()  # (G, B)
        dv[start:end].addmm_(probabilities.t().to(dv.dtype), grad.to(dv.dtype))
        d_scores = torch.mm(grad, v_block.t()).sub_(delta).mul_(probabilities)  # (G, B)
        dq.addmm_(d_scores, k_block, alpha=scale)
        dk[start:end].addmm_(d_scores.t().to(dk.dtype), queries.to(dk.dtype), alpha=scale)
    return dq
