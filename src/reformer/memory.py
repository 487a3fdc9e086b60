"""Process memory helpers: peak RSS, and fixed glibc thresholds that keep the heap predictable.

Why: glibc's malloc raises its mmap threshold every time a large block is freed
(up to 32 MiB), and its trim threshold with it. Until it has, every tensor of
more than 128 KiB is mapped afresh and faulted in page by page; after that, what
the heap keeps depends on the history of frees.
`release_freed_memory_eagerly()` fixes the mmap threshold, which turns the
dynamic adjustment off: blocks below it come from the heap, which reuses them
without page faults; blocks at or above it are mapped and unmapped directly,
so freed large blocks leave the process at once. Fixing it also freezes glibc's
trim threshold at 128 KiB, so the heap would give its top back to the OS after
nearly every free and fault it in again on the next allocation; the trim
threshold is set to 64 MiB instead, which keeps that much free memory at the
top of the heap at most.

The mmap threshold is 32 MiB, the largest glibc takes: it serves the
feed-forward's chunks and, below 32,768 tokens, the (n, d_model=256) tensors
from the heap, which reuses them without page faults. At 16,384 tokens a training step
of compare.py's model (feed-forward chunks of 1,024 positions) took 80k page
faults and 0.22 CPU seconds in the kernel against 277k and 0.71 with 8 MiB, and
was faster in 5 of 6 fresh processes (median of the paired ratios 0.940), for
51 MiB more peak RSS (979 against 928 MiB), measured by an A/B script that git
history keeps (`benchmarks/malloc_ab.py --length 16384 --rounds 6 --steps 3
--setting 8,64 --setting 32,64`, removed with the other experiments at d7d0b1b).
What the higher threshold costs is heap that is free but resident: freed blocks
below it stay in the heap for reuse, fragmented between longer-lived ones. At
65,536 tokens with 16 MiB feed-forward chunks a step's peak was 11.6
activations of (n, d_model) against 10.0 with 8 MiB, and the live part (the
peak less the growth of the heap's free bytes) 8.7 with either
(`benchmarks/heap_peak.py`, likewise in git history). Where memory matters more than those page
faults, pass a lower threshold, e.g. `release_freed_memory_eagerly(8 << 20)`,
or keep the feed-forward chunks (ff_chunk_size * d_ff * 4 bytes) above it.
It changes the whole process, so the library never calls it on import; the
demo and the benchmarks call it, and so can you (once, at the start of a program).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
DEFAULT_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit machines)
DEFAULT_TRIM_THRESHOLD = 64 << 20


def release_freed_memory_eagerly(threshold: int = DEFAULT_THRESHOLD,
                                 trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more with mmap, and give the heap's top back to the OS
    only beyond `trim_threshold` free bytes (glibc only). True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def process_status_mib(*fields: str) -> dict[str, float]:
    """Memory fields of /proc/self/status in MiB (e.g. "VmRSS", "RssAnon", "RssFile"); those absent, or all of them
    off Linux, are left out."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    values = {}
    for line in status.read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            values[name] = int(value.split()[0]) / 1024
    return values


def current_rss_mib() -> float:
    """Current resident set size in MiB (Linux; falls back to the peak elsewhere)."""
    return process_status_mib("VmRSS").get("VmRSS", peak_rss_mib())
