"""The memory benchmark runs end to end (a smoke test: benchmarks report, they never assert)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reformer.memory import current_rss_mib, peak_rss_mib, process_status_mib, release_freed_memory_eagerly

ROOT = Path(__file__).resolve().parents[2]


def test_rss_helpers_report_plausible_numbers():
    assert 10 < current_rss_mib() <= peak_rss_mib() + 1
    assert isinstance(release_freed_memory_eagerly(), bool)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="/proc/self/status is Linux's")
def test_process_status_gives_the_fields_asked_for_in_mib():
    parts = process_status_mib("RssAnon", "RssFile", "VmRSS", "NoSuchField")
    assert set(parts) == {"RssAnon", "RssFile", "VmRSS"}
    assert 10 < parts["RssAnon"] < parts["VmRSS"] <= peak_rss_mib() + 1
    assert abs(parts["RssAnon"] + parts["RssFile"] - parts["VmRSS"]) < 64  # and RssShmem, a few MiB at most


@pytest.mark.slow
def test_memory_benchmark_quick_run_writes_a_table(tmp_path):
    out = tmp_path / "memory.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    text = out.read_text()
    assert "| layers | length |" in text and "| 2 | 1,024 |" in text and "target <= 1.25" in text


def _memory_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_depth_verdict_judges_the_peaks_less_the_keep_budget_and_prints_the_raw_ratio():
    ratio_line = _memory_module().ratio_line
    deep, shallow = (12, 16384), (2, 16384)

    def runs(peak, kept):
        return [{"peak_mib": peak, "step_peak_mib": peak - 300, "kept_mib": kept}]

    kept_some = {deep: runs(900, 250), shallow: runs(630, 90)}  # raw 1.43x; less kept 650 / 540 = 1.20x
    line = ratio_line("depth", kept_some, deep, shallow, 1.25)
    assert "**1.20x** (target <= 1.25) **PASS**" in line and "raw peaks: 1.43x" in line
    assert "250 and 90 MiB" in line

    kept_none = {deep: runs(900, 0), shallow: runs(630, 0)}  # nothing kept: the raw ratio is judged
    assert "**1.43x** (target <= 1.25) **FAIL**" in ratio_line("depth", kept_none, deep, shallow, 1.25)
    too_much = {deep: runs(1000, 250), shallow: runs(630, 90)}  # less kept 750 / 540 = 1.39x
    assert "**1.39x** (target <= 1.25) **FAIL**" in ratio_line("depth", too_much, deep, shallow, 1.25)
