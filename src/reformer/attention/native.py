"""The native CPU kernels (`window_kernel.cpp`, `hash_kernel.cpp`): compiled on first use, loaded with ctypes.

The sources are plain C++ with a C interface; they are compiled once per machine
(with g++, no PyTorch headers) into one library in the cache directory, under a
name that hashes the sources, the compiler command, PyTorch's version and the
CPU's flags, and written atomically (compiled to a temporary name, then
renamed). The window kernel runs its chunks' small products in its own
register-tiled product where the compiler targets AVX-512, else in the BLAS
inside libtorch_cpu, which the library links against: the CPU decides, when the
library is built (the tests build the BLAS variant with -DREFORMER_BLAS_PRODUCTS).
Its threads are PyTorch's OpenMP threads (`torch.set_num_threads`). Which calls
take these kernels is `backend.py`'s decision.

`library()` returns the loaded library, or None when it cannot be had: set
REFORMER_NATIVE=0, no C++ compiler (`CXX`, default g++), or a failed build
(a warning says why, once). Callers then take the PyTorch path, which computes
the same thing. The cache directory is $REFORMER_CACHE, else
$XDG_CACHE_HOME/reformer, else ~/.cache/reformer.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("window_kernel.cpp", "hash_kernel.cpp"))
ENABLE_VARIABLE = "REFORMER_NATIVE"  # "0": never build nor use the native kernel
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}  # the dtypes the kernels take, and their names' suffix
VERSION = 7  # reformer_window_kernel_version() of the source this module speaks to

_POINTER = ctypes.c_void_p
_SIGNATURES = {  # None: the dtype's scalar type
    "forward": [ctypes.c_int] * 4 + [_POINTER] * 6 + [None] * 4 + [_POINTER] * 4,
    "backward": [ctypes.c_int] * 4 + [_POINTER] * 6 + [None] * 4 + [_POINTER] * 6 + [ctypes.c_int] + [_POINTER] * 2
    + [ctypes.c_int] + [_POINTER] * 5,
    "mask": [ctypes.c_int] * 3 + [_POINTER] * 2,
}


class MaskSpec(ctypes.Structure):
    """window_kernel.cpp's MaskSpec: a block's additive mask, dense or as the recipe of fused_chunks.MaskRecipe."""

    _fields_ = [("dense", _POINTER), ("q_pos", _POINTER), ("k_pos", _POINTER), ("bias", _POINTER),
                ("causal", ctypes.c_int32), ("self_mode", ctypes.c_int32), ("diagonal", ctypes.c_int32),
                ("has_band", ctypes.c_int32), ("band", ctypes.c_double), ("self_value", ctypes.c_double),
                ("masked_value", ctypes.c_double)]


_SIGNED_ARGMAX = [ctypes.c_int64] * 3 + [_POINTER] + [ctypes.c_int64] * 2 + [_POINTER]


def enabled() -> bool:
    return os.environ.get(ENABLE_VARIABLE, "1") != "0"


def library() -> ctypes.CDLL | None:
    """The native kernel's library, built on first use; None when disabled or unavailable."""
    return _load() if enabled() else None


def library_for(rows: torch.Tensor) -> ctypes.CDLL | None:
    """The library when its kernels take these rows (on the CPU, float32 or float64), else None."""
    if rows.device.type != "cpu" or rows.dtype not in SUFFIXES:
        return None
    return library()


def tile_products_in_use() -> bool:
    """Whether the window kernel's chunk products run in its register-tiled product (the CPU has AVX-512; False:
    the BLAS, or no native kernels)."""
    lib = library()
    return lib is not None and bool(lib.reformer_window_products())


def cache_dir() -> Path:
    if os.environ.get("REFORMER_CACHE"):
        return Path(os.environ["REFORMER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reformer"


def _torch_lib() -> Path:
    return Path(torch.__file__).resolve().parent / "lib"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _command(compiler: str, output: Path, sources: tuple[Path, ...] = SOURCES,
             defines: tuple[str, ...] = ()) -> list[str]:
    lib = _torch_lib()
    return [compiler, *FLAGS, *(f"-D{name}" for name in defines), *map(str, sources), "-o", str(output), f"-L{lib}",
            "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    command = " ".join(_command(compiler, Path("out")))
    for part in (*(source.read_bytes() for source in SOURCES), command.encode(), torch.__version__.encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        key.update(part)
    return cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        _warn(f"it is built on Linux only, not on {platform.system()}")
        return None
    compiler = _compiler()
    if compiler is None:
        _warn(f"no C++ compiler found ({os.environ.get('CXX', 'g++')}): install g++ or set CXX")
        return None
    try:
        path = _library_path(compiler)
        if not path.exists():
            build(compiler, path)
        return open_library(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _warn(str(error))
        return None


def open_library(path: Path) -> ctypes.CDLL:
    """The built library at `path`, its functions typed; raises RuntimeError unless it is this module's VERSION."""
    lib = ctypes.CDLL(str(path))
    if lib.reformer_window_kernel_version() != VERSION:
        raise RuntimeError(f"{path} is version {lib.reformer_window_kernel_version()}, expected {VERSION}")
    for kind, signature in _SIGNATURES.items():
        for dtype, suffix in SUFFIXES.items():
            scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
            function = getattr(lib, f"reformer_window_{kind}_{suffix}")
            function.argtypes = [scalar if argument is None else argument for argument in signature]
            function.restype = None if kind == "mask" else ctypes.c_int  # 1: an index out of range
    for suffix in SUFFIXES.values():
        signed_argmax = getattr(lib, f"reformer_signed_argmax_{suffix}")
        signed_argmax.argtypes, signed_argmax.restype = _SIGNED_ARGMAX, None
    return lib


def build(compiler: str, path: Path, sources: tuple[Path, ...] = SOURCES, defines: tuple[str, ...] = ()) -> None:
    """Compile `sources` (by default the package's) into the library at `path`, atomically; `defines` are
    preprocessor names to define (the tests' REFORMER_BLAS_PRODUCTS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        result = subprocess.run(_command(compiler, partial, sources, defines), capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {' and '.join(source.name for source in sources)} failed:\n"
                               f"{result.stderr[-2000:]}")
        os.replace(partial, path)  # atomic: another process sees the whole library or none


def _warn(reason: str) -> None:
    warnings.warn(f"reformer: the native CPU kernel is unavailable, using the PyTorch path (slower): {reason}. "
                  f"Set {ENABLE_VARIABLE}=0 to silence this.", RuntimeWarning, stacklevel=3)
