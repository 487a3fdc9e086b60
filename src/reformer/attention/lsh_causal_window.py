"""Prefix-consistent causal LSH: each query attends to the latest keys of its own bucket, never to the future.

Legend: b batch, h heads, r rounds, n length (a chunk multiple), d head width, c chunk length,
W the window (keys per round), g = r * n / c chunks, w = (ceil(W / c) + 1) * c window slots per chunk.

Standard causal LSH masks later positions, but a later token's bucket still moves the chunk boundaries
of the sorted sequence, so an earlier query sees other keys when the future changes. Here, in every
round, query i sees the W latest real keys before it in its own bucket, and itself at the self logit
(so it counts only when nothing else is allowed). In sorted (bucket, position) order those keys are
the W slots right before the query's, so a query's keys depend on tokens <= i only.

The work is chunked as in standard LSH: each chunk of c sorted slots scores its queries against its
w-slot window (one matrix product per chunk). The scores are then skewed into a layout relative to
each query (column t = the key W - t slots before it, column W = itself), where the mask, the softmax
and the dropout act: that layout does not depend on where the chunk boundaries fall, so the
floating-point reductions of a row never change with later tokens, and the logits at positions <= t
stay bit for bit the same. The probabilities are skewed back for the product with the values, where
the entries outside the window are exact zeros. Rounds combine by log-sum-exp; `dedup` counts a key
seen in several rounds once.

One assumption remains: in that last product a query's non-zero weights sit at columns that move with
its offset in the chunk. The result is unchanged only if the matrix product sums each output over the
window in order, so that the zeros add exactly nothing. PyTorch's CPU kernels do; the bit-identity
tests (`tests/attention/test_lsh_causal_window.py`, `tests/test_prefix_consistent.py`) would catch a
kernel that splits that sum differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rng import dropout as seeded_dropout
from .chunking import look_adjacent, mask_values, normalize_keys
from .hashing import gather_rows, sort_by_bucket


def check_causal_window(causal_window: int, causal: bool, wrap: bool) -> None:
    if not isinstance(causal_window, int) or isinstance(causal_window, bool) or causal_window < 1:
        raise ValueError(f"causal_window must be an integer >= 1 (keys per round), got {causal_window!r}")
    if not causal:
        raise ValueError("causal_window is the prefix-consistent variant of causal LSH; set causal=True, "
                         "or causal_window=None for bidirectional LSH")
    if wrap:
        raise ValueError("causal_window attends inside each round's buckets; it has no wrap-around layout, "
                         "set wrap=False")


def attend_causal_window(qk, v, buckets, mask, *, chunk_size: int, window: int, dedup: bool, dropout: float,
                         dropout_seed: int | None, normalized):
    """Per-round outputs (b, h, r, n, d) and log-sum-exps (b, h, r, n) of the causal-window variant.

    qk, v (b, h, n, d) with n a multiple of chunk_size; buckets (b, h, r, n) with padding in its own bucket;
    mask (b, n) bool.
    """

    b, h, r, n = buckets.shape
    d, c = qk.shape[-1], chunk_size
    g = r * n // c
    before = -(-window // c)
    w = (before + 1) * c
    order, rank = sort_by_bucket(buckets)  # (b, h, r, n) each
    flat_order = order.reshape(b, h, r * n)  # (b, h, r*n): the position at each sorted slot

    q = gather_rows(qk, flat_order).view(b, h, g, c, d)  # (b, h, g, c, d)
    k = look_adjacent(gather_rows(normalize_keys(qk), flat_order).view(b, h, g, c, d), before, 0)  # (b, h, g, w, d)
    vw = look_adjacent(gather_rows(v, flat_order).view(b, h, g, c, d), before, 0)  # (b, h, g, w, d)
    scores = to_relative(q @ k.transpose(-1, -2), window)  # (b, h, g, c, W + 1)

    allowed = _relative_allowed(buckets, order, mask, c, window)  # (b, h, g, c, W + 1)
    self_value, masked_value = mask_values(scores.dtype)
    logits = scores.masked_fill(~allowed, masked_value)
    logits = torch.cat([logits[..., :window], torch.full_like(logits[..., window:], self_value)], dim=-1)
    if dedup:
        counts = _round_counts(buckets, order, rank, c, window)  # (b, h, g, c, W + 1)
        logits = logits - torch.log(counts.to(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (b, h, g, c, 1)
    probs = seeded_dropout(normalized(logits, -1, lse), dropout, dropout_seed)  # (b, h, g, c, W + 1)
    out = from_relative(probs, w) @ vw  # (b, h, g, c, d)

    undo = (rank + torch.arange(r, device=rank.device)[:, None] * n).reshape(b, h, r * n)  # (b, h, r*n)
    out = gather_rows(out.reshape(b, h, r * n, d), undo).view(b, h, r, n, d)  # (b, h, r, n, d)
    lse = lse.reshape(b, h, r * n).gather(2, undo).view(b, h, r, n)  # (b, h, r, n)
    return out, lse


def to_relative(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Chunk scores (..., c, w) -> (..., c, W + 1): row o's column t is window slot o + w - c - W + t.

    That is the key W - t slots before the query (t = W: the query itself), a skewed view, copied.
    """
    *lead, c, w = scores.shape
    flat = scores.reshape(-1, c, w).contiguous()  # (B, c, w)
    rows = flat.shape[0]
    relative = torch.as_strided(flat, (rows, c, window + 1), (c * w, w + 1, 1), storage_offset=w - c - window)
    return relative.reshape(*lead, c, window + 1)


def from_relative(relative: torch.Tensor, w: int) -> torch.Tensor:
    """The inverse of `to_relative`: (..., c, W + 1) -> (..., c, w), zeros outside the window."""
    *lead, c, span = relative.shape
    flat = relative.reshape(-1, c, span)
    rows = flat.shape[0]
    zeros = flat.new_zeros(rows, c, w)
    out = torch.as_strided_scatter(zeros, flat, (rows, c, span), (c * w, w + 1, 1), storage_offset=w - c - (span - 1))
    return out.view(*lead, c, w)


def _relative_windows(x: torch.Tensor, window: int, fill) -> torch.Tensor:
    """x (b, h, r, n) in sorted order -> (b, h, r, n, W + 1): the W slots before each slot, then the slot."""
    padded = F.pad(x, (window, 0), value=fill)  # (b, h, r, W + n): slots before a round's first are `fill`
    return padded.unfold(-1, window + 1, 1)  # (b, h, r, n, W + 1)


def _relative_allowed(buckets, order, mask, chunk_size: int, window: int) -> torch.Tensor:
    """(b, h, g, c, W + 1) bool: the key slot is in the query's round and bucket, and a real token."""
    b, h, r, n = buckets.shape
    sorted_buckets = buckets.gather(-1, order)  # (b, h, r, n)
    key_buckets = _relative_windows(sorted_buckets, window, -1)  # (b, h, r, n, W + 1)
    real = mask[:, None, None, :].expand(b, h, r, n).gather(-1, order)  # (b, h, r, n)
    key_real = _relative_windows(real, window, False)  # (b, h, r, n, W + 1)
    allowed = (key_buckets == sorted_buckets[..., None]) & key_real
    return allowed.reshape(b, h, r * n // chunk_size, chunk_size, window + 1)


def _round_counts(buckets, order, rank, chunk_size: int, window: int) -> torch.Tensor:
    """(b, h, g, c, W + 1): in how many rounds the query sees each key of its window (itself: every round).

    Query i sees key j in round a' when they share a bucket there and j is 1..W slots before i.
    Entries outside the window count 1 (they are masked anyway).
    """
    b, h, r, n = buckets.shape
    q_pos = order  # (b, h, r, n): the query at each sorted slot
    k_pos = _relative_windows(order, window, 0)  # (b, h, r, n, W + 1)
    counts = torch.zeros(k_pos.shape, dtype=torch.int32, device=order.device)
    for other in range(r):
        rank_of, bucket_of = rank[:, :, other], buckets[:, :, other]  # (b, h, n) by position

        def at(table, pos):
            return table.gather(-1, pos.reshape(b, h, -1)).view(pos.shape)

        gap = at(rank_of, q_pos)[..., None] - at(rank_of, k_pos)  # (b, h, r, n, W + 1)
        same = at(bucket_of, q_pos)[..., None] == at(bucket_of, k_pos)
        counts += same & (gap >= 1) & (gap <= window)
    counts[..., window] = r  # the query itself, in every round
    return counts.clamp_(min=1).reshape(b, h, r * n // chunk_size, chunk_size, window + 1)
