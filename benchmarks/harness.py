"""What the benchmarks share: cells in fresh processes, the machine's matmul rate, and result files.

    run_worker(command, contender, length, timeout_s)   one cell in its own process: its last line of JSON
    matmul_gflops(device, precision)                    the machine's rate (REFORMER_RATE_SIZE^3 products)
    command_line(script, argv)                          how a result file names the command that made it
    write_result(out_dir, stem, tag, text)              results/STEM[_TAG].md, replaced when rerun

A result file names its command and the date; benchmarks/results/ keeps the latest output of each benchmark.
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


def write_result(out_dir: Path, stem: str, tag: str, text: str) -> Path:
    """Write a markdown result to OUT_DIR/STEM[_TAG].md, print it, and return its path."""
    out = out_dir / f"{stem}{'_' + tag if tag else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out



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
