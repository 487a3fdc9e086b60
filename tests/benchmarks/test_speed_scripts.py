"""The speed benchmarks run end to end on tiny inputs (smoke tests: benchmarks report, they never assert)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compare_quick_run_writes_a_table_and_plots(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--lengths", "256", "512",
                    "--contenders", "ours", "sdpa", "--repeats", "1", "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = (tmp_path / "compare.md").read_text()
    assert "| 512 |" in text and "GFLOP/s" in text and "speed-up over SDPA" in text
    assert (tmp_path / "time_vs_length.png").is_file() and (tmp_path / "memory_vs_length.png").is_file()


@pytest.mark.slow
def test_million_quick_run_writes_a_table(tmp_path):
    out = tmp_path / "million.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "million.py"), "--tokens", "4096", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    assert "| 4,096 |" in out.read_text()
