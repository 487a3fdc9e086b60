"""The Triton kernels pass Triton's compiler for NVIDIA GPUs (A100: sm_80, H100: sm_90) down to a cubin, on this
machine without a GPU: what the interpreter tests (test_triton.py) cannot show, since the interpreter runs the
kernels' Python source with NumPy. At the tiles `triton_chunks.tiles` picks, each fits an A100's shared memory,
and on the H100 the 16-bit kernels (what GPU training runs) keep everything in registers: no spills. Their speed
still needs a GPU (benchmarks/gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_compile.py")
A100_SHARED_BYTES = 163 * 1024  # the shared memory one block may use on sm_80 (sm_90: 227 KiB)


def compiled(variants: str, tmp_path) -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here and now, not read from an earlier run's cache
    done = subprocess.run([sys.executable, str(SCRIPT), variants, "80", "90"], capture_output=True, text=True,
                          env=env, timeout=900, cwd=SCRIPT.parents[2])
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no NVIDIA toolchain (ptxas)")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(r["kernel"], r["arch"]) for r in results} == {(kernel, arch) for kernel in ("forward", "dq", "dkdv")
                                                          for arch in (80, 90)}
    assert all(r["cubin_bytes"] > 0 and r["shared_bytes"] <= A100_SHARED_BYTES for r in results)
    return results


def test_the_16_bit_kernels_compile_for_a100_and_h100_without_spilling_on_h100(tmp_path):
    """On sm_80 (no wgmma) a few dozen bytes spill at head width 64: allowed there."""
    results = compiled("half", tmp_path)
    assert {r["rows"] for r in results} == {"bf16", "fp16"}
    spilled = [r for r in results if r["arch"] == 90 and r["stack_bytes"] > 0]
    assert not spilled, spilled
    assert all(r["stack_bytes"] <= 256 for r in results)


@pytest.mark.slow
def test_the_float32_kernels_compile_for_a100_and_h100(tmp_path):
    """Float32 rows multiply in IEEE float32 (FMA, not tensor cores): their tiles spill a little; they fit."""
    assert {r["rows"] for r in compiled("float32", tmp_path)} == {"fp32"}
