"""Longformer attention (Beltagy et al. 2020): a sliding window, dilated per head, with global tokens.

Legend: b batch, h heads, n length, m = n padded to a chunk multiple, d head width, g chunks of c slots,
w window keys per chunk ((before + 1 + after) * c), G global tokens (the most that any row has).

Query i sees the keys i - window * s, ..., i, ..., i + window * s in steps of s, its head's dilation
(causal: only up to i): `window` keys on each side. HF's `attention_window` is 2 * window. Global tokens
attend to every key and every query attends to them, each key counted once; causal keeps both directions
causal. With `global_qkv` (Longformer's Q_g, K_g, V_g), the global rows score q_g . k_g over every key
with values v_g; every other query scores the global keys with its own k and takes v, as allenai's
`longformer.py` and HF's `LongformerSelfAttention` do (`global_rule="global_kv"` keeps the rule of models
saved before it: k_g and v_g there). A padded token is never global, and padded queries output zeros.

How. A head with dilation s attends inside the s classes of positions with the same i mod s, each an
undilated sliding window. The head's slots list its positions class by class (`SlotLayout`). In slot
order a query's band is the `window` slots on each side inside its class, so chunks of c slots with
ceil(window / c) neighbour chunks on each side hold every key it may see; a band mask over "mask
positions" (class * stride + i // s, with classes more than `window` apart) removes the rest. Global
keys leave the band (they come back once, as columns). Time and memory are O(n * (w + G)) per head;
nothing is of size n^2.

Two executions; `sliding_window_attention` picks one:
- fused (CPU, no dropout): the window kernel, block by block, under the band mask; the global keys as
  columns every query sees, merged into each head row's softmax by log-sum-exp, and the global rows as a
  dense pass over every key, block of keys by block, written over their positions
  (`fused_chunks.ChunkedAttention` with `global_tokens.GlobalTokens`). The backward recomputes each
  block, so it stores O(n * d).
- explicit (dropout, or no fused kernel): the chunk scores as a tensor (b, h, g, c, w), the global columns
  (b, h, m, G) beside them, one softmax; the global rows as dense scores (b, h, G, n), written over their
  positions.

Dropout drops attention weights by (batch, head, query, key) (`rng.pair_keep_mask`): the same mask for
any layout or chunking, as the reference draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..rng import pair_keep_mask
from .backend import choose
from .reference import sliding_window_reference
from .chunking import (
    check_attention_mask,
    check_chunk_size,
    check_qkv,
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
from .fused_chunks import (EXACT_FLOAT32, ChunkedAttention, KernelReplay, cached_plan, chunk_plan,
                           fused_kernel_available, projection_rows)
from .global_tokens import GlobalTokens

GLOBAL_RULES = ("longformer", "global_kv")  # what a non-global query takes at a global key: k, v or k_g, v_g


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    dilation: int | Sequence[int] = 1,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    global_mask: torch.Tensor | None = None,
    global_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    global_rule: str = "longformer",
    dropout: float = 0.0,
    dropout_seed: int | None = None,
    chunk_size: int | None = None,
    replay: KernelReplay | None = None,
) -> torch.Tensor:
    """Sliding-window attention with dilation and global tokens.

    Args:
        q, k, v: (b, h, n, d). Logits are scaled by 1/sqrt(d).
        window: keys on each side of the query (causal: before it), >= 1.
        dilation: the step between window keys, one int or one per head.
        causal: no key after the query, global ones included.
        attention_mask: (b, n) bool, True = real token. Padded keys get no weight; padded queries output 0.
        global_mask: (b, n) bool, True = global token (attends to all keys, seen by all queries).
        global_qkv: (q_g, k_g, v_g), each (b, h, n, d): the global projections; default q, k, v. The global
            rows score q_g . k_g and take v_g; the other rows score every key, global or not, with k and v.
        global_rule: "longformer" (the above, allenai's and HF's) or "global_kv": the other rows score the
            global keys with k_g and take v_g there (the rule of models saved before "longformer").
        dropout, dropout_seed: attention-probability dropout from an explicit seed (`rng.pair_keep_mask`).
        chunk_size: slots per chunk of the layout (default: from the window); the result does not depend on it.
        replay: a `KernelReplay` for the reversible recompute (see `lsh_attention`).

    Returns:
        (b, h, n, d).
    """
    b, h, n, d = check_qkv({"q": q, "k": k, "v": v})
    check_window_size(window)
    dilations = check_dilation(dilation, h)
    attention_mask = check_attention_mask(attention_mask, b, n)
    global_mask = check_global_mask(global_mask, b, n, attention_mask)
    if global_qkv is not None:
        global_qkv = check_global_qkv(global_qkv, q.shape)
    if global_rule not in GLOBAL_RULES:
        raise ValueError(f"global_rule must be one of {GLOBAL_RULES}, got {global_rule!r}")
    c = default_chunk_size(window) if chunk_size is None else chunk_size
    check_chunk_size(c)
    layout = SlotLayout.build(n, c, window, dilations, causal, q.device)
    q, k, v = (zero_padded(x, attention_mask) for x in (q, k, v))  # NaN in padding cannot reach a real output
    if global_qkv is not None and global_mask is not None:  # without global tokens nothing reads them
        global_qkv = tuple(zero_padded(x, attention_mask) for x in global_qkv)
    else:
        global_qkv = None
    with_dropout = dropout > 0.0 and dropout_seed is not None
    backend = choose("sliding_window_attention", q, fused=["dropout"] if with_dropout else [])
    if backend == "reference":
        return sliding_window_reference(q, k, v, window=window, dilation=dilations, causal=causal,
                                        attention_mask=attention_mask, global_mask=global_mask,
                                        global_qkv=global_qkv, global_rule=global_rule, dropout=dropout,
                                        dropout_seed=dropout_seed)
    if not with_dropout and fused_kernel_available(q.device, backend):
        out = _fused(q, k, v, global_qkv, attention_mask, global_mask, global_rule, layout, replay,
                     backend=backend)
    else:
        out = _explicit(q, k, v, global_qkv, attention_mask, global_mask, global_rule, layout, dropout, dropout_seed)
    return zero_masked_queries(out, attention_mask)


def default_chunk_size(window: int) -> int:
    """Slots per chunk: the window rounded up to a power of two, within [8, 64]."""
    return min(64, max(8, 1 << (window - 1).bit_length()))


@dataclass(frozen=True)
class SlotLayout:
    """Where each head's slots come from, and the positions its band mask compares.

    order (h, m): the sequence position of each slot (class by class for a dilated head; padding included);
    inverse (h, m): the slot of each position; mask_positions (h, m): class * stride + position // dilation
    per slot, so that two slots of one class are as far apart as their positions over the dilation, and two
    classes are more than `window` apart.
    """

    n: int
    m: int
    chunk: int
    window: int
    causal: bool
    order: torch.Tensor
    inverse: torch.Tensor
    mask_positions: torch.Tensor

    @classmethod
    def build(cls, n: int, chunk: int, window: int, dilations: tuple[int, ...], causal: bool,
              device: torch.device) -> "SlotLayout":
        m = padded_length(n, chunk)
        positions = torch.arange(m, device=device)
        orders, mask_positions = [], []
        for step in dilations:
            stride = -(-m // step) + window + 1
            order = positions if step == 1 else torch.argsort((positions % step) * m + positions)  # class by class
            orders.append(order)
            mask_positions.append((order % step) * stride + order // step)
        order = torch.stack(orders)  # (h, m)
        return cls(n=n, m=m, chunk=chunk, window=window, causal=causal, order=order,
                   inverse=torch.argsort(order, dim=1), mask_positions=torch.stack(mask_positions))

    @property
    def in_position_order(self) -> bool:
        return bool((self.order == torch.arange(self.m, device=self.order.device)).all())

    @property
    def neighbours(self) -> tuple[int, int]:
        """Chunks before and after a chunk that its window needs."""
        side = -(-self.window // self.chunk)
        return side, 0 if self.causal else side

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, n, ...) in position order -> (b, h, m, ...) in slot order (padding rows zero)."""
        x = pad_length(x, self.m, dim=2)
        index = self.order.view(1, *self.order.shape, *([1] * (x.dim() - 3)))
        return x.gather(2, index.expand(x.shape[0], -1, -1, *x.shape[3:]))

    def to_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, m, d) in slot order -> (b, h, n, d) in position order."""
        index = self.inverse[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
        return x.gather(2, index)[:, :, :self.n]


def _band_keys(attention_mask, global_mask, b: int, n: int, m: int, device) -> torch.Tensor:
    """(b, m) bool: the keys a band may hold, real and not global (global keys are columns)."""
    mask = padded_mask(attention_mask, b, n, m, device)
    return mask if global_mask is None else mask & ~pad_length(global_mask, m, dim=1)


def _fused(q, k, v, global_qkv, attention_mask, global_mask, global_rule: str, layout: SlotLayout,
           replay: KernelReplay | None = None, backend: str = "torch") -> torch.Tensor:
    """The band, and the global tokens' columns and rows, on the fused window kernel: (b, h, n, d)."""
    b, h, n, d = q.shape
    m = layout.m

    def global_tokens() -> GlobalTokens | None:
        if global_mask is None:
            return None
        index, present = global_indices(global_mask)  # (b, G) each
        return GlobalTokens(position=index, present=present, key_real=padded_mask(attention_mask, b, n, m, q.device),
                            causal=layout.causal, columns_from_global=global_qkv is not None
                            and global_rule == "global_kv")

    plan = cached_plan(replay, lambda: chunk_plan(
        layout.order.expand(b, h, m), _band_keys(attention_mask, global_mask, b, n, m, q.device), m, layout.chunk,
        layout.causal, False, layout.neighbours, q.dtype, scale=1 / math.sqrt(d), self_value=None,
        self_on_diagonal=True, in_position_order=layout.in_position_order, band=layout.window,
        mask_positions=layout.mask_positions.expand(b, h, m), global_tokens=global_tokens(),
        backend=backend))
    rows = [projection_rows(pad_length(x, m, dim=2)) for x in (q, k, v, *(global_qkv or ()))]  # (b*m*h, d) each
    out = ChunkedAttention.apply(*rows[:3], plan, replay, *rows[3:])  # (b*m*h, d)
    return out.view(b, m, h, d).permute(0, 2, 1, 3)[:, :, :n]  # (b, h, n, d)


def _explicit(q, k, v, global_qkv, attention_mask, global_mask, global_rule: str, layout: SlotLayout,
              dropout: float, dropout_seed: int | None) -> torch.Tensor:
    """The band and the global columns as explicit chunk scores, one softmax, then the global rows as dense
    scores written over their positions: (b, h, n, d). Dropout from `pair_keep_mask`."""
    if dropout_seed is None:  # eval: no dropout
        dropout = 0.0
    with explicit_precision(q.device):
        rows = upcast(q, k, v)
        if global_mask is None:
            return _explicit_band(*rows, attention_mask, None, None, layout, dropout, dropout_seed).to(q.dtype)
        q_g, k_g, v_g = rows if global_qkv is None else upcast(*global_qkv)
        index, present = global_indices(global_mask)  # (b, G) each
        column_kv = (k_g, v_g) if global_rule == "global_kv" else rows[1:]
        columns = (index, present, *(_gather_positions(x, index) for x in column_kv))  # keys, values (b, h, G, d)
        out = _explicit_band(*rows, attention_mask, global_mask, columns, layout, dropout, dropout_seed)
        b, _, n, _ = q.shape
        global_rows = _global_rows(q_g, k_g, v_g, index, present, padded_mask(attention_mask, b, n, n, q.device),
                                   layout.causal, dropout, dropout_seed)  # (b, h, G, d)
        return _put_rows(out, global_rows, index, present).to(q.dtype)


def _explicit_band(q, k, v, attention_mask, global_mask, columns, layout: SlotLayout, dropout: float,
                   dropout_seed: int | None) -> torch.Tensor:
    """The band (and the global columns: positions, present, keys, values) as explicit chunk scores, one
    softmax: (b, h, n, d)."""
    b, h, n, d = q.shape
    c, m = layout.chunk, layout.m
    g = m // c
    before, after = layout.neighbours
    scale = 1 / math.sqrt(d)
    _, masked_value = mask_values(q.dtype)
    q_s, k_s, v_s = (layout.to_slots(x) for x in (q, k, v))  # (b, h, m, d)
    q_c = q_s.view(b, h, g, c, d)  # (b, h, g, c, d)
    k_w = look_adjacent(k_s.view(b, h, g, c, d), before, after)  # (b, h, g, w, d)
    v_w = look_adjacent(v_s.view(b, h, g, c, d), before, after)  # (b, h, g, w, d)
    logits = (q_c @ k_w.transpose(-1, -2)) * scale  # (b, h, g, c, w)
    allowed = _band_allowed(layout, _band_keys(attention_mask, global_mask, b, n, m, q.device))  # (b, h, g, c, w)
    key_positions = look_adjacent(layout.order.view(1, h, g, c), before, after)[:, :, :, None, :]  # (1, h, g, 1, w)
    if columns is None:
        probs = torch.softmax(logits.masked_fill(~allowed, masked_value), dim=-1)
        probs = _drop(probs, dropout, dropout_seed, layout.order.view(1, h, g, c, 1), key_positions)
        return layout.to_positions((probs @ v_w).view(b, h, m, d))

    index, present, keys, values = columns
    column_logits = (q_s @ keys.transpose(-1, -2)).view(b, h, g, c, -1) * scale  # (b, h, g, c, G)
    column_allowed = present[:, None, None, :]  # (b, 1, 1, G)
    if layout.causal:
        column_allowed = column_allowed & (index[:, None, None, :] <= layout.order[None, :, :, None])  # (b, h, m, G)
    column_allowed = column_allowed.expand(b, h, m, -1).reshape(b, h, g, c, -1)
    joint = torch.cat([logits, column_logits], dim=-1).masked_fill(
        ~torch.cat([allowed, column_allowed], dim=-1), masked_value)  # (b, h, g, c, w + G)
    key_positions = torch.cat([key_positions.expand(b, h, g, 1, -1),
                               index[:, None, None, None, :].expand(b, h, g, 1, -1)], dim=-1)  # (b, h, g, 1, w + G)
    probs = _drop(torch.softmax(joint, dim=-1), dropout, dropout_seed, layout.order.view(1, h, g, c, 1), key_positions)
    w = k_w.shape[3]
    out = probs[..., :w] @ v_w + probs[..., w:] @ values[:, :, None]  # (b, h, g, c, d)
    return layout.to_positions(out.view(b, h, m, d))  # (b, h, n, d)


def _drop(probs: torch.Tensor, p: float, seed: int | None, query_positions: torch.Tensor,
          key_positions: torch.Tensor) -> torch.Tensor:
    """Dropout of probabilities (b, h, ...) whose (query, key) positions broadcast to their shape."""
    b, h = probs.shape[:2]
    rest = (1,) * (probs.dim() - 2)
    keep = pair_keep_mask(p, seed, torch.arange(b, device=probs.device).view(-1, 1, *rest),
                          torch.arange(h, device=probs.device).view(1, -1, *rest), query_positions, key_positions)
    return probs if keep is None else probs * keep.to(probs.dtype) / (1.0 - p)


def _band_allowed(layout: SlotLayout, key_real: torch.Tensor) -> torch.Tensor:
    """(b, h, g, c, w) bool: the key is real, in the layout, and inside the query's band (causal: not later)."""
    c, m = layout.chunk, layout.m
    g = m // c
    before, after = layout.neighbours
    h = layout.order.shape[0]
    b = key_real.shape[0]
    positions = layout.mask_positions
    # float32 compares vectorise (int64 abs and sub were 4 s of a 10 s step at 65k tokens); exact below 2^24
    positions = positions.to(torch.float32 if int(positions.max()) < EXACT_FLOAT32 else torch.float64)
    q_pos = positions.view(1, h, g, c, 1)  # (1, h, g, c, 1)
    k_pos = look_adjacent(positions.view(1, h, g, c), before, after)[:, :, :, None, :]  # (1, h, g, 1, w)
    offset = q_pos - k_pos
    inside = (offset >= 0) & (offset <= layout.window) if layout.causal else offset.abs() <= layout.window
    in_layout = neighbour_mask(g, g, before, after, False, key_real.device).repeat_interleave(c, dim=1)  # (g, w)
    real = key_real[:, None, :].expand(b, h, m).gather(2, layout.order.expand(b, h, m))  # (b, h, m) in slot order
    real = look_adjacent(real.view(b, h, g, c), before, after)[:, :, :, None, :]  # (b, h, g, 1, w)
    return inside & real & in_layout[:, None, :]


def global_indices(global_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, G) positions of each row's global tokens, in order, and (b, G) which of them exist."""
    counts = global_mask.sum(dim=1)  # (b,)
    most = int(counts.max())
    index = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)[:, :most]  # globals first
    present = torch.arange(most, device=global_mask.device)[None] < counts[:, None]
    return index, present


def _gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) at positions index (b, G) -> (b, h, G, d)."""
    b, h, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, -1, d))


def _global_rows(q_g, k_g, v_g, index, present, key_real, causal: bool, dropout: float,
                 dropout_seed: int | None) -> torch.Tensor:
    """Each global token's query over every real key (causal: up to it), as dense scores (b, h, G, n):
    (b, h, G, d)."""
    n, d = k_g.shape[2], k_g.shape[3]
    _, masked_value = mask_values(q_g.dtype)
    queries = _gather_positions(q_g, index)  # (b, h, G, d)
    logits = (queries @ k_g.transpose(-1, -2)) / math.sqrt(d)  # (b, h, G, n)
    allowed = key_real[:, None, None, :] & present[:, None, :, None]  # (b, 1, G, n)
    if causal:
        allowed = allowed & (torch.arange(n, device=index.device) <= index[:, None, :, None])
    probs = torch.softmax(logits.masked_fill(~allowed, masked_value), dim=-1)
    return _drop(probs, dropout, dropout_seed, index[:, None, :, None], torch.arange(n, device=index.device)) @ v_g


def _put_rows(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """out (b, h, n, d) with rows (b, h, G, d) written over the positions index (b, G) where present."""
    batch, slot = present.nonzero(as_tuple=True)  # (P,) each
    heads = torch.arange(out.shape[1], device=out.device)
    return out.index_put((batch[:, None], heads[None, :], index[batch, slot][:, None]),
                         rows[batch, :, slot])  # rows (P, h, d)


# --- checks ---------------------------------------------------------------------------------------

def check_window_size(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (keys on each side of the query), got {window!r}")


def check_dilation(dilation: int | Sequence[int], n_heads: int) -> tuple[int, ...]:
    """One dilation per head, each an integer >= 1."""
    values = (dilation,) * n_heads if isinstance(dilation, int) and not isinstance(dilation, bool) else dilation
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"dilation must be an integer >= 1 or one per head, got {dilation!r}") from None
    if len(values) != n_heads:
        raise ValueError(f"dilation has {len(values)} values for {n_heads} heads; give one int, or one per head")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in values):
        raise ValueError(f"dilation must be integers >= 1 (1 = no gaps), got {dilation!r}")
    return values


def check_global_mask(global_mask: torch.Tensor | None, batch: int, n: int,
                      attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(b, n) bool of the real global tokens, or None when there is none."""
    global_mask = global_mask_as_bool(global_mask, (batch, n), "shape (batch, length) =")
    if global_mask is None:
        return None
    if attention_mask is not None:
        global_mask = global_mask & attention_mask  # a padded token is never global
    return global_mask if bool(global_mask.any()) else None


def global_mask_as_bool(global_mask, shape: tuple[int, int], expected: str) -> torch.Tensor | None:
    """global_mask (bool, or integer 0/1) of `shape` as bool; None stays None. `expected` names the shape in the
    error ("the shape of input_ids", ...)."""
    if global_mask is None:
        return None
    if not isinstance(global_mask, torch.Tensor) or global_mask.shape != shape:
        got = tuple(global_mask.shape) if isinstance(global_mask, torch.Tensor) else type(global_mask).__name__
        raise ValueError(f"global_mask must have {expected} {tuple(shape)}, got {got}")
    if global_mask.is_floating_point() or global_mask.is_complex():
        raise TypeError("global_mask must be bool (True = global token) or an integer 0/1 tensor")
    return global_mask != 0


def check_global_qkv(global_qkv, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3:
        raise ValueError("global_qkv must be a tuple (q_g, k_g, v_g) of three tensors shaped like q")
    for name, x in zip(("q_g", "k_g", "v_g"), global_qkv):
        if not isinstance(x, torch.Tensor) or x.shape != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"global_qkv's {name} must have the shape of q {tuple(shape)}, got {got}")
    return tuple(global_qkv)
