"""What the benchmarks share: cells in fresh processes, the machine's matmul rate, and result files.

    run_worker(command, contender, length, timeout_s)   one cell in its own process: its last line of JSON
    matmul_gflops(device, precision)                    the machine's rate (REFORMER_RATE_SIZE^3 products)
    command_line(script, argv)                          how a result file names the command that made it
    write_result(path, text)                            a result file (the commit named under its title)
    source_commit()                                     the commit the benchmark ran at
    cpu_name()                                          the CPU, with the vector units that decide its speed

A result file names its command, the date and the commit; benchmarks/results/ keeps the latest output of each
benchmark.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """How a result file cites the command that made it: `python benchmarks/SCRIPT ARGS` (sys.argv's when None)."""
    return f"python benchmarks/{script}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


def source_commit() -> str:
    """The repository's commit (short hash), "+ changes" when the source tree differs from it; "" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"], cwd=root,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + (" + changes" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name and its widest vector units (AVX-512, AMX), from /proc/cpuinfo where there is one."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    units = [name for flag, name in (("avx512f", "AVX-512"), ("amx_bf16", "AMX"), ("avx2", "AVX2")) if flag in flags]
    units = units if "AVX-512" not in units else [u for u in units if u != "AVX2"]
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({', '.join(units)})" if units else name


def write_result(path: Path, text: str) -> Path:
    """Write a markdown result to PATH (replacing it), naming the commit under its title; return the path."""
    commit = source_commit()
    if commit and text.startswith("# "):
        title, _, rest = text.partition("\n")
        text = f"{title}\n\nCommit: {commit}.\n{rest}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rate_size() -> int:
    """The side of the products that measure the matmul rate: REFORMER_RATE_SIZE, 4096 by default."""
    text = os.environ.get("REFORMER_RATE_SIZE", "4096")
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"REFORMER_RATE_SIZE must be a positive whole number (the side of the products that "
                         f"measure the matmul rate; 4096 by default), not {text!r}")
    return int(text)


RATE_SIZE = rate_size()
RATE_LABEL = f"{RATE_SIZE}^3"


def matmul_gflops(device_name: str, precision: str = "fp32") -> float:
    """The machine's matrix-multiply rate: the median of 5 (RATE_SIZE, RATE_SIZE) products after 2 warm-ups."""
    import torch

    device = torch.device(device_name)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(RATE_SIZE, RATE_SIZE, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * RATE_SIZE**3 / statistics.median(times) / 1e9



def run_worker(command: list[str], contender: str, length: int, timeout_s: float) -> dict:
    """One cell in a fresh process: the worker's last line of stdout (JSON), or the reason it failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"contender": contender, "length": length, "error": "timed out"}
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1][:120]
        return {"contender": contender, "length": length, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])
