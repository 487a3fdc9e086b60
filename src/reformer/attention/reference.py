"""Slow, obviously correct references for every attention: THE ORACLES.

They loop over batch, heads and queries in Python, build explicit windows and
dense masks, and share no code with the fast paths except the tiny
`normalize_keys` formula. Use them only for tests on small inputs.
"""

from __future__ import annotations

import math

import torch

from ..rng import pair_keep_mask
from .chunking import normalize_keys
from .hashing import bucket_factors, total_buckets

SELF_LOGIT = -1e5  # a position attends to itself only when nothing else is allowed


def lsh_buckets_reference(x: torch.Tensor, rotations: torch.Tensor, n_buckets, real: list[bool]) -> list[list[int]]:
    """Buckets of one (batch, head) slice, x (n, d), rotations (d, r, rot): a list per round."""
    n_hashes = rotations.shape[1]
    result = []
    for r in range(n_hashes):
        round_buckets = []
        for t in range(x.shape[0]):
            if not real[t]:
                round_buckets.append(total_buckets(n_buckets))
                continue
            bucket, offset, stride = 0, 0, 1
            for factor in bucket_factors(n_buckets):
                projected = x[t] @ rotations[:, r, offset:offset + factor // 2].to(x.dtype)
                both = torch.cat([projected, -projected]).tolist()
                bucket += both.index(max(both)) * stride
                offset += factor // 2
                stride *= factor
            round_buckets.append(bucket)
        result.append(round_buckets)
    return result


def _neighbour_chunks(chunk: int, n_chunks: int, per_round: int, before: int, after: int, wrap: bool) -> list[int]:
    """The chunks in `chunk`'s window, in order, repeated where the wrap-around brings one twice."""
    if wrap:
        if n_chunks == 1:
            return [chunk]
        return [(chunk + offset) % n_chunks for offset in range(-before, after + 1)]
    start = chunk - chunk % per_round
    return [chunk + offset for offset in range(-before, after + 1) if start <= chunk + offset < start + per_round]


def _lsh_multiplicity(bk: list[list[int]], n_pad: int, c: int, same_bucket_only: bool, wrap: bool,
                      before: int = 1, after: int = 0):
    """M[i][j]: how many times key j appears in query i's windows, over all rounds."""
    n_rounds = len(bk)
    per_round = n_pad // c
    n_chunks = n_rounds * per_round
    # slots[g] = list of (position, round) in global chunk g
    slots: list[list[tuple[int, int]]] = [[] for _ in range(n_chunks)]
    for r in range(n_rounds):
        ordered = sorted(range(n_pad), key=lambda t: (bk[r][t], t))
        for index, t in enumerate(ordered):
            slots[r * per_round + index // c].append((t, r))

    m = [[0] * n_pad for _ in range(n_pad)]
    for chunk in range(n_chunks):
        window = [slot for other in _neighbour_chunks(chunk, n_chunks, per_round, before, after, wrap)
                  for slot in slots[other]]
        for i, round_i in slots[chunk]:
            for j, round_j in window:
                if same_bucket_only and (round_i, bk[round_i][i]) != (round_j, bk[round_j][j]):
                    continue
                m[i][j] += 1
    return m


def _causal_window_multiplicity(bk: list[list[int]], n: int, window: int, real: list[bool]):
    """M[i][j]: in how many rounds key j is one of the `window` latest real keys before i in i's bucket, or i itself."""
    m = [[0] * n for _ in range(n)]
    for round_buckets in bk:
        for i in range(n):
            if not real[i]:
                continue
            earlier = [j for j in range(i) if real[j] and round_buckets[j] == round_buckets[i]]
            for j in earlier[-window:] + [i]:
                m[i][j] += 1
    return m


def lsh_attention_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor | None,
    *,
    n_buckets,
    chunk_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    dedup: bool = False,
    same_bucket_only: bool = False,
    wrap: bool = False,
    buckets: torch.Tensor | None = None,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSH attention as the spec says it, one query at a time. Same signature as `lsh_attention`.

    causal_window W: in every round, query i sees the W latest real keys before it in its own bucket, and
    itself (at the self logit); the rounds' entries form one softmax (dedup: each key once).
    """
    b, h, n, d = qk.shape
    c = chunk_size
    n_pad = -(-n // c) * c
    keys = normalize_keys(qk)
    outputs = torch.zeros_like(v)
    all_buckets = []
    for bi in range(b):
        real = [bool(attention_mask[bi, t]) if attention_mask is not None else True for t in range(n)]
        real += [False] * (n_pad - n)
        head_buckets = []
        for hi in range(h):
            x = torch.cat([qk[bi, hi].detach(), qk.new_zeros(n_pad - n, d)])
            if buckets is None:
                bk = lsh_buckets_reference(x, rotations[hi], n_buckets, real)
            else:
                pad_bucket = total_buckets(n_buckets)
                bk = [[int(buckets[bi, hi, r, t]) if real[t] else pad_bucket for t in range(n_pad)]
                      for r in range(buckets.shape[2])]
            head_buckets.append(torch.tensor([row[:n] for row in bk]))
            if causal_window is None:
                m = _lsh_multiplicity(bk, n_pad, c, same_bucket_only, wrap, chunks_before, chunks_after)
            else:
                m = _causal_window_multiplicity(bk, n, causal_window, real)
            for i in range(n):
                if not real[i]:
                    continue
                seen = [j for j in range(n) if m[i][j] > 0 and real[j] and (not causal or j <= i)]
                self_logit = torch.tensor(SELF_LOGIT, dtype=qk.dtype, device=qk.device)
                logits = torch.stack([self_logit if j == i else qk[bi, hi, i] @ keys[bi, hi, j] for j in seen])
                if not dedup:
                    logits = logits + torch.tensor([math.log(m[i][j]) for j in seen], dtype=logits.dtype,
                                                   device=logits.device)
                weights = torch.softmax(logits, dim=0)
                outputs[bi, hi, i] = weights @ v[bi, hi, seen]
        all_buckets.append(torch.stack(head_buckets))
    return outputs, torch.stack(all_buckets).to(qk.device)


def local_attention_reference(q, k, v, *, chunk_size, causal=False, attention_mask=None, wrap=False,
                              chunks_before=1, chunks_after=0) -> torch.Tensor:
    """Query i sees every key of the chunks in its window (i's chunk, chunks_before before, chunks_after
    after; with wrap, around the ends, a chunk counted as often as the window holds it), when the key is
    real and (causal) j <= i.
    """
    b, h, n, d = q.shape
    n_chunks = -(-n // chunk_size)
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                if attention_mask is not None and not attention_mask[bi, i]:
                    continue
                chunks = _neighbour_chunks(i // chunk_size, n_chunks, n_chunks, chunks_before, chunks_after, wrap)
                seen = [
                    j for chunk in chunks for j in range(chunk * chunk_size, min(n, (chunk + 1) * chunk_size))
                    if (attention_mask is None or attention_mask[bi, j]) and (not causal or j <= i)
                ]
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in seen]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(logits, dim=0) @ v[bi, hi, seen]
    return out


def full_attention_reference(q, k, v, *, causal=False, attention_mask=None) -> torch.Tensor:
    """Dense softmax attention over real keys (and, causal, no later key)."""
    b, h, n, d = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                if attention_mask is not None and not attention_mask[bi, i]:
                    continue
                seen = [j for j in range(n)
                        if (attention_mask is None or attention_mask[bi, j]) and (not causal or j <= i)]
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in seen]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(logits, dim=0) @ v[bi, hi, seen]
    return out


def sliding_window_reference(q, k, v, *, window, dilation=1, causal=False, attention_mask=None, global_mask=None,
                             global_qkv=None, global_rule="longformer", dropout=0.0, dropout_seed=None) -> torch.Tensor:
    """Longformer attention as a dense mask, row by row.

    Head hi uses dilation d = dilation (or dilation[hi]). Query i may see key j when j is real and
    - (band) |i - j| <= window * d and (i - j) % d == 0, or j is global, or i is global;
    - and, causal, j <= i.
    Global query rows score q_g[i] . k_g[j] against every key, with values v_g (q_g, k_g, v_g = global_qkv,
    or q, k, v without it). Every other row scores q[i] . k[j] with values v, global keys included: that is
    Longformer's rule (allenai's `longformer.py`, HF's `LongformerSelfAttention`). global_rule="global_kv" is
    the rule of models saved before it: those rows scored the global keys with k_g and took v_g.
    A padded token is never global. Padded queries output zeros.
    dropout: each weight (batch, head, i, j) is dropped where `pair_keep_mask` says, the rest scaled by 1/(1-p).
    """
    b, h, n, d_head = q.shape
    q_g, k_g, v_g = (q, k, v) if global_qkv is None else global_qkv
    column_k, column_v = (k_g, v_g) if global_rule == "global_kv" else (k, v)
    real = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    is_global = torch.zeros(b, n, dtype=torch.bool) if global_mask is None else global_mask.bool().cpu() & real
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            step = dilation if isinstance(dilation, int) else dilation[hi]
            for i in range(n):
                if not real[bi, i]:
                    continue
                seen, logits, values = [], [], []
                for j in range(n):
                    in_band = abs(i - j) <= window * step and (i - j) % step == 0
                    if not real[bi, j] or (causal and j > i):
                        continue
                    if is_global[bi, i]:
                        logits.append(q_g[bi, hi, i] @ k_g[bi, hi, j])
                        values.append(v_g[bi, hi, j])
                    elif is_global[bi, j]:
                        logits.append(q[bi, hi, i] @ column_k[bi, hi, j])
                        values.append(column_v[bi, hi, j])
                    elif in_band:
                        logits.append(q[bi, hi, i] @ k[bi, hi, j])
                        values.append(v[bi, hi, j])
                    else:
                        continue
                    seen.append(j)
                weights = torch.softmax(torch.stack(logits) / math.sqrt(d_head), dim=0)
                keep = pair_keep_mask(dropout, dropout_seed, *(torch.tensor(x, device=q.device) for x in (bi, hi, i)),
                                      torch.tensor(seen, device=q.device))
                if keep is not None:
                    weights = weights * keep.to(weights) / (1.0 - dropout)
                out[bi, hi, i] = weights @ torch.stack(values)
    return out
