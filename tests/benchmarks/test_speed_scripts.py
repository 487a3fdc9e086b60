"""The speed benchmarks run end to end on tiny inputs (smoke tests: benchmarks report, they never assert)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from reformer.attention import native

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compare_quick_run_writes_a_table_and_plots(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--lengths", "256", "512",
                    "--contenders", "ours", "sdpa", "--repeats", "1", "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = (tmp_path / "compare.md").read_text()
    assert "| 512 |" in text and "GFLOP/s" in text and "speed-up over SDPA" in text
    # "auto": 6 small layers fit, and their feed-forward outputs beside them
    assert "| 512 | reformer (ours) (attention kept in 6 of 6 layers, feed-forward outputs in 6) |" in text
    cells = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert {cell["contender"]: cell.get("kept_layers") for cell in cells} == {"ours": 6, "sdpa": None}
    assert {cell["contender"]: cell.get("kept_outputs") for cell in cells} == {"ours": 6, "sdpa": None}
    ours = [cell for cell in cells if cell["contender"] == "ours"]
    assert all(0 < cell["kept_mib"] + cell["kept_outputs_mib"] <= 256 for cell in ours)
    # our cells measure the matmul rate in their own process right after their steps, and the targets give both
    assert all(len(cell["matmul_after"]) == 1 and cell["matmul_after"][0] > 0 for cell in ours)
    assert all("matmul_after" not in cell for cell in cells if cell["contender"] == "sdpa")
    assert f"({ours[-1]['matmul_after'][0]:.0f}) |" in text and "measured right after its steps" in text
    assert (tmp_path / "time_vs_length.png").is_file() and (tmp_path / "memory_vs_length.png").is_file()


def test_compare_runs_the_hf_peer(tmp_path):
    """HF's cell runs from benchmarks/, where a script named like a module transformers imports replaced it."""
    pytest.importorskip("transformers")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--lengths", "256", "--contenders", "hf",
                    "--repeats", "1", "--out-dir", str(tmp_path)], check=True, capture_output=True, text=True,
                   timeout=600)
    (cell,) = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert cell["contender"] == "hf" and "error" not in cell and cell["step_s"] > 0, cell


@pytest.mark.slow
def test_million_quick_run_writes_a_table(tmp_path):
    out = tmp_path / "million.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "million.py"), "--tokens", "4096", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    assert "| 4,096 |" in out.read_text()


def test_compare_shares_use_the_rate_measured_after_the_steps_over_all_rounds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    first = {"contender": "ours", "length": 4096, "times": [2.0], "step_s": 2.0, "peak_mib": 100.0, "matmul_after": [100.0]}
    merged = compare.merge_runs(compare.merge_runs(first, {**first, "matmul_after": [120.0]}),
                                {**first, "matmul_after": [200.0]})
    assert merged["matmul_after"] == [100.0, 120.0, 200.0] and compare.adjacent_rate(merged) == 120.0
    old = {key: value for key, value in first.items() if key != "matmul_after"}  # a cell of an earlier run
    assert compare.adjacent_rate(old) is None and compare.merge_runs(old, old).get("matmul_after") is None
    model = compare.model_flops_per_step(4096) / 2.0 / 1e9
    rows = compare.targets_table({("ours", 4096): merged}, [4096], ["ours"], rate_gflops=model * 2)
    assert f"({50:.0f}%) | **{model / 120:.0%}** (120) |" in rows[-1]
    rows = compare.targets_table({("ours", 4096): old}, [4096], ["ours"], rate_gflops=model * 2)
    assert "(50%) | - |" in rows[-1]


def test_compare_refuses_a_missing_resume_log(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--resume",
                           str(tmp_path / "absent.log")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--resume" in done.stderr and "no such file" in done.stderr


def test_compare_refuses_zero_rounds():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--rounds and --repeats must be at least 1" in done.stderr


@pytest.mark.slow
def test_profile_quick_run_writes_both_tables(tmp_path):
    out = tmp_path / "profile.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--length", "512", "--steps", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert "| feed-forward backward |" in text and "| window kernel, forward |" in text
    assert "`aten::" in text and "--length 512" in text
    rates = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[-1] for line in text.splitlines()
             if line.startswith("| ") and " | " in line}
    for part in ("feed-forward backward", "window kernel, forward", "window kernel, backward",
                 "hashing", "projections backward"):  # products recorded inside them
        assert "%)" in rates[part], (part, rates[part])
    assert "%)" not in rates["sorting"]  # no products there


def test_profile_refuses_zero_steps():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--steps and --length must be at least 1" in done.stderr


@pytest.mark.slow
def test_sliding_quick_run_writes_a_table_and_a_plot(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sliding.py"), "--lengths", "512", "1024",
                    "--contenders", "ours", "ours_longformer", "hf_global", "--repeats", "1", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = (tmp_path / "sliding.md").read_text()
    assert "| 1,024 | HF, 16 global tokens + q_g, k_g, v_g |" in text and "--lengths 512 1024" in text
    assert (tmp_path / "sliding.png").is_file()


def test_sliding_targets_compare_the_cells_the_issue_names():
    """The band ratio is ours with global tokens over ours; speed and memory are HF's over ours with the same
    six projections; a target missed says NOT met."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sliding
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def cell(step_s, peak, step):
        return {"step_s": step_s, "peak_mib": peak, "step_mib": step}

    results = {("ours", 16384): cell(1.0, 400, 200), ("ours_global", 16384): cell(1.4, 400, 200),
               ("ours_longformer", 16384): cell(2.0, 500, 300), ("hf_global", 16384): cell(6.0, 1000, 600),
               ("ours_global64", 16384): cell(1.6, 400, 200), ("ours_longformer64", 16384): cell(2.0, 500, 300),
               ("hf_global64", 16384): cell(6.0, 1000, 600)}
    rows = sliding.targets(results)
    assert "| 16,384 | 16 | 1.40x (2.00x) | 3.00x | 0.50 / 0.50 | met |" in rows
    assert "| 16,384 | 64 | 1.60x (2.00x) | 3.00x | 0.50 / 0.50 | NOT met |" in rows
    assert not any("65,536" in row for row in rows)  # its cells did not run
    assert sliding.targets({}) == []


@pytest.mark.slow
def test_prefix_lsh_quick_run_writes_a_table(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefix_lsh.py"), "--dup-steps", "2", "--text-steps",
                    "2", "--out", str(tmp_path)], check=True, capture_output=True, text=True, timeout=900)
    text = (tmp_path / "prefix_lsh.md").read_text()
    assert "| duplication | prefix-consistent LSH | 2 |" in text and "| text | full | 2 |" in text


@pytest.mark.slow
def test_compare_runs_variants_of_ours_beside_ours_under_a_tag(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--lengths", "256",
                    "--contenders", "ours", "ours_prefix", "ours_pytorch", "--repeats", "1", "--tag", "variants",
                    "--out-dir", str(tmp_path)], check=True, capture_output=True, text=True, timeout=600)
    text = (tmp_path / "compare_variants.md").read_text()
    assert "ours, prefix-consistent LSH" in text and "ours on the torch backend (REFORMER_BACKEND=torch)" in text
    cells = {cell["contender"]: cell for cell in json.loads((tmp_path / "compare_variants.json").read_text())["results"]}
    assert cells["ours"]["native"] is cells["ours_prefix"]["native"] is (native.library() is not None)
    assert cells["ours_pytorch"]["native"] is False


@pytest.mark.parametrize("script, args, message", [
    ("sliding.py", ["--repeats", "0"], "--repeats and --lengths must be at least 1"),
    ("prefix_lsh.py", ["--dup-steps", "0"], "--dup-steps and --text-steps must be at least 1"),
])
def test_new_benchmarks_refuse_zero_counts(script, args, message):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.slow
def test_compare_resumes_an_interrupted_run_from_its_log(tmp_path):
    """A log cut after the first cell: the resumed run replays that cell (same numbers) and runs the other."""
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--lengths", "256", "--contenders", "ours",
               "sdpa", "--repeats", "1", "--out-dir", str(tmp_path)]
    first = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout.splitlines()
    rate_line, ours_line = first[0], first[1]
    assert rate_line.startswith("round 1: matmul rate") and '"contender": "ours"' in ours_line
    log = tmp_path / "cut.log"
    log.write_text(f"{rate_line}\n{ours_line}\n")
    resumed = subprocess.run([*command, "--resume", str(log)], check=True, capture_output=True, text=True,
                             timeout=600).stdout.splitlines()
    assert resumed[0] == rate_line and resumed[1] == ours_line  # replayed, not measured again
    assert '"contender": "sdpa"' in resumed[2] and '"step_s"' in resumed[2]
    text = (tmp_path / "compare.md").read_text()
    ours = json.loads(ours_line)
    assert f"{ours['step_s']:.2f} s" in text and "--resume" in text


def test_no_benchmark_script_shadows_an_installed_or_standard_module():
    """A script runs with benchmarks/ first on sys.path, so a script named like a module that a peer imports
    replaces it there: benchmarks/kernels.py hid the PyPI package `kernels`, which transformers 5.25 imports,
    and HF's cells failed in compare.py."""
    import importlib.util

    benchmarks = (ROOT / "benchmarks").resolve()

    def found_elsewhere(name: str) -> bool:  # a script an earlier test imported is found as ours
        spec = importlib.util.find_spec(name)
        return spec is not None and Path(spec.origin or "").resolve().parent != benchmarks

    here = [entry for entry in sys.path if Path(entry or ".").resolve() != benchmarks]
    with mock.patch.object(sys, "path", here):
        shadowed = [path.stem for path in sorted(benchmarks.glob("*.py"))
                    if path.stem in sys.stdlib_module_names or found_elsewhere(path.stem)]
    assert not shadowed, f"rename these benchmark scripts: {shadowed}"


@pytest.mark.parametrize("size", ["0", "big", "-5"])
def test_a_bad_rate_size_says_what_it_must_be(size):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "REFORMER_RATE_SIZE": size})
    assert done.returncode == 1 and "REFORMER_RATE_SIZE must be a positive whole number" in done.stderr
