"""glibc allocator settings side by side: a fresh process per setting, in alternation, paired ratios.

`reformer.memory.release_freed_memory_eagerly(threshold, trim_threshold)` fixes
glibc's mmap threshold (blocks of that size or more are mapped on allocation and
unmapped on free, so each is faulted in afresh) and its trim threshold (the free
memory the heap may keep at its top). A setting changes where the whole
process's memory comes from, and a heap grown under one setting serves the
next, so settings cannot share a process (as `step_ab.py`'s variants do): here
every (round, setting) is a fresh process that sets its thresholds before it
builds the benchmark model of compare.py, runs one warm-up step and --steps
timed steps (forward, backward, AdamW), and reports their median wall time, the
user and system CPU seconds and minor page faults per step, and its peak RSS.
The settings alternate (the order reversed every other round); each round gives
each setting's median step over the first setting's in the same round, and the
table reports the median of these paired ratios.

    python benchmarks/malloc_ab.py --setting 8,64 --setting 32,64 --tag mmap32
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (it imports torch only inside its functions)

ROOT = Path(__file__).resolve().parent.parent
MAX_MMAP_MIB = 32  # glibc refuses a larger mmap threshold on 64-bit machines (HEAP_MAX_SIZE / 2)


def parse_setting(text: str) -> tuple[int, int]:
    """`MMAP_MIB,TRIM_MIB` -> (mmap threshold, trim threshold) in MiB."""
    try:
        mmap_mib, trim_mib = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is MMAP_MIB,TRIM_MIB (two whole numbers of MiB, e.g. 8,64), "
                                         f"not {text!r}") from None
    if not 0 < mmap_mib <= MAX_MMAP_MIB or trim_mib < 0:
        raise argparse.ArgumentTypeError(f"glibc takes an mmap threshold of 1 to {MAX_MMAP_MIB} MiB and a trim "
                                         f"threshold of 0 MiB or more, not {text!r}")
    return mmap_mib, trim_mib


def worker(setting: tuple[int, int], length: int, steps: int) -> dict:
    """One process: set the thresholds, build the model, a warm-up step, then the timed steps."""
    import torch

    from reformer.memory import peak_rss_mib

    torch.manual_seed(0)
    model, loss_fn = compare.build_ours(length, torch.device("cpu"), malloc_mib=setting)  # sets it first
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, compare.VOCAB, (1, length), generator=torch.Generator().manual_seed(0))

    def step() -> tuple[float, float, float, int]:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss_fn(ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return (time.perf_counter() - start, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                after.ru_minflt - before.ru_minflt)

    step()
    measured = [step() for _ in range(steps)]
    wall, user, system, faults = (statistics.median(values) for values in zip(*measured))
    return {"setting": list(setting), "step_s": wall, "times": [m[0] for m in measured], "user_s": user,
            "sys_s": system, "faults": faults, "peak_mib": peak_rss_mib()}


def run_worker(setting: tuple[int, int], args) -> dict:
    command = [sys.executable, __file__, "--worker", "{},{}".format(*setting), "--length", str(args.length),
               "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {setting} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def name(setting) -> str:
    return "mmap {} MiB, trim {} MiB".format(*setting)


def report(settings, cells: dict, rates: list[float], args, command: str) -> str:
    first = settings[0]
    rate = statistics.median(rates)
    flops = compare.model_flops_per_step(args.length)
    lines = ["# glibc allocator settings: a fresh process per setting, in alternation\n",
             f"Command: `{command}`. {datetime.date.today()}, torch {torch_version()}. The benchmark model of "
             f"compare.py at {args.length:,} tokens; {args.rounds} rounds, each setting a fresh process per round "
             f"(one warm-up step, {args.steps} timed steps; the order reversed every other round). Matmul rate "
             f"(float32, {compare.RATE_LABEL}) at the start of each round: "
             f"{', '.join(f'{r:.0f}' for r in rates)} GFLOP/s, "
             f"median {rate:.0f}. Per step: median wall time; CPU seconds and minor page faults per step (medians "
             "over the rounds); peak RSS: the highest of the setting's processes.\n",
             f"| setting | median step (s) | over {name(first)}: median of the paired ratios | rounds faster "
             "| user CPU s | system CPU s | minor faults | peak RSS (MiB) | model GFLOP/s (share of the median "
             "matmul rate) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in settings:
        runs = cells[setting]
        ratios = [run["step_s"] / base["step_s"] for run, base in zip(runs, cells[first])]
        step = statistics.median(run["step_s"] for run in runs)
        faster = "-" if setting == first else f"{sum(r < 1 for r in ratios)} of {len(ratios)}"
        lines.append(f"| {name(setting)} | {step:.2f} | {statistics.median(ratios):.3f} | {faster} "
                     f"| {statistics.median(r['user_s'] for r in runs):.2f} "
                     f"| {statistics.median(r['sys_s'] for r in runs):.2f} "
                     f"| {statistics.median(r['faults'] for r in runs):,.0f} | {max(r['peak_mib'] for r in runs):.0f} "
                     f"| {flops / step / 1e9:.1f} ({flops / step / 1e9 / rate:.0%}) |")
    lines.append("\nStep times by round (s): " + "; ".join(
        name(s) + " " + ", ".join(f"{run['step_s']:.2f}" for run in cells[s]) for s in settings) + ".")
    return "\n".join(lines) + "\n"


def torch_version() -> str:
    import torch

    return f"{torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", type=parse_setting, action="append", metavar="MMAP_MIB,TRIM_MIB",
                   help="glibc's mmap and trim thresholds in MiB; the first is the reference")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="name the output malloc_ab_TAG.md")
    p.add_argument("--worker", type=parse_setting, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.length < 1:
        p.error("--rounds, --steps and --length must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.length, args.steps)))
        return 0
    settings = list(dict.fromkeys(args.setting or []))
    if len(settings) < 2:
        p.error("give at least two different --setting MMAP_MIB,TRIM_MIB")
    cells: dict = {setting: [] for setting in settings}
    rates = []
    for index in range(args.rounds):
        rates.append(compare.matmul_gflops("cpu"))
        for setting in settings if index % 2 == 0 else settings[::-1]:
            cells[setting].append(run_worker(setting, args))
        print(f"round {index + 1}: " + ", ".join(f"{name(s)} {cells[s][-1]['step_s']:.2f} s" for s in settings),
              flush=True)
    text = report(settings, cells, rates, args, compare.command_line("malloc_ab.py", argv))
    compare.write_result(args.out_dir, "malloc_ab", args.tag, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
