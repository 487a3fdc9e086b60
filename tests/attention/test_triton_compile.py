"""The Triton kernels pass Triton's compiler for NVIDIA GPUs (A100: sm_80, H100: sm_90) down to a cubin, on this
machine without a GPU: what the interpreter tests (test_triton.py) cannot show, since the interpreter runs the
kernels' Python source with NumPy. Their speed still needs a GPU (benchmarks/gpu.py)."""

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


def test_the_kernels_compile_to_cubins_for_a100_and_h100(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here and now, not read from an earlier run's cache
    done = subprocess.run([sys.executable, str(SCRIPT), "80", "90"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=SCRIPT.parents[2])
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no NVIDIA toolchain (ptxas)")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(r["kernel"], r["rows"], r["arch"]) for r in results} == {
        (kernel, rows, arch) for kernel in ("forward", "dq", "dkdv") for rows in ("bf16", "fp16", "fp32")
        for arch in (80, 90)}
    assert all(r["cubin_bytes"] > 0 and r["shared_bytes"] <= A100_SHARED_BYTES for r in results)
