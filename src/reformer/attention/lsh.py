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


import torch

from .chunking import (
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
from ..rng import dropout as seeded_dropout
from .backend import choose
from .fused_chunks import (ChunkedAttention, KernelReplay, cached_plan, chunk_plan, fused_kernel_available,
                           projection_rows)
from .hashing import (Buckets, bucket_factors, first_signed_argmax, gather_rows, hash_vectors,  # noqa: F401
                      n_buckets_for_length, n_buckets_hf_rule, random_rotations, rotation_size, signed_argmax,
                      sort_by_bucket, total_buckets, validate_n_buckets)
from .lsh_causal_window import attend_causal_window, check_causal_window
from .reference import lsh_attention_reference

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
    """Multi-round LSH attention with shared query-keys: hash, sort, attend in chunks, merge the rounds.

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

    Which implementation runs is the backend's choice (`backend.py`): the fused kernel (native or
    PyTorch blocks) where the options allow it, explicit chunk scores otherwise, or the reference.

    Returns:
        out (b, h, n, d) and buckets (b, h, r, n).
    """
    b, h, n, d = _check_arguments(qk, v, rotations, buckets, n_buckets, chunk_size, attention_mask, normalize,
                                  causal, wrap, dedup, chunks_before, chunks_after, causal_window)
    attention_mask = check_attention_mask(attention_mask, b, n)
    with_dropout = dropout > 0.0 and dropout_seed is not None
    unfused = [name for name, on in (("dedup", dedup), ("same_bucket_only", same_bucket_only),
                                     ("dropout", with_dropout), ('normalize="hf"', normalize == "hf"),
                                     ("causal_window", causal_window is not None)) if on]
    backend = choose("lsh_attention", qk, fused=unfused,
                     reference=[o for o in unfused if o in ("dropout", 'normalize="hf"')])
    if backend == "reference":
        return lsh_attention_reference(qk, v, rotations, n_buckets=n_buckets, chunk_size=chunk_size, causal=causal,
                                       attention_mask=attention_mask, dedup=dedup, same_bucket_only=same_bucket_only,
                                       wrap=wrap, buckets=buckets, chunks_before=chunks_before,
                                       chunks_after=chunks_after, causal_window=causal_window)

    n_pad = padded_length(n, chunk_size)
    mask = padded_mask(attention_mask, b, n, n_pad, qk.device)  # (b, n_pad)
    qk_p = pad_length(zero_padded(qk, attention_mask), n_pad, dim=2)  # (b, h, n_pad, d)
    v_p = pad_length(zero_padded(v, attention_mask), n_pad, dim=2)  # (b, h, n_pad, d)
    buckets = _hash(qk_p, rotations, n_buckets, mask, buckets, native_kernel=backend == "native")  # (b, h, r, n_pad)
    window = (chunks_before, chunks_after)
    if not unfused and fused_kernel_available(qk.device, backend):  # sort, attend and merge the rounds in the fused kernel
        out = _attend_fused(qk_p, v_p, buckets, mask, chunk_size=chunk_size, causal=causal, wrap=wrap,
                            window=window, replay=replay, backend=backend)  # (b, h, n_pad, d)
    else:
        with explicit_precision(qk.device):
            qk_up, v_up = upcast(qk_p, v_p)
            normalized = NORMALIZATIONS[normalize]
            if causal_window is not None:
                out, lse = attend_causal_window(
                    qk_up, v_up, buckets, mask, chunk_size=chunk_size, window=causal_window, dedup=dedup,
                    dropout=dropout, dropout_seed=dropout_seed, normalized=normalized,
                )  # (b, h, r, n_pad, d), (b, h, r, n_pad)
            else:
                out, lse = _attend_sorted(
                    qk_up, v_up, buckets, mask, n_buckets=n_buckets, chunk_size=chunk_size, causal=causal,
                    dedup=dedup, same_bucket_only=same_bucket_only, wrap=wrap, dropout=dropout,
                    dropout_seed=dropout_seed, normalized=normalized, window=window,
                )  # (b, h, r, n_pad, d), (b, h, r, n_pad)
            out = merge_rounds(out, lse, normalized).to(qk.dtype)  # (b, h, n_pad, d)
    return zero_masked_queries(out[:, :, :n], attention_mask), buckets[..., :n]


def _check_arguments(qk, v, rotations, buckets, n_buckets, chunk_size, attention_mask, normalize, causal, wrap,
                     dedup, chunks_before, chunks_after, causal_window) -> tuple[int, int, int, int]:
    """(b, h, n, d), after checking that the arguments fit together; each problem says what to change."""
    b, h, n, d = check_qkv({"qk": qk, "v": v})
    check_chunk_size(chunk_size)
    check_attention_mask(attention_mask, b, n)
    _check_rotations_or_buckets(rotations, buckets, n_buckets, (b, h, n, d))
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {tuple(NORMALIZATIONS)}, got {normalize!r}")
    check_window(chunks_before, chunks_after)
    if causal_window is not None:
        check_causal_window(causal_window, causal, wrap)
    elif dedup and (chunks_before, chunks_after) != (1, 0):
        raise ValueError("dedup counts keys over windows of one chunk before and none after; "
                         "use chunks_before=1, chunks_after=0 with dedup, or turn dedup off")
    return b, h, n, d


def _hash(qk, rotations, n_buckets, mask, buckets, native_kernel: bool) -> torch.Tensor:
    """The buckets (b, h, r, n) of every round: hashed from qk, or the given ones with padding's bucket."""
    if buckets is None:
        with torch.no_grad():
            return hash_vectors(qk, rotations, n_buckets, mask, native_kernel=native_kernel)
    n = qk.shape[2]
    extra = torch.full_like(buckets[..., :1], total_buckets(n_buckets))
    return torch.where(mask[:, None, None, :], pad_length(buckets, n, dim=3), extra)


def merge_rounds(out: torch.Tensor, lse: torch.Tensor, normalized) -> torch.Tensor:
    """The rounds' outputs (b, h, r, n, d) as one softmax over every (round, key): weighted by each round's
    share of the joint normaliser, normalized(lse over rounds) (b, h, r, n). Returns (b, h, n, d)."""
    weights = normalized(lse, 2)  # (b, h, r, n)
    return (out * weights[..., None]).sum(dim=2)


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


def _attend_fused(qk, v, buckets, mask, *, chunk_size, causal, wrap, window, replay=None, backend="torch"):
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
                          self_on_diagonal=not wrap, backend=backend)

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
