"""Incremental decoding: one new token costs O(window) per layer, not a pass over the prefix.

Legend: b batch, h heads, t cached positions, d head width.

Each layer keeps what later tokens need of the earlier ones:
- local attention: keys and values of the last (chunks_before + 1) * chunk_size
  positions. The new token at position p attends to positions from
  (p // c - chunks_before) * c to p, exactly as `local_attention` does, so
  cached logits equal uncached ones.
- full attention: all keys and values; exact as well.
- sliding-window attention (causal): keys and values of the last window * dilation + 1
  positions; head h attends to p, p - s_h, ..., p - window * s_h, exactly as
  `sliding_window_attention` does (no global tokens while decoding).
- LSH attention (Trax's predict mode, reference-spec §1.5): the eval-time
  rotations stay fixed, every cached key keeps its buckets, and the new token
  attends to the most recent `n_hashes * (chunks_before + 1) * chunk_size` cached keys that share
  one of its buckets in any round (each counted once), and to itself only when
  there is none. This approximates the chunked attention of a full forward pass.
- prefix-consistent LSH (`lsh_prefix_consistent`): the same cache, and in every
  round the new token attends to the latest `lsh_causal_window` cached keys of
  its bucket, and to itself at the self logit: exactly what a full forward pass
  computes for the last position.
  Finding them compares integer buckets over the cache; the attention itself
  gathers only those keys, so its float work is O(n_hashes * chunk) per token.
`prefill` runs the prompt through one ordinary forward pass and fills the caches
on the way; `decode_step` then adds one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .attention.chunking import mask_values, padded_length
from .attention.lsh import gather_rows, hash_vectors, normalize_keys
from .layers.attention import (
    FullSelfAttention,
    LayerCall,
    LocalSelfAttention,
    LSHSelfAttention,
    SlidingSelfAttention,
    merge_heads,
    split_heads,
)


@dataclass
class LayerCache:
    keys: torch.Tensor | None = None  # (b, h, t, d)
    values: torch.Tensor | None = None  # (b, h, t, d)
    positions: torch.Tensor | None = None  # (t,) positions of the cached rows
    buckets: torch.Tensor | None = None  # (b, h, r, t), LSH only


@dataclass
class DecodingState:
    position: int = 0
    layers: list[LayerCache] = field(default_factory=list)
    n_buckets: object = None  # fixed LSH bucket count for the whole decode


def _append(cache: LayerCache, k: torch.Tensor, v: torch.Tensor, position: int, keep: int | None) -> None:
    pos = torch.tensor([position], device=k.device)
    if cache.keys is None:
        cache.keys, cache.values, cache.positions = k, v, pos
    else:
        cache.keys = torch.cat([cache.keys, k], dim=2)
        cache.values = torch.cat([cache.values, v], dim=2)
        cache.positions = torch.cat([cache.positions, pos])
    if keep is not None and cache.positions.numel() > keep:
        cache.keys, cache.values = cache.keys[:, :, -keep:], cache.values[:, :, -keep:]
        cache.positions = cache.positions[-keep:]
        if cache.buckets is not None:
            cache.buckets = cache.buckets[..., -keep:]


def _softmax_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, logits_mask=None, scale=1.0):
    """q (b, h, 1, d) over keys/values (b, h, t, d); logits_mask: callable editing (b, h, 1, t) logits."""
    logits = (q @ keys.transpose(-1, -2)) * scale  # (b, h, 1, t)
    if logits_mask is not None:
        logits = logits_mask(logits)
    return torch.softmax(logits, dim=-1) @ values  # (b, h, 1, d)


def _local_step(core: LocalSelfAttention, x: torch.Tensor, cache: LayerCache, position: int) -> torch.Tensor:
    q, k, v = (split_heads(proj(x), core.n_heads) for proj in (core.q, core.k, core.v))  # (b, h, 1, d)
    c, before = core.chunk_size, core.window[0]
    _append(cache, k, v, position, keep=(before + 1) * c)
    first = max(0, (position // c - before) * c)
    visible = cache.positions >= first  # (t,)
    return _softmax_attend(q, cache.keys[:, :, visible], cache.values[:, :, visible], scale=1 / math.sqrt(q.shape[-1]))


def _sliding_step(core: SlidingSelfAttention, x: torch.Tensor, cache: LayerCache, position: int) -> torch.Tensor:
    q, k, v = (split_heads(proj(x), core.n_heads) for proj in (core.q, core.k, core.v))  # (b, h, 1, d)
    steps = _sliding_steps(core, x.device)  # (h, 1)
    _append(cache, k, v, position, keep=core.window * int(steps.max()) + 1)
    back = position - cache.positions  # (t,): how far each cached key lies behind
    seen = (back % steps == 0) & (back <= core.window * steps)  # (h, t)
    _, masked_value = mask_values(q.dtype)

    def edit(logits):  # (b, h, 1, t)
        return logits.masked_fill(~seen[None, :, None, :], masked_value)

    return _softmax_attend(q, cache.keys, cache.values, edit, scale=1 / math.sqrt(q.shape[-1]))


def _sliding_steps(core: SlidingSelfAttention, device) -> torch.Tensor:
    """(h, 1) the dilation of each head."""
    dilation = core.dilation if isinstance(core.dilation, tuple) else (core.dilation,) * core.n_heads
    return torch.tensor(dilation, device=device)[:, None]


def _full_step(core: FullSelfAttention, x: torch.Tensor, cache: LayerCache, position: int) -> torch.Tensor:
    q, k, v = (split_heads(proj(x), core.n_heads) for proj in (core.q, core.k, core.v))  # (b, h, 1, d)
    _append(cache, k, v, position, keep=None)
    return _softmax_attend(q, cache.keys, cache.values, scale=1 / math.sqrt(q.shape[-1]))


def _lsh_step(core: LSHSelfAttention, x: torch.Tensor, cache: LayerCache, position: int, n_buckets) -> torch.Tensor:
    qk = split_heads(core.qk(x), core.n_heads)  # (b, h, 1, d)
    v = split_heads(core.v(x), core.n_heads)  # (b, h, 1, d)
    buckets = hash_vectors(qk, core.rotations(n_buckets, None, qk.dtype).to(x.device), n_buckets)  # (b, h, r, 1)
    if core.causal_window is not None:
        return _causal_window_step(core, qk, v, buckets, cache, position)
    previous = cache.buckets
    self_value, masked_value = mask_values(qk.dtype)
    limit = core.n_hashes * (core.window[0] + 1) * core.chunk_size
    cache.buckets = buckets if previous is None else torch.cat([previous, buckets], dim=-1)
    _append(cache, normalize_keys(qk), v, position, keep=None)
    shares = (cache.buckets == buckets).any(dim=2)  # (b, h, t): shares a bucket in some round
    shares[..., -1] = False  # the token itself is handled by the self value
    t = shares.shape[-1]
    score = torch.where(shares, torch.arange(t, device=x.device), torch.full_like(shares, -1, dtype=torch.long))
    latest, index = score.topk(min(limit, t), dim=-1)  # (b, h, k): the most recent matches, -1 if fewer
    keys = torch.cat([gather_rows(cache.keys, index), cache.keys[:, :, -1:]], dim=2)  # (b, h, k+1, d)
    values = torch.cat([gather_rows(cache.values, index), cache.values[:, :, -1:]], dim=2)  # (b, h, k+1, d)
    found = torch.cat([latest >= 0, torch.zeros_like(latest[..., :1], dtype=torch.bool)], dim=-1)  # (b, h, k+1)

    def edit(logits):  # (b, h, 1, k+1)
        logits = logits.masked_fill(~found[:, :, None, :], masked_value)
        logits[..., -1] = self_value
        return logits

    return _softmax_attend(qk, keys, values, edit)


def _causal_window_step(core: LSHSelfAttention, qk, v, buckets, cache: LayerCache, position: int) -> torch.Tensor:
    """Prefix-consistent LSH: per round, the latest `causal_window` cached keys of the token's bucket, and itself.

    The forward pass's joint softmax over (round, key) entries is one softmax over the cached keys with
    log(rounds that select the key) added (dedup: each key once), and the self logit r times (once).
    """
    cache.buckets = buckets if cache.buckets is None else torch.cat([cache.buckets, buckets], dim=-1)
    _append(cache, normalize_keys(qk), v, position, keep=None)
    shares = cache.buckets == buckets  # (b, h, r, t): in the token's bucket, round by round
    shares[..., -1] = False  # the token itself is handled by the self value
    latest = shares & (shares.flip(-1).cumsum(-1).flip(-1) <= core.causal_window)  # the W latest matches
    counts = latest.sum(dim=2)  # (b, h, t): in how many rounds each cached key is selected
    self_value, masked_value = mask_values(qk.dtype)
    rounds = buckets.shape[2]

    def edit(logits):  # (b, h, 1, t)
        chosen = (counts > 0)[:, :, None, :]
        if not core.dedup:
            logits = logits + torch.log(counts.clamp(min=1).to(logits.dtype))[:, :, None, :]
        logits = logits.masked_fill(~chosen, masked_value)
        logits[..., -1] = self_value + (0.0 if core.dedup else math.log(rounds))
        return logits

    return _softmax_attend(qk, cache.keys, cache.values, edit)


@torch.no_grad()
def decode_step(model, token: torch.Tensor, state: DecodingState) -> torch.Tensor:
    """Feed one token per row, token (b,), and return the logits of the next one, (b, vocab)."""
    p = state.position
    if p >= model.config.max_seq_len:
        raise ValueError(f"the sequence reached max_seq_len = {model.config.max_seq_len}; "
                         "generate fewer tokens or use a model with a longer max_seq_len")
    if not state.layers:
        state.layers = [LayerCache() for _ in model.layers]
    position = torch.tensor([p], device=token.device)
    x = model.token_embedding(token[:, None]) + model.position_embedding.at(position).to(
        model.token_embedding.weight.dtype)  # (b, 1, d)
    x1 = x2 = x
    for block, cache in zip(model.layers, state.layers):
        branch = block.attention
        h = branch.norm(x2)
        core = branch.attention
        if isinstance(core, LSHSelfAttention) and not core.use_full_attention:
            out = _lsh_step(core, h, cache, p, state.n_buckets)
        elif isinstance(core, LocalSelfAttention):
            out = _local_step(core, h, cache, p)
        elif isinstance(core, SlidingSelfAttention):
            out = _sliding_step(core, h, cache, p)
        else:
            out = _full_step_any(core, h, cache, p)
        x1 = x1 + branch.out(merge_heads(out))
        x2 = x2 + block.feed_forward(x1)
    state.position += 1
    return model.logits_from_hidden(torch.cat([x1, x2], dim=-1))[:, -1]  # (b, vocab)


def _full_step_any(core, h, cache, position):
    if isinstance(core, FullSelfAttention):
        return _full_step(core, h, cache, position)
    # an LSH layer evaluated with full shared-QK attention
    qk = split_heads(core.qk(h), core.n_heads)
    v = split_heads(core.v(h), core.n_heads)
    _append(cache, normalize_keys(qk), v, position, keep=None)
    self_value, _ = mask_values(qk.dtype)

    def edit(logits):
        if logits.shape[-1] > 1:
            logits[..., -1] = self_value
        return logits

    return _softmax_attend(qk, cache.keys, cache.values, edit)


def start_decoding(model, total_length: int) -> DecodingState:
    """A fresh state; LSH layers with n_buckets=None fix their count from `total_length`."""
    lsh = [block.attention.attention for block in model.layers
           if isinstance(block.attention.attention, LSHSelfAttention)]
    length = padded_length(min(total_length, model.config.max_seq_len), max(model.config.pad_to_multiple, 1))
    return DecodingState(n_buckets=lsh[0].resolve_n_buckets(length, None) if lsh else None)


def _fill_cache(core, h: torch.Tensor, cache: LayerCache, n_buckets) -> None:
    """Cache the keys and values of the whole prompt, h (b, n, d_model)."""
    n = h.shape[1]
    cache.positions = torch.arange(n, device=h.device)
    if isinstance(core, LSHSelfAttention):
        qk = split_heads(core.qk(h), core.n_heads)  # (b, h, n, d)
        cache.keys, cache.values = normalize_keys(qk), split_heads(core.v(h), core.n_heads)
        if not core.use_full_attention:
            cache.buckets = hash_vectors(qk, core.rotations(n_buckets, None, qk.dtype).to(h.device), n_buckets)
        return
    cache.keys = split_heads(core.k(h), core.n_heads)
    cache.values = split_heads(core.v(h), core.n_heads)
    keep = None
    if isinstance(core, LocalSelfAttention):
        keep = (core.window[0] + 1) * core.chunk_size
    elif isinstance(core, SlidingSelfAttention):
        keep = core.window * int(_sliding_steps(core, h.device).max()) + 1
    if keep is not None:
        cache.keys, cache.values, cache.positions = cache.keys[:, :, -keep:], cache.values[:, :, -keep:], \
            cache.positions[-keep:]


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, state: DecodingState) -> torch.Tensor:
    """One ordinary forward pass over prompt (b, n) that fills the caches; returns the next logits (b, vocab)."""
    n = prompt.shape[1]
    if n > model.config.max_seq_len:
        raise ValueError(f"the prompt has {n} tokens, more than max_seq_len = {model.config.max_seq_len}")
    state.layers = [LayerCache() for _ in model.layers]
    x = model.token_embedding(prompt) + model.position_embedding(n).to(model.token_embedding.weight.dtype)
    x, mask = model._pad_to_multiple(x, None)  # (b, n_pad, d), as the forward pass pads
    x1 = x2 = x
    for block, cache in zip(model.layers, state.layers):
        _fill_cache(block.attention.attention, block.attention.norm(x2[:, :n]), cache, state.n_buckets)
        x1, x2 = block(x1, x2, mask, LayerCall())
    state.position = n
    return model.logits_from_hidden(torch.cat([x1[:, n - 1:n], x2[:, n - 1:n]], dim=-1))[:, -1]
