"""benchmarks/gpu.py's smoke run (what it does without a GPU): every part of the GPU run at toy sizes on the CPU,
Triton under its interpreter; it says that no figure is a GPU figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_smoke_run_covers_every_part_and_says_it_is_not_a_gpu_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "no figure here is a GPU figure" in text and "(passed)" in text
    assert "| 128 | " in text and "failed" not in text.split("## Attention layers")[0]
    for layer in ("LSH (ours), 256", "SDPA flash, causal, 256", "sliding window (ours), 256",
                  "FlexAttention (forward only), 256"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {layer} |"))
        assert "failed" not in row and "skipped" not in row, row
    cells = json.loads(out.with_suffix(".json").read_text())
    assert {cell["contender"] for cell in cells["steps"] if "step_s" in cell} == {"ours", "hf", "sdpa"}
