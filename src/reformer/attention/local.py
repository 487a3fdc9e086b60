"""Chunked local attention (HF `LocalSelfAttention`, Trax `SelfAttention(chunk_len)`).

Legend: b batch, h heads, n length (padded to a chunk multiple), d head width,
g chunks, c chunk length, w = (chunks_before + 1 + chunks_after) * c window.

Positions are cut into chunks of `chunk_size`; every chunk attends to itself,
to `chunks_before` chunks before it and `chunks_after` after it (default 1 and
0). By default the window stops at the ends of the sequence, so right padding
never changes what real tokens see in a causal model. `wrap=True` is HF's and
Trax's layout: the window wraps around (the first chunk looks back at the
last one), which matters only where the causal mask does not hide those keys.
Logits are scaled by 1/sqrt(d).
"""

from __future__ import annotations

import math

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
    pad_length,
    padded_length,
    padded_mask,
    upcast,
    zero_masked_queries,
    zero_padded,
)
from ..rng import dropout as seeded_dropout
from .backend import choose
from .reference import local_attention_reference
from .fused_chunks import (ChunkedAttention, KernelReplay, cached_plan, chunk_plan, fused_kernel_available,
                           projection_rows)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    wrap: bool = False,
    chunks_before: int = 1,
    chunks_after: int = 0,
    dropout: float = 0.0,
    dropout_seed: int | None = None,
    replay: KernelReplay | None = None,
) -> torch.Tensor:
    """Each chunk of queries attends to its own chunk and its neighbours.

    Args:
        q, k, v: (b, h, n, d).
        chunk_size: chunk length.
        causal: no key after the query.
        attention_mask: (b, n) bool, True = real token. Padded queries output 0.
        wrap: the window wraps around the ends (HF / Trax), when there are at
            least two chunks.
        chunks_before, chunks_after: neighbouring chunks in the window.
        dropout, dropout_seed: attention-probability dropout from an explicit seed.
        replay: a `KernelReplay` for the reversible recompute (see `lsh_attention`).

    Returns:
        (b, h, n, d).
    """
    b, h, n, d = check_qkv({"q": q, "k": k, "v": v})
    check_chunk_size(chunk_size)
    attention_mask = check_attention_mask(attention_mask, b, n)
    check_window(chunks_before, chunks_after)
    with_dropout = dropout > 0.0 and dropout_seed is not None
    backend = choose("local_attention", q, fused=["dropout"] if with_dropout else [],
                     reference=["dropout"] if with_dropout else [])
    if backend == "reference":
        return local_attention_reference(q, k, v, chunk_size=chunk_size, causal=causal,
                                         attention_mask=attention_mask, wrap=wrap, chunks_before=chunks_before,
                                         chunks_after=chunks_after)
    window = (chunks_before, chunks_after)
    c = chunk_size
    n_pad = padded_length(n, c)
    g = n_pad // c
    mask = padded_mask(attention_mask, b, n, n_pad, q.device)  # (b, n_pad)
    k, v = zero_padded(k, attention_mask), zero_padded(v, attention_mask)

    if not with_dropout and fused_kernel_available(q.device, backend):
        positions = torch.arange(n_pad, device=q.device).expand(b, h, n_pad)  # chunk order = position order
        plan = cached_plan(replay, lambda: chunk_plan(positions, mask, n_pad, c, causal, wrap, window, q.dtype,
                                                      scale=1 / math.sqrt(d), self_value=None,
                                                      self_on_diagonal=True, in_position_order=True,
                                                      backend=backend))
        rows = [projection_rows(pad_length(x, n_pad, dim=2)) for x in (q, k, v)]  # (b*n_pad*h, d) each
        out = ChunkedAttention.apply(*rows, plan, replay).view(b, n_pad, h, d).permute(0, 2, 1, 3)  # (b, h, n_pad, d)
        return zero_masked_queries(out[:, :, :n], attention_mask)
    with explicit_precision(q.device):
        q_p, k_p, v_p = upcast(*(pad_length(x, n_pad, dim=2) for x in (q, k, v)))
        q_c = q_p.view(b, h, g, c, d)  # (b, h, g, c, d)
        k_w = look_adjacent(k_p.view(b, h, g, c, d), *window)  # (b, h, g, w, d)
        v_w = look_adjacent(v_p.view(b, h, g, c, d), *window)  # (b, h, g, w, d)
        dots = (q_c @ k_w.transpose(-1, -2)) / math.sqrt(d)  # (b, h, g, c, w)

        valid = _local_window_mask(mask, g, c, causal, wrap, window)  # (b, 1, g, c, w)
        _, masked_value = mask_values(dots.dtype)
        logits = dots.masked_fill(~valid, masked_value)
        probs = torch.softmax(logits, dim=-1)
        probs = seeded_dropout(probs, dropout, dropout_seed)
        out = (probs @ v_w).view(b, h, n_pad, d)[:, :, :n].to(q.dtype)  # (b, h, n, d)
    return zero_masked_queries(out, attention_mask)


def _local_window_mask(mask: torch.Tensor, g: int, c: int, causal: bool, wrap: bool,
                       window: tuple[int, int]) -> torch.Tensor:
    """(b, 1, g, c, w) bool: real key, inside the layout, and (causal) not in the future."""
    b = mask.shape[0]
    positions = torch.arange(g * c, device=mask.device).view(1, 1, g, c)  # (1, 1, g, c)
    key_positions = look_adjacent(positions, *window)  # (1, 1, g, w)
    key_real = look_adjacent(mask.view(b, 1, g, c), *window)  # (b, 1, g, w)
    in_layout = neighbour_mask(g, g, *window, wrap, mask.device).repeat_interleave(c, dim=1)  # (g, w)
    valid = (key_real & in_layout)[..., None, :]  # (b, 1, g, 1, w)
    if causal:
        valid = valid & (key_positions[..., None, :] <= positions[..., :, None])  # (b, 1, g, c, w)
    return valid.expand(b, 1, g, c, key_real.shape[-1])
