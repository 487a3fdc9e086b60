"""Full (dense) attention: the baseline a Reformer layer is compared with.

Legend: b batch, h heads, n length, d head width.
Uses PyTorch `scaled_dot_product_attention` when there is no dropout, and an
explicit softmax (with a seeded dropout mask) otherwise. O(n^2) by design.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .chunking import (check_attention_mask, check_qkv, explicit_precision, mask_values, upcast, zero_masked_queries,
                        zero_padded)
from ..rng import dropout as seeded_dropout
from .backend import choose
from .chunking import normalize_keys
from .reference import full_attention_reference


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with causal and padding masks. q, k, v (b, h, n, d) -> (b, h, n, d)."""
    b, h, n, d = check_qkv({"q": q, "k": k, "v": v})
    attention_mask = check_attention_mask(attention_mask, b, n)
    with_dropout = dropout > 0.0 and dropout_seed is not None
    backend = choose("full_attention", q, fused=["dense attention"], reference=["dropout"] if with_dropout else [])
    if backend == "reference":
        return full_attention_reference(q, k, v, causal=causal, attention_mask=attention_mask)
    k, v = zero_padded(k, attention_mask), zero_padded(v, attention_mask)
    allowed = _allowed(attention_mask, b, n, causal, q.device)  # (b, 1, n, n) or None
    if dropout == 0.0 or dropout_seed is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    else:
        with explicit_precision(q.device):
            q_up, k_up, v_up = upcast(q, k, v)
            dots = (q_up @ k_up.transpose(-1, -2)) / math.sqrt(d)  # (b, h, n, n)
            if allowed is None:
                allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
            dots = dots.masked_fill(~allowed, float("-inf"))
            probs = seeded_dropout(torch.softmax(dots, dim=-1), dropout, dropout_seed)
            out = (probs @ v_up).to(q.dtype)
    return zero_masked_queries(out, attention_mask)


def _allowed(attention_mask, b, n, causal, device):
    """(b, 1, n, n) bool of allowed pairs, or None for no mask.

    A padded query may see itself, so that no row is empty (its output is zeroed later).
    """
    if attention_mask is None and not causal:
        return None
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)  # (n, n)
    if causal:
        allowed = allowed.tril()
    if attention_mask is None:
        return allowed
    allowed = attention_mask[:, None, None, :] & allowed  # (b, 1, n, n)
    return allowed | torch.eye(n, dtype=torch.bool, device=device)


def shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        attention_mask: torch.Tensor | None = None, dropout: float = 0.0,
                        dropout_seed: int | None = None) -> torch.Tensor:
    """Full attention with LSH attention's conventions: the "Full" column of the paper's Table 2.

    Keys are the unit-length query-keys, logits are not scaled, a token sees
    itself only when nothing else is allowed. Equals `lsh_attention` with one
    round and one chunk holding the whole sequence. qk, v (b, h, n, d) -> (b, h, n, d).
    Attention-probability dropout comes from `dropout_seed` (None: no dropout).
    """
    b, h, n, d = check_qkv({"qk": qk, "v": v})
    attention_mask = check_attention_mask(attention_mask, b, n)
    choose("shared_qk_attention", qk, fused=["dense attention"], reference=["shared query-keys"])
    dtype = qk.dtype
    with explicit_precision(qk.device):
        qk, v = upcast(zero_padded(qk, attention_mask), zero_padded(v, attention_mask))
        self_value, masked_value = mask_values(dtype)
        dots = qk @ normalize_keys(qk).transpose(-1, -2)  # (b, h, n, n)
        dots = dots.masked_fill(torch.eye(n, dtype=torch.bool, device=qk.device), self_value)
        allowed = _allowed(attention_mask, b, n, causal, qk.device)
        if allowed is not None:
            dots = dots.masked_fill(~allowed, masked_value)
        probs = seeded_dropout(torch.softmax(dots, dim=-1), dropout, dropout_seed)
        out = (probs @ v).to(dtype)
    return zero_masked_queries(out, attention_mask)
