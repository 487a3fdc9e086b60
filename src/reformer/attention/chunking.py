"""Helpers shared by the chunked attentions: padding, look-back windows, masks, unit-length keys, checks.

Legend: b batch, h heads, n length, d head width, g chunks, c chunk length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEY_EPS = 1e-6  # inside the rsqrt of `normalize_keys`


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16 and float16, else the dtype itself: what logits, softmaxes and sums run in."""
    return torch.promote_types(dtype, torch.float32)


def explicit_precision(device: torch.device) -> torch.autocast:
    """Autocast off, for the explicit-softmax paths, which upcast their rows to `accumulation_dtype` themselves.

    Under autocast their matmuls would round the logits to bfloat16 (2^-8
    relative: a 1% error in probabilities at logits of 3).
    """
    return torch.autocast(device.type, enabled=False)


def upcast(*rows: torch.Tensor) -> list[torch.Tensor]:
    return [x.to(accumulation_dtype(x.dtype)) for x in rows]


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(self logit, masked logit) that are safe in `dtype`.

    float32/float64/bfloat16 use the paper's and Trax's -1e5 and -1e9. float16
    cannot hold -1e9, so it uses -1e4 and -6e4, which behave the same: exp of
    either, next to any realistic logit, is exactly zero.
    """
    if dtype == torch.float16:
        return -1e4, -6e4
    return -1e5, -1e9


def padded_length(n: int, chunk_size: int) -> int:
    return -(-n // chunk_size) * chunk_size


def pad_length(x: torch.Tensor, n_pad: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """Pad `x` with `value` along `dim` up to length `n_pad`."""
    extra = n_pad - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad, value=value)


def padded_mask(attention_mask: torch.Tensor | None, batch: int, n: int, n_pad: int,
                device: torch.device) -> torch.Tensor:
    """(b, n_pad) bool, True for real tokens; the positions added by padding are False."""
    if attention_mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    else:
        mask = attention_mask
    return pad_length(mask, n_pad, dim=1, value=False)


def look_adjacent(x: torch.Tensor, before: int = 1, after: int = 0) -> torch.Tensor:
    """Each chunk with its neighbours: (b, h, g, c, ...) -> (b, h, g, (before + 1 + after) * c, ...).

    The window of chunk i is chunks i - before, ..., i + after in that order
    (HF's `_look_adjacent`), wrapping around at both ends; callers mask the
    neighbours the layout does not have (`neighbour_mask`).
    """
    return torch.cat([x.roll(-offset, dims=2) if offset else x for offset in range(-before, after + 1)], dim=3)


def neighbour_mask(g: int, per_round: int, before: int, after: int, wrap: bool, device) -> torch.Tensor:
    """(g, before + 1 + after) bool: does chunk i have its neighbour at each offset?

    Without wrap, neighbours stay inside the chunk's round (`per_round` chunks).
    With wrap (HF / Trax), every offset is a neighbour once there are two chunks
    or more, even when the wrap-around brings the same chunk twice, as in HF.
    """
    offsets = torch.arange(-before, after + 1, device=device)  # (o,)
    if wrap:
        present = torch.full((g, offsets.numel()), g > 1, dtype=torch.bool, device=device)
        return present | (offsets == 0)
    position = (torch.arange(g, device=device) % per_round)[:, None] + offsets  # (g, o)
    return (position >= 0) & (position < per_round)


def check_window(chunks_before: int, chunks_after: int) -> None:
    for name, value in (("chunks_before", chunks_before), ("chunks_after", chunks_after)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_attention_mask(attention_mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """Validate a (batch, length) padding mask and return it as bool (True = real token)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, n):
        raise ValueError(
            f"attention_mask must have shape (batch, length) = {(batch, n)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError("attention_mask must be bool (True = real token) or an integer 0/1 tensor")
        attention_mask = attention_mask != 0
    return attention_mask


def check_qkv(name_shapes: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """All tensors are floating (b, h, n, d) with the same shape; returns that shape."""
    shape = None
    for name, t in name_shapes.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, length, d_head), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the others have {tuple(shape)}")
    b, h, n, d = shape
    if n == 0:
        raise ValueError("the sequence is empty (length 0); give at least one token")
    return b, h, n, d


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def zero_masked_queries(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set the outputs of padded queries to zero. out (b, h, n, d), mask (b, n)."""
    if mask is None:
        return out
    return torch.where(mask[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def zero_padded(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded rows of x (b, h, n, d), so that even NaN or inf there cannot leak into real outputs."""
    if mask is None:
        return x
    return torch.where(mask[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """Unit-length keys from the shared query-keys: x / rms(x) / sqrt(d) (Trax `length_normalized`)."""
    d = qk.shape[-1]
    return qk * torch.rsqrt(qk.pow(2).mean(dim=-1, keepdim=True) + KEY_EPS) / math.sqrt(d)


def unit_length_keys(rows: torch.Tensor) -> torch.Tensor:
    """`normalize_keys` of rows (m, d) in one pass over them (and one for the norms); equal up to rounding."""
    return rows * _key_scale(rows)


def _key_scale(rows: torch.Tensor) -> torch.Tensor:
    """(m, 1): rsqrt(mean(x^2) + eps) / sqrt(d) per row."""
    d = rows.shape[-1]
    mean_square = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(d)
    return mean_square.add_(KEY_EPS).rsqrt_().div_(math.sqrt(d))


def add_normalize_keys_backward_(into: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
                                 piece: int = 1 << 15) -> None:
    """into += the gradient through `normalize_keys` at rows (m, d), given grad (m, d) of the keys.

    With r = (mean(x^2) + eps)^-1/2, k = x r / sqrt(d) = x s:
    dx = (g r - x r^3 (g . x) / d) / sqrt(d) = g s - x s^3 (g . x). Runs `piece` rows at a time.
    """
    for start in range(0, rows.shape[0], piece):
        x, g = rows[start:start + piece], grad[start:start + piece]
        scale = _key_scale(x)  # s, (p, 1)
        along = torch.linalg.vecdot(g, x, dim=-1)[:, None].mul_(scale.pow(3))  # s^3 (g . x), (p, 1)
        into[start:start + piece].addcmul_(g, scale).addcmul_(x, along, value=-1.0)
