"""Explicit randomness: seeds in, generators out. The global RNG is never used.

A layer call in training receives one integer seed (drawn from the model's own
generator). Everything random inside it (LSH rotations, each dropout mask) is
derived from that seed and a fixed stream id, so a recompute in the reversible
backward replays it exactly, in any order, chunk by chunk.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 63) - 1

# Stream ids: one per random thing a layer draws.
STREAM_ROTATIONS = 1
STREAM_ATTN_PROBS = 2
STREAM_ATTN_OUT = 3
STREAM_FF_HIDDEN = 4
STREAM_FF_OUT = 5
STREAM_EMBED = 6


def derive_seed(seed: int, *stream: int) -> int:
    """Mix `seed` with stream ids into a new 63-bit seed (splitmix64 steps)."""
    x = seed & _MASK64
    for s in stream:
        x = (x + 0x9E3779B97F4A7C15 * (s + 1)) & ((1 << 64) - 1)
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        x = x ^ (x >> 31)
    return x & _MASK64


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device`, seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


def draw_seeds(generator: torch.Generator, count: int) -> list[int]:
    """`count` independent 63-bit seeds from `generator` (which lives on the CPU)."""
    return torch.randint(0, 2**62, (count,), generator=generator, dtype=torch.int64).tolist()


def dropout(x: torch.Tensor, p: float, seed: int | None, *stream: int) -> torch.Tensor:
    """Inverted dropout whose mask comes from `derive_seed(seed, *stream)`.

    `seed=None` or `p == 0` means no dropout (eval). The same seed and stream
    give the same mask, bit for bit.
    """
    return apply_keep(x, keep_mask(x.shape, x.device, p, seed, *stream), p)


def keep_mask(shape, device: torch.device, p: float, seed: int | None, *stream: int) -> torch.Tensor | None:
    """The bool mask of the elements that `dropout` keeps, or None for no dropout.

    Drawn outside any compiled code (a generator is an opaque object to
    torch.compile, and a seed that changes every call would recompile it);
    `apply_keep` is the pure part.
    """
    if seed is None or p == 0.0:
        return None
    gen = generator_for(derive_seed(seed, *stream), device)
    return torch.rand(shape, generator=gen, device=device) >= p


_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an integer hash's multiplier (< 2^27: a product with a 32-bit value fits in int64)


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash of x in [0, 2^32) (int64 tensors or ints), into [0, 2^32)."""
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    return x ^ (x >> 16)


def pair_keep_mask(p: float, seed: int | None, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor,
                   key: torch.Tensor) -> torch.Tensor | None:
    """Which attention probabilities dropout keeps, addressed by (batch, head, query position, key position).

    The arguments are int64 tensors that broadcast together (positions below 2^32); the result has their
    broadcast shape. Each entry is kept with probability 1 - p from a hash of the seed and its four
    coordinates, so any layout of the same probabilities (chunked, dense, row by row) draws the same mask.
    `seed=None` or `p == 0` means no dropout (None).
    """
    if seed is None or p == 0.0:
        return None
    seed = derive_seed(seed, 0)
    x = _mix32(_mix32(seed >> 32) ^ (seed & _M32))
    for coordinate in (batch, head, query, key):  # the small ones first: most of the work is the last step
        x = _mix32(coordinate ^ x)
    return x >= round(p * (1 << 32))


def apply_keep(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """x with the dropped elements zeroed and the kept ones scaled by 1 / (1 - p)."""
    if keep is None:
        return x
    return x * keep.to(x.dtype) / (1.0 - p)
