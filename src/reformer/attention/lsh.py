"""LSH attention (Reformer, Kitaev et al. 2020, §2 and Appendix A) as a pure tensor function.

Legend: b batch, h heads, n length (padded to a chunk multiple), d head width,
r hash rounds, g chunks over all rounds (r * n / c), c chunk length,
w = (chunks_before + 1 + chunks_after) * c window (2c by default).

Per round: hash each query-key with angular LSH, sort by (bucket, position),
cut into chunks of `chunk_size`; every chunk attends to itself and to the
previous chunk (or, with `chunks_before` / `chunks_after`, to that many chunks
before and after it). The rounds are combined with their log-sum-exp weights, so the
result is a single softmax over every (round, key) a query saw.

Layouts:
- wrap=False (default): each round is chunked on its own and a round's first
  chunk has no predecessor. Padding sorts to the end of every round (it has its
  own bucket), so right padding never changes what real tokens see.
- wrap=True: the Trax / HF layout. Rounds are concatenated before chunking, and
  the look-back crosses rounds and wraps from the first chunk to the last.

Normalisation: the attention weights inside a chunk and the weights of the
rounds are softmaxes, computed exactly (`normalize="softmax"`). Trax and HF
compute them as exp(x - logsumexp(x)); in float32, where a query sees only
itself (logit -1e5, float32 spacing 0.0078 there), those weights are off by
up to 0.4%. `normalize="hf"` reproduces that, for parity with HF checkpoints.
"""

from __future__ import annotations

import math

import torch

from ._chunking import (
    check_attention_mask,
    check_chunk_size,
    check_qkv,
    check_window,
    explicit_precision,
    look_adjacent,
    mask_values,
    neighbour_mask,
    normalize_keys,
    pad_length,
    padded_length,
    padded_mask,
    upcast,
    zero_masked_queries,
    zero_padded,
)
from ..config import validate_n_buckets
from .fused_chunks import (ChunkedAttention, KernelReplay, cached_plan, chunk_plan, fused_kernel_available,
                           projection_rows)
from . import native
from .lsh_causal_window import attend_causal_window, check_causal_window
from ..rng import dropout as seeded_dropout

Buckets = int | tuple[int, ...]
HASH_PIECE_ELEMENTS = 1 << 20  # rotated coordinates hashed at a time (4 MiB in float32: heap-sized temporaries)


# ---------------------------------------------------------------------------
# bucket arithmetic
# ---------------------------------------------------------------------------

def bucket_factors(n_buckets: Buckets) -> tuple[int, ...]:
    return (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)


def total_buckets(n_buckets: Buckets) -> int:
    """Number of real buckets; padded tokens go to one more, with this index."""
    return math.prod(bucket_factors(n_buckets))


def rotation_size(n_buckets: Buckets) -> int:
    """Columns of the random rotation: a//2 + b//2 + ... for factors a, b, ..."""
    return sum(f // 2 for f in bucket_factors(n_buckets))


def n_buckets_for_length(length: int, chunk_size: int) -> Buckets:
    """The paper's rule n_buckets = 2 * length / chunk (Trax `hash_vectors`).

    Above 128 buckets, factorise into two factors, as Trax does.
    """
    n = 2 * max(1, length // chunk_size)
    if n <= 128:
        return n
    div = 2 ** math.ceil(math.log2(math.sqrt(n)))
    return div, 2 * (n // (2 * div))


def n_buckets_hf_rule(length: int, chunk_size: int, max_positions: int) -> Buckets:
    """HF's `_set_num_buckets`: the largest power of two <= 2 * length / chunk (at least 2).

    Above 2 * max(int(sqrt(max_positions / chunk)), chunk) it is factorised into
    two powers of two, the first the smaller. HF computes it from the padded
    length of the first batch it sees and then keeps it.
    """
    power = max((2 * (length // chunk_size)).bit_length() - 1, 1)
    limit = 2 * max(int((max_positions // chunk_size) ** 0.5), chunk_size)
    if 2 ** power > limit:
        return 2 ** (power // 2), 2 ** (power - power // 2)
    return 2 ** power


def random_rotations(n_heads: int, d_head: int, n_hashes: int, n_buckets: Buckets,
                     generator: torch.Generator) -> torch.Tensor:
    """Gaussian rotations (h, d, r, rot), drawn on the CPU in float32 from `generator`."""
    shape = (n_heads, d_head, n_hashes, rotation_size(n_buckets))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def hash_vectors(x: torch.Tensor, rotations: torch.Tensor, n_buckets: Buckets,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Angular LSH: bucket = argmax([xR ; -xR]) per round.

    x (b, h, n, d), rotations (h, d, r, rot), mask (b, n) bool or None.
    Factorised buckets take one slice of the rotation per factor; the first
    factor is the least significant digit. Masked positions get bucket
    `total_buckets(n_buckets)`. Returns (b, h, r, n) int64.
    """
    b, h, n, _ = x.shape
    piece = max(1, HASH_PIECE_ELEMENTS // (b * h * rotations.shape[2] * rotations.shape[3]))  # positions
    buckets = torch.cat([_hash_piece(x[:, :, start:start + piece], rotations, n_buckets)
                         for start in range(0, n, piece)], dim=-1)  # (b, h, r, n)
    stride = total_buckets(n_buckets)
    if mask is not None:
        buckets = torch.where(mask[:, None, None, :], buckets, torch.full_like(buckets, stride))
    return buckets


def _hash_piece(x: torch.Tensor, rotations: torch.Tensor, n_buckets: Buckets) -> torch.Tensor:
    """Buckets (b, h, r, m) of positions x (b, h, m, d); argmax([y ; -y]) without building [y ; -y].

    The rotated coordinates are laid out (..., rot, m), so every reduction runs
    over whole rows of positions: a max with indices over a short last
    dimension is ten times slower on the CPU.
    """
    with explicit_precision(x.device):  # bfloat16 rows: rotated in float32, or near-ties round together
        x, = upcast(x)
        rotated = torch.einsum("bhnd,hdrk->bhrkn", x, rotations.to(x.dtype))  # (b, h, r, rot, m)
    buckets = torch.zeros(rotated.shape[:3] + rotated.shape[4:], dtype=torch.int64, device=x.device)  # (b, h, r, m)
    offset, stride = 0, 1
    for factor in bucket_factors(n_buckets):
        buckets += signed_argmax(rotated[..., offset:offset + factor // 2, :]) * stride
        offset += factor // 2
        stride *= factor
    return buckets


def signed_argmax(y: torch.Tensor) -> torch.Tensor:
    """`first_signed_argmax`, by the native kernel (`hash_kernel.cpp`, one pass) for float32 and float64 on the
    CPU when it could be built; else by `first_signed_argmax`. (A NaN is never the maximum here.)"""
    lib = native.library_for(y)
    if lib is None:
        return first_signed_argmax(y)
    *outer, k, m = y.shape
    rows = y.reshape(-1, k, m)  # (P, k, m): a view for a slice of the rotations of a contiguous tensor
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    digits = torch.empty(rows.shape[0], m, dtype=torch.int64)
    function = getattr(lib, f"reformer_signed_argmax_{native.SUFFIXES[y.dtype]}")
    function(rows.shape[0], k, m, rows.data_ptr(), rows.stride(0), rows.stride(1), digits.data_ptr())
    return digits.view(*outer, m)


def first_signed_argmax(y: torch.Tensor) -> torch.Tensor:
    """argmax of [y ; -y] along dim -2, the first index on ties (as torch.argmax): y (..., k, m) -> (..., m) int64.

    Float passes only: the maxima are where y - top (or y + top, for -y) is 0;
    weighting them k, k-1, ..., 1 and taking the largest weight picks the first.
    """
    k = y.shape[-2]
    top = torch.maximum(y.amax(dim=-2, keepdim=True), y.amin(dim=-2, keepdim=True).neg_())  # (..., 1, m)
    first_weight = torch.arange(k, 0, -1, dtype=y.dtype, device=y.device).view(k, 1)  # k .. 1
    positive = torch.sub(y, top).sign_().add_(1).mul_(first_weight).amax(dim=-2)  # k - first i: y_i = top; or 0
    negative = torch.add(y, top).sign_().neg_().add_(1).mul_(first_weight).amax(dim=-2)  # the same for -y_i
    has_positive = positive.sign()  # 1 or 0
    digit = has_positive * (k - positive) + (1 - has_positive) * (2 * k - negative)
    return digit.to(torch.int64)


# ---------------------------------------------------------------------------
# sorting
# ---------------------------------------------------------------------------

def sort_by_bucket(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort every round by (bucket, position).

    buckets (b, h, r, n) -> (order, rank), both (b, h, r, n): order[..., s] is
    the position at sorted slot s; rank[..., t] is the sorted slot of position t.
    """
    n = buckets.shape[-1]
    positions = torch.arange(n, device=buckets.device)
    order = (buckets * n + positions).argsort(dim=-1)  # (b, h, r, n)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
    return order, rank


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d), index (b, h, m) -> x[..., index, :] (b, h, m, d)."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


# ---------------------------------------------------------------------------
# the attention
# ---------------------------------------------------------------------------

def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor | None,
    *,
    n_buckets: Buckets,
    chunk_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    dedup: bool = False,
    same_bucket_only: bool = False,
    wrap: bool = False,
    buckets: torch.Tensor | None = None,
    dropout: float = 0.0,
    dropout_seed: int | None = None,
    normalize: str = "softmax",
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal_window: int | None = None,
    replay: KernelReplay | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-round LSH attention with shared query-keys.

    Args:
        qk: (b, h, n, d) shared query-keys. Queries are used as they are; keys
            are `normalize_keys(qk)`; logits get no further scale.
        v: (b, h, n, d) values.
        rotations: (h, d, r, rot) with rot = `rotation_size(n_buckets)`. May be
            None when `buckets` is given.
        n_buckets: an even int, or a tuple of even factors (factorised buckets).
        chunk_size: chunk length after sorting.
        causal: no key after the query.
        attention_mask: (b, n) bool, True = real token. Padded queries output 0.
        dedup: paper eq. 16; a key seen several times by one query counts once.
        same_bucket_only: paper eq. 3-4; only keys of the query's own bucket.
        wrap: Trax / HF layout (see the module docstring).
        buckets: (b, h, r, n) buckets to reuse (the reversible backward passes
            the forward's); hashing is skipped.
        dropout: probability of dropping an attention weight.
        dropout_seed: seed of the dropout mask; None disables dropout.
        normalize: "softmax" (exact) or "hf" (exp(x - logsumexp(x)), HF's and
            Trax's float rounding; see the module docstring).
        chunks_before, chunks_after: neighbouring chunks each chunk attends to
            (HF's lsh_num_chunks_before / after); dedup needs the default 1, 0.
        causal_window: the prefix-consistent causal variant (`lsh_causal_window`): in every round a
            query sees the `causal_window` latest keys before it in its own bucket, and itself; no
            output depends on a later token. Needs causal=True; the chunk windows and
            same_bucket_only do not apply.
        replay: a `KernelReplay` that a second, identical call reads the fused kernel's plan and
            output from (the reversible recompute, `reversible_keep_attention`); None: compute.

    Returns:
        out (b, h, n, d) and buckets (b, h, r, n).
    """
    b, h, n, d = check_qkv({"qk": qk, "v": v})
    check_chunk_size(chunk_size)
    attention_mask = check_attention_mask(attention_mask, b, n)
    _check_rotations_or_buckets(rotations, buckets, n_buckets, (b, h, n, d))
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {tuple(NORMALIZATIONS)}, got {normalize!r}")
    normalized = NORMALIZATIONS[normalize]
    check_window(chunks_before, chunks_after)
    if causal_window is not None:
        check_causal_window(causal_window, causal, wrap)
    elif dedup and (chunks_before, chunks_after) != (1, 0):
        raise ValueError("dedup counts keys over windows of one chunk before and none after; "
                         "use chunks_before=1, chunks_after=0 with dedup, or turn dedup off")

    n_pad = padded_length(n, chunk_size)
    mask = padded_mask(attention_mask, b, n, n_pad, qk.device)  # (b, n_pad)
    qk_p = pad_length(zero_padded(qk, attention_mask), n_pad, dim=2)  # (b, h, n_pad, d)
    v_p = pad_length(zero_padded(v, attention_mask), n_pad, dim=2)  # (b, h, n_pad, d)

    if buckets is None:
        with torch.no_grad():
            buckets = hash_vectors(qk_p, rotations, n_buckets, mask)  # (b, h, r, n_pad)
    else:
        extra = torch.full_like(buckets[..., :1], total_buckets(n_buckets))
        buckets = torch.where(mask[:, None, None, :], pad_length(buckets, n_pad, dim=3), extra)

    window = (chunks_before, chunks_after)
    with_dropout = dropout > 0.0 and dropout_seed is not None
    fused = not (dedup or same_bucket_only or with_dropout) and normalize == "softmax" and causal_window is None
    if fused and fused_kernel_available(qk.device):
        out = _attend_fused(qk_p, v_p, buckets, mask, chunk_size=chunk_size, causal=causal, wrap=wrap,
                            window=window, replay=replay)  # (b, h, n_pad, d)
    else:
        with explicit_precision(qk.device):
            if causal_window is not None:
                out, lse = attend_causal_window(
                    *upcast(qk_p, v_p), buckets, mask, chunk_size=chunk_size, window=causal_window, dedup=dedup,
                    dropout=dropout, dropout_seed=dropout_seed, normalized=normalized,
                )  # (b, h, r, n_pad, d), (b, h, r, n_pad)
            else:
                out, lse = _attend_sorted(
                    *upcast(qk_p, v_p), buckets, mask,
                    n_buckets=n_buckets, chunk_size=chunk_size, causal=causal, dedup=dedup,
                    same_bucket_only=same_bucket_only, wrap=wrap, dropout=dropout, dropout_seed=dropout_seed,
                    normalized=normalized, window=window,
                )  # (b, h, r, n_pad, d), (b, h, r, n_pad)
            weights = normalized(lse, 2)  # (b, h, r, n_pad): each round's share of the joint softmax
            out = (out * weights[..., None]).sum(dim=2).to(qk.dtype)  # (b, h, n_pad, d)
    out = zero_masked_queries(out[:, :, :n], attention_mask)
    return out, buckets[..., :n]


def _softmax(x: torch.Tensor, dim: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    return torch.softmax(x, dim=dim)


def _exp_minus_logsumexp(x: torch.Tensor, dim: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    """HF's and Trax's normalisation: exp(x - logsumexp(x)). Inexact in float32 where |lse| is large."""
    return torch.exp(x - (torch.logsumexp(x, dim=dim, keepdim=True) if lse is None else lse))


NORMALIZATIONS = {"softmax": _softmax, "hf": _exp_minus_logsumexp}


def _check_rotations_or_buckets(rotations, buckets, n_buckets, qk_shape) -> int:
    validate_n_buckets(n_buckets)
    b, h, n, d = qk_shape
    if buckets is not None:
        if buckets.dim() != 4 or buckets.shape[:2] != (b, h) or buckets.shape[3] != n:
            raise ValueError(f"buckets must be (batch, heads, n_hashes, length) = ({b}, {h}, r, {n}), "
                             f"got {tuple(buckets.shape)}")
        return buckets.shape[2]
    if rotations is None:
        raise ValueError("give either rotations (heads, d_head, n_hashes, rot) or precomputed buckets")
    rot = rotation_size(n_buckets)
    if rotations.dim() != 4 or rotations.shape[0] != h or rotations.shape[1] != d or rotations.shape[3] != rot:
        raise ValueError(
            f"rotations must be (heads, d_head, n_hashes, rot) = ({h}, {d}, n_hashes, {rot}) "
            f"for n_buckets={n_buckets!r}, got {tuple(rotations.shape)}"
        )
    return rotations.shape[2]


def _attend_fused(qk, v, buckets, mask, *, chunk_size, causal, wrap, window, replay=None):
    """The combined output (b, h, n, d) through the fused chunk kernel (`fused_chunks`).

    For dedup and same-bucket off, no attention dropout and exact softmax
    weights; the same result as `_attend_sorted` followed by the round combination.
    """
    b, h, r, n = buckets.shape
    d, c = qk.shape[-1], chunk_size

    def build():
        order, _ = sort_by_bucket(buckets)  # (b, h, r, n)
        flat_order = order.reshape(b, h, r * n)  # the position at each sorted slot
        self_value, _ = mask_values(qk.dtype)
        return chunk_plan(flat_order, mask, n, c, causal, wrap, window, qk.dtype, scale=1.0, self_value=self_value,
                          self_on_diagonal=not wrap)

    plan = cached_plan(replay, build)
    out = ChunkedAttention.apply(projection_rows(qk), None, projection_rows(v), plan, replay)  # keys: unit qk
    return out.view(b, n, h, d).permute(0, 2, 1, 3)  # (b, h, n, d) view


def _attend_sorted(qk, v, buckets, mask, *, n_buckets, chunk_size, causal, dedup,
                   same_bucket_only, wrap, dropout, dropout_seed, normalized, window):
    """Sort, chunk, attend, unsort. Returns per-round out (b, h, r, n, d) and lse (b, h, r, n)."""
    b, h, r, n = buckets.shape
    d = qk.shape[-1]
    c = chunk_size
    g = r * n // c
    order, rank = sort_by_bucket(buckets)  # (b, h, r, n) each
    flat_order = order.reshape(b, h, r * n)  # (b, h, r*n): position at each sorted slot

    q = gather_rows(qk, flat_order).view(b, h, g, c, d)  # (b, h, g, c, d)
    k = look_adjacent(gather_rows(normalize_keys(qk), flat_order).view(b, h, g, c, d), *window)  # (b, h, g, w, d)
    vw = look_adjacent(gather_rows(v, flat_order).view(b, h, g, c, d), *window)  # (b, h, g, w, d)
    dots = q @ k.transpose(-1, -2)  # (b, h, g, c, w)

    q_pos = order.view(b, h, g, c)  # (b, h, g, c)
    k_pos = look_adjacent(q_pos, *window)  # (b, h, g, w)
    valid = _window_mask(q_pos, k_pos, mask, order, buckets, r, n, c, causal, same_bucket_only, wrap, window)
    self_value, masked_value = mask_values(dots.dtype)
    is_self = q_pos[..., :, None] == k_pos[..., None, :]  # (b, h, g, c, w)
    logits = dots.masked_fill(is_self, self_value)
    del dots, is_self
    if dedup:
        counts = _duplicate_counts(rank, buckets, order, r, n, c, same_bucket_only, wrap)
        logits = logits - torch.log(counts.clamp(min=1).to(logits.dtype))
        del counts
    logits = logits.masked_fill(~valid, masked_value)
    del valid

    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (b, h, g, c, 1)
    probs = normalized(logits, -1, lse)  # (b, h, g, c, w)
    probs = seeded_dropout(probs, dropout, dropout_seed)
    out = probs @ vw  # (b, h, g, c, d)

    undo = (rank + torch.arange(r, device=rank.device)[:, None] * n).reshape(b, h, r * n)  # (b, h, r*n)
    out = gather_rows(out.reshape(b, h, r * n, d), undo).view(b, h, r, n, d)  # (b, h, r, n, d)
    lse = lse.reshape(b, h, r * n).gather(2, undo).view(b, h, r, n)  # (b, h, r, n)
    return out, lse


def _has_previous_chunk(r: int, n: int, c: int, wrap: bool, device) -> torch.Tensor:
    """(g,) bool: does chunk i have a predecessor in the layout?"""
    return neighbour_mask(r * n // c, n // c, 1, 0, wrap, device)[:, 0]


def _window_mask(q_pos, k_pos, mask, order, buckets, r, n, c, causal, same_bucket_only, wrap, window):
    """(b, h, g, c, w) bool: which (query slot, key slot) pairs may attend."""
    b, h, g, _ = q_pos.shape
    key_real = look_adjacent(mask[:, None, None, :].expand(b, h, r, n).gather(-1, order).view(b, h, g, c), *window)
    in_layout = neighbour_mask(g, n // c, *window, wrap, q_pos.device).repeat_interleave(c, dim=1)  # (g, w)
    w = in_layout.shape[1]
    valid = (key_real & in_layout)[..., None, :].expand(b, h, g, c, w)  # (b, h, g, c, w)
    if causal:
        valid = valid & (k_pos[..., None, :] <= q_pos[..., :, None])
    if same_bucket_only:
        q_bucket = _round_offset_buckets(buckets, order).view(b, h, g, c)  # (b, h, g, c)
        k_bucket = look_adjacent(q_bucket, *window)  # (b, h, g, w)
        valid = valid & (k_bucket[..., None, :] == q_bucket[..., :, None])
    return valid


def _round_offset_buckets(buckets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Buckets in sorted order, offset so that different rounds never share a bucket. (b, h, r, n)."""
    r = buckets.shape[2]
    sorted_buckets = buckets.gather(-1, order)  # (b, h, r, n)
    span = 1 << 32  # more than any bucket count
    return sorted_buckets + torch.arange(r, device=buckets.device)[:, None] * span


def _duplicate_counts(rank, buckets, order, r, n, c, same_bucket_only, wrap):
    """(b, h, g, c, w): in how many windows (over all rounds) each query sees each key.

    Query slot (i, a) sees key slot (j, a') when j's chunk in round a' is the
    query's chunk in round a or its predecessor. Without wrap only a' = a can
    match; with wrap also a' = a - 1 (the look-back crosses one round).
    """
    b, h = rank.shape[:2]
    g = r * n // c
    chunk_of = ((rank + torch.arange(r, device=rank.device)[:, None] * n) // c)  # (b, h, r, n)
    by_position = chunk_of.transpose(2, 3)  # (b, h, n, r): chunk of each position in every round
    q_chunks = gather_rows(by_position, order.reshape(b, h, r * n)).view(b, h, g, c, r)  # (b, h, g, c, r)
    k_chunks = look_adjacent(q_chunks)  # (b, h, g, w, r)
    has_prev = _has_previous_chunk(r, n, c, wrap, rank.device)  # (g,)
    if same_bucket_only:
        bucket_by_position = buckets.transpose(2, 3)  # (b, h, n, r)
        q_buckets = gather_rows(bucket_by_position, order.reshape(b, h, r * n)).view(b, h, g, c, r)
        k_buckets = look_adjacent(q_buckets)  # (b, h, g, w, r)

    counts = torch.zeros(b, h, g, c, 2 * c, dtype=torch.int32, device=rank.device)
    for a in range(r):
        q_chunk = q_chunks[..., a, None]  # (b, h, g, c, 1)
        q_prev = (q_chunk - 1) % g
        q_prev_ok = has_prev[q_chunk]  # (b, h, g, c, 1)
        for a_key in sorted({a, (a - 1) % r} if wrap else {a}):
            k_chunk = k_chunks[..., a_key][..., None, :]  # (b, h, g, 1, w)
            seen = (k_chunk == q_chunk) | (q_prev_ok & (k_chunk == q_prev))
            if same_bucket_only:
                if a_key != a:
                    continue
                seen = seen & (k_buckets[..., a][..., None, :] == q_buckets[..., a, None])
            counts += seen
    return counts
