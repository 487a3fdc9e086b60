"""Which implementation runs an attention call: the one place that decides.

Backends:
- "reference": the oracles of `reference.py` (Python loops over queries; for tests and small inputs).
- "torch": PyTorch operators only: the fused chunk kernel's blocks on PyTorch's CPU flash attention where the
  call allows the fused kernel, else explicit chunk scores (dropout, dedup, ...); any device and dtype.
- "native": the fused chunk kernel's blocks, and LSH hashing's argmax, in this package's C++ (`native.py`):
  CPU tensors in float32 or float64, the options the fused kernel takes.
- "triton": the fused chunk kernel's forward and backward as Triton kernels (`triton_chunks.py`): CUDA
  tensors in float32, bfloat16 or float16, the options the fused kernel takes; on CPU tensors too when
  TRITON_INTERPRET=1 was set before they were first used (Triton's interpreter: how the tests run them).

By default every call takes "native" where it can run it, else "triton" on CUDA where Triton is installed
and the call is one the fused kernel takes, and "torch" otherwise. `use_backend(name)` (a context
manager, for the calls made inside it) or the environment variable REFORMER_BACKEND=name forces one; a forced
backend that cannot run a call raises `BackendError`, one line saying why, rather than switching silently.
REFORMER_NATIVE=0, the older switch, still turns the native kernels off (deprecated: REFORMER_BACKEND=torch).

The decision is made when a call starts and travels with it (a fused call's plan records it), so a backward
that runs outside the `use_backend` block still takes the forward's backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from . import native

BACKENDS = ("reference", "torch", "native", "triton")
VARIABLE = "REFORMER_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("reformer_backend", default=None)
_warned_native_variable = []


class BackendError(ValueError):
    """A forced backend that cannot run this call; the message says why and what to use."""


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the attention calls made inside the block on backend `name` (one of BACKENDS)."""
    token = _forced.set(_check(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend `use_backend` or REFORMER_BACKEND forces, or None (each call chooses)."""
    name = _forced.get()
    if name is None and os.environ.get(VARIABLE):
        name = _check(os.environ[VARIABLE], VARIABLE)
    return name


def native_runs(x: torch.Tensor) -> str | None:
    """Why the native kernels cannot take rows like x, or None when they can."""
    if x.device.type != "cpu" or x.dtype not in native.SUFFIXES:
        return f"it takes CPU tensors in float32 or float64, not {x.dtype} on {x.device.type}"
    if not native.enabled():
        if not _warned_native_variable:
            _warned_native_variable.append(True)
            warnings.warn(f"{native.ENABLE_VARIABLE}=0 is deprecated; set {VARIABLE}=torch", DeprecationWarning,
                          stacklevel=4)
        return f"{native.ENABLE_VARIABLE}=0 turns it off"
    if native.library() is None:
        return "its library could not be built (see the warning above)"
    return None


def triton_runs(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take rows like x, or None when they can."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it takes float32, bfloat16 or float16 rows, not {x.dtype}"
    if x.device.type not in ("cuda", "cpu"):
        return f"it takes CUDA tensors, not {x.device.type}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "it takes CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)"
        from . import triton_chunks
        if not triton_chunks.interpreted():
            return "Triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it); set it first"
    return None


def choose(call: str, x: torch.Tensor, *, fused: list[str] = (), reference: list[str] = ()) -> str:
    """The backend for one `call` on rows like x.

    fused: the options of this call that the fused kernel does not take ("dropout", "dedup", ...): the native
    backend cannot run it; reference: those the reference does not model.
    """
    name = forced_backend()
    if name is None:
        if not fused and native_runs(x) is None:
            return "native"
        return "triton" if not fused and x.device.type == "cuda" and triton_runs(x) is None else "torch"
    if name == "triton":
        reason = triton_runs(x) or (f"the fused kernel does not take {', '.join(fused)}" if fused else None)
        if reason is not None:
            raise BackendError(f"{call}: the triton backend cannot run this call: {reason}; use torch")
    if name == "native":
        reason = native_runs(x) or (f"the fused kernel does not take {', '.join(fused)}" if fused else None)
        if reason is not None:
            raise BackendError(f"{call}: the native backend cannot run this call: {reason}; use torch")
    if name == "reference" and reference:
        raise BackendError(f"{call}: the reference does not model {', '.join(reference)}; use torch")
    return name
