"""Position chunks: what the position-wise parts of a layer (projections, feed-forward, loss) run over."""

from __future__ import annotations


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering range(length); chunk_size 0 means one chunk."""
    step = chunk_size if chunk_size > 0 else max(length, 1)
    return [(start, min(start + step, length)) for start in range(0, length, step)]
