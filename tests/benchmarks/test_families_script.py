"""benchmarks/families.py --quick: every family through every task at toy sizes, a table and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_quick_run_writes_every_family_and_task(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "families.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "families.md").read_text()
    for heading in ("## Duplication", "## Text: bits per byte", "## Cost"):
        assert heading in text
    results = json.loads((tmp_path / "families.json").read_text())
    families = {"LSH", "sliding", "sliding, char-LM pattern", "local", "full", "local/LSH"}
    assert {run["family"] for run in results["runs"] if run["task"] == "duplication"} == families | {
        "sliding + global"}
    assert {run["family"] for run in results["runs"] if run["task"] == "text"} == families
    assert {(cell["family"], cell["length"]) for cell in results["costs"] if "step_s" in cell} == {
        (family, length) for family in families for length in (256, 512)}
    assert (tmp_path / "families.png").is_file()


@pytest.mark.parametrize("script,arguments,message", [
    ("families.py", ["--dup-length", "511"], "--dup-length must be even and at least 4"),
    ("families.py", ["--text-steps", "0"], "--text-steps must be at least 1, got 0"),
    ("gpu.py", ["--repeats", "0"], "--repeats, --budget-s and --step-lengths must be positive"),
])
def test_bad_options_stop_with_one_line_before_any_work(script, arguments, message):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *arguments], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
