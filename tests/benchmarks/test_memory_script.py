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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_heap_peak_reports_the_free_heap_at_the_peak_per_threshold(tmp_path):
    out = tmp_path / "heap.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heap_peak.py"), "--length", "1024",
                           "--layers", "lsh", "local", "--ff-chunk", "512", "--repeats", "1", "--thresholds", "8", "32",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    if "needs glibc" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "MiB |" in line]
    assert [row[0].strip() for row in rows] == ["8 MiB", "32 MiB"]
    for row in rows:
        step, in_use, free = (float(row[i].replace(",", "")) for i in (1, 4, 5))
        assert step > 0 and in_use > 0 and free >= 0


@pytest.mark.parametrize("argv, message", [
    (["--thresholds", "8", "64"], "--thresholds are MiB from 1 to 32"),
    (["--length", "1000"], "--length must be a positive multiple of 128"),
    (["--repeats", "0"], "--repeats and --ff-chunk must be at least 1"),
])
def test_heap_peak_says_which_argument_to_change(argv, message):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heap_peak.py"), *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
