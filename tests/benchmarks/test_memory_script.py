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
