"""Angular LSH (Reformer, Kitaev et al. 2020, section 2): bucket arithmetic, random rotations, hashing and the
sort by (bucket, position) that every LSH attention starts from.

Legend: b batch, h heads, n length, d head width, r hash rounds, rot rotated coordinates per round.
"""

from __future__ import annotations

import math

import torch

from . import native
from .chunking import explicit_precision, upcast

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
                 mask: torch.Tensor | None = None, native_kernel: bool | None = None) -> torch.Tensor:
    """Angular LSH: bucket = argmax([xR ; -xR]) per round.

    x (b, h, n, d), rotations (h, d, r, rot), mask (b, n) bool or None.
    Factorised buckets take one slice of the rotation per factor; the first
    factor is the least significant digit. Masked positions get bucket
    `total_buckets(n_buckets)`. Returns (b, h, r, n) int64. native_kernel: the argmax in the native
    kernel (None: as the backend chooses for x).
    """
    if native_kernel is None:
        from .backend import choose

        native_kernel = choose("hash_vectors", x) == "native"
    b, h, n, _ = x.shape
    piece = max(1, HASH_PIECE_ELEMENTS // (b * h * rotations.shape[2] * rotations.shape[3]))  # positions
    buckets = torch.cat([_hash_piece(x[:, :, start:start + piece], rotations, n_buckets, native_kernel)
                         for start in range(0, n, piece)], dim=-1)  # (b, h, r, n)
    stride = total_buckets(n_buckets)
    if mask is not None:
        buckets = torch.where(mask[:, None, None, :], buckets, torch.full_like(buckets, stride))
    return buckets


def _hash_piece(x: torch.Tensor, rotations: torch.Tensor, n_buckets: Buckets, native_kernel: bool) -> torch.Tensor:
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
        buckets += signed_argmax(rotated[..., offset:offset + factor // 2, :], native_kernel) * stride
        offset += factor // 2
        stride *= factor
    return buckets


def signed_argmax(y: torch.Tensor, native_kernel: bool = True) -> torch.Tensor:
    """`first_signed_argmax`, by the native kernel (`hash_kernel.cpp`, one pass) when native_kernel and it takes y
    (float32 or float64 on the CPU); else by `first_signed_argmax`. (A NaN is never the maximum here.)"""
    lib = native.library_for(y) if native_kernel else None
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


def validate_n_buckets(n_buckets: int | tuple[int, ...]) -> None:
    factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
    if not factors or any(not isinstance(f, int) or isinstance(f, bool) or f < 2 or f % 2 for f in factors):
        raise ValueError(
            f"n_buckets must be an even int >= 2 or a tuple of them (factorised buckets), got {n_buckets!r}"
        )
