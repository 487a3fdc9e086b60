"""The native kernels of two revisions, call by call, in alternation in one process.

On a shared machine, a step's time moves by 20-30% from one minute to the next,
more than most kernel changes gain or lose, so two runs of benchmarks/kernel_calls.py
cannot tell two revisions apart. This script builds the native sources
(`window_kernel.cpp`, `hash_kernel.cpp`) of --base (a git revision) and of
--head (a revision, or the working tree by default) into two libraries, loads
both, and times benchmarks/kernel_calls.py's calls that use the window kernel (one
block forward, one block backward, the LSH attention of one layer forward and
backward at each --lengths) with each library in turn, call by call, so that
both see the same state of the machine (run it with --base and --head the same
revision for the noise floor), the first library alternating: in every round each call runs --calls times per library
(--layer-calls for the layer). The table gives the median time per call, the
median ratio of the paired calls (head / base), and in how many pairs head was
faster. The Python around the kernels is the working tree's, so both
revisions must have its C interface (native.py's signatures); their versions are
printed, not checked.

    python benchmarks/kernel_ab.py --base 96cd219~1 --head 96cd219   # writes benchmarks/results/kernel_ab.md
    python benchmarks/kernel_ab.py --base HEAD --rounds 5 --out /tmp/ab.md      # the working tree against HEAD
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_calls import calls  # noqa: E402

from reformer.attention import native  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = Path("src/reformer/attention")


def sources_at(revision: str | None, into: Path) -> tuple[Path, ...]:
    """The native sources of a git revision, written under `into` (None: the working tree's, in place)."""
    if revision is None:
        return native.SOURCES
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in native.SOURCES:
        shown = subprocess.run(["git", "show", f"{revision}:{(SOURCE_DIR / source.name).as_posix()}"], cwd=ROOT,
                               capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"kernel_ab: cannot read {source.name} at {revision}: {shown.stderr.strip()}")
        path = into / source.name
        path.write_text(shown.stdout)
        paths.append(path)
    return tuple(paths)


def library_at(revision: str | None, scratch: Path, name: str):
    compiler = native._compiler()
    if compiler is None:
        raise SystemExit("kernel_ab: no C++ compiler found (install g++ or set CXX)")
    path = scratch / f"{name}.so"
    label = revision or "the working tree"
    try:
        native.build(compiler, path, sources_at(revision, scratch / name))
    except RuntimeError as error:  # the compiler's message
        raise SystemExit(f"kernel_ab: the native sources of {label} do not build: {error}") from error
    try:
        return native.open_library(path, version=None)
    except AttributeError as error:
        raise SystemExit(f"kernel_ab: the library of {label} lacks a function that native.py declares ({error}); "
                         "both revisions must have the working tree's C interface") from error


def time_call(function, lib) -> float:
    with mock.patch.object(native, "library", lambda: lib):
        start = time.perf_counter()
        function()
        return time.perf_counter() - start


def measure(libraries: dict, table: dict, rounds: int, count: int, layer_count: int) -> dict:
    """Per call and library: the time of every call. The libraries take turns call by call (the first one
    alternating), so that both see the same state of the machine."""
    seconds = {(call, name): [] for call in table for name in libraries}
    for _ in range(rounds):
        for call, (function, _, *kind) in table.items():
            for name, lib in libraries.items():  # a warm-up call each
                time_call(function, lib)
            for index in range(layer_count if kind else count):
                order = list(libraries) if index % 2 == 0 else list(libraries)[::-1]
                for name in order:
                    seconds[(call, name)].append(time_call(function, libraries[name]))
    return seconds


def report(table: dict, seconds: dict, labels: dict, versions: dict, rounds: int, command: str) -> str:
    lines = ["# The native kernels of two revisions, in alternation\n",
             f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. base: {labels['base']} (kernel version {versions['base']}), head: "
             f"{labels['head']} (kernel version {versions['head']}). {rounds} rounds; in each, every call runs "
             "once per library in turn, --calls times (the layer --layer-calls times). Medians over all the "
             "calls; head / base is the median of the ratios of the paired calls.\n",
             "| call | base (ms) | head (ms) | head / base | pairs where head was faster |",
             "|---|---:|---:|---:|---:|"]
    for call in table:
        base, head = seconds[(call, "base")], seconds[(call, "head")]
        wins = sum(h < b for h, b in zip(head, base))
        ratio = statistics.median(h / b for h, b in zip(head, base))
        lines.append(f"| {call} | {statistics.median(base) * 1e3:.2f} | {statistics.median(head) * 1e3:.2f} | "
                     f"{ratio:.3f} | {wins} of {len(base)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a git revision")
    p.add_argument("--head", default=None, help="a git revision (default: the working tree)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=20, help="calls of a block per library per round")
    p.add_argument("--layer-calls", type=int, default=4, help="calls of the whole layer per library per round")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384], help="layer lengths")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_ab.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.layer_calls < 1:
        p.error("--rounds, --calls and --layer-calls must be at least 1")
    table = {name: entry for name, entry in calls(args.lengths).items() if "hashing" not in name}
    labels = {"base": args.base, "head": args.head or "the working tree"}
    with tempfile.TemporaryDirectory() as scratch:
        libraries = {name: library_at(revision, Path(scratch), name)
                     for name, revision in (("base", args.base), ("head", args.head))}
        versions = {name: lib.reformer_window_kernel_version() for name, lib in libraries.items()}
        seconds = measure(libraries, table, args.rounds, args.calls, args.layer_calls)
    command = "python benchmarks/kernel_ab.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(table, seconds, labels, versions, args.rounds, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"labels": labels, "versions": versions,
         "seconds": {f"{call} | {name}": v for (call, name), v in seconds.items()}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
