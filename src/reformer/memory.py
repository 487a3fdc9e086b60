"""Process memory helpers: peak RSS, and a glibc setting that returns freed memory at once.

Why: glibc's malloc raises its mmap threshold every time a large block is freed
(up to 32 MiB). After that, tensors of a few MiB come from the heap, and the
heap keeps what they leave behind. A reversible model allocates and frees one
layer's worth of such tensors per layer, so the process RSS can creep above
the live tensors (`benchmarks/memory.py` and its `--default-malloc` variant
compare the two; since the reversible stack works in place, the difference is
a few percent).
`release_freed_memory_eagerly()` fixes the threshold, which turns the dynamic
adjustment off: blocks above it are mapped and unmapped directly. A lower
threshold saves a little more memory but costs page faults, which slow
training; 8 MiB is the compromise. Fixing it also freezes glibc's trim
threshold at 128 KiB, so the heap would give its top back to the OS after
nearly every free and fault it in again on the next allocation (a large share
of a training step's CPU time went to page faults); the
trim threshold is set to 64 MiB instead, which keeps that much free memory at
the top of the heap at most. It changes
the whole process, so the library never calls it on import; the demo and the
benchmarks call it, and so can you (once, at the start of a program).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
DEFAULT_THRESHOLD = 8 << 20
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
