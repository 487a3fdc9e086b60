"""Peak RSS of one Reformer training step, versus depth and sequence length.

What it measures: every measurement runs in a fresh Python process (so no
earlier allocation is counted), which imports torch and reformer, builds an
all-LSH causal, reversible ReformerLM and an AdamW optimiser, and runs exactly
one training step on batch 1 (no warm-up: the point is the peak of one step):

    model.train(); out = model(ids, labels=ids); out.loss.backward(); opt.step(); opt.zero_grad()

The worker reports the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`),
the RSS just before the step (after the imports, the model and the optimiser:
the "baseline"; importing torch alone is a few hundred MiB), the step peak over
that baseline, and the step's wall time. Runs alternate between the cases
(repeat r of every case before repeat r+1), and the table shows medians.

Cases: every depth in --layers at the shortest of --lengths, and the shallowest
depth at every other length. The defaults give (2, 16384), (12, 16384) and
(2, 65536): d_model 256, 4 heads of 64, d_ff 1024, LSH chunk 64, 4 hashes.
Below the table: peak(deepest) / peak(shallowest) at the shortest length
(target <= 1.25) and peak(longest) / peak(shortest) at the shallowest depth
(target <= 4.5). Where the cases kept outputs for the backward
(reversible_keep_attention, a cache of fixed budget), the verdicts judge the
peaks less what each kept, and print the raw ratio beside (`ratio_line`).
Benchmarks report; they never assert.

Run:
    python benchmarks/memory.py            # defaults, several minutes on 2 cores
    python benchmarks/memory.py --quick    # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory.md"
QUICK_OUT = ROOT / "benchmarks" / "results" / "memory-quick.md"
DEFAULT_MALLOC_OUT = ROOT / "benchmarks" / "results" / "memory-default-malloc.md"
DEPTH_TARGET = 1.25
LENGTH_TARGET = 4.5
MODEL = dict(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024, causal=True,
             lsh_chunk_size=64, n_buckets=None, reversible=True, axial_dims=(64, 192), dropout=0.0)


# --- worker: one fresh process, one step ----------------------------------

def worker(spec: dict) -> dict:
    from reformer.memory import current_rss_mib, peak_rss_mib, release_freed_memory_eagerly

    eager = spec["eager_release"] and release_freed_memory_eagerly()
    import torch

    from reformer import ReformerConfig, ReformerLM
    from reformer.config import default_axial_shape

    config = ReformerConfig(
        **MODEL, attn_layers=("lsh",) * spec["layers"], n_hashes=spec["n_hashes"],
        ff_chunk_size=spec["ff_chunk"], axial_shape=default_axial_shape(spec["max_len"]),
        max_seq_len=spec["max_len"],
    )
    model = ReformerLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, config.vocab_size, (1, spec["length"]), generator=gen)
    baseline = current_rss_mib()

    start = time.perf_counter()
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    seconds = time.perf_counter() - start

    peak = peak_rss_mib()
    kept_mib = sum(model.kept_attention_bytes + model.kept_output_bytes) / 2**20  # reversible_keep_attention
    return dict(peak_mib=peak, baseline_mib=baseline, step_peak_mib=peak - baseline, kept_mib=kept_mib,
                seconds=seconds, loss=out.loss.item(), threads=torch.get_num_threads(), torch=torch.__version__,
                eager=eager)


# --- driver ----------------------------------------------------------------

def cases(layers: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """Every depth at the shortest length, then the shallowest depth at every other length."""
    shortest, shallowest = min(lengths), min(layers)
    grid = [(n_layers, shortest) for n_layers in sorted(set(layers))]
    return grid + [(shallowest, n) for n in sorted(set(lengths)) if n != shortest]


def run_worker(spec: dict) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  worker failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict[tuple[int, int], list[dict]]:
    """Run every case `args.repeats` times, alternating cases within each repeat."""
    todo = cases(args.layers, args.lengths)
    results: dict[tuple[int, int], list[dict]] = {case: [] for case in todo}
    for r in range(args.repeats):
        for n_layers, length in todo:
            spec = dict(layers=n_layers, length=length, max_len=max(args.lengths), ff_chunk=args.ff_chunk,
                        n_hashes=args.n_hashes, seed=r, eager_release=not args.default_malloc)
            result = run_worker(spec)
            if result is not None:
                results[(n_layers, length)].append(result)
                print(f"[{r + 1}/{args.repeats}] layers {n_layers:2d} length {length:6d}: "
                      f"peak {result['peak_mib']:8.1f} MiB, step peak {result['step_peak_mib']:8.1f} MiB, "
                      f"{result['seconds']:7.2f} s", file=sys.stderr, flush=True)
    return results


def median_of(runs: list[dict], key: str) -> float | None:
    return statistics.median(run[key] for run in runs) if runs else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(results, repeats: int) -> str:
    lines = ["| layers | length | median peak RSS (MiB) | median step peak over baseline (MiB) "
             "| kept for the backward (MiB) | median step time (s) | runs |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for (n_layers, length), runs in results.items():
        lines.append(f"| {n_layers} | {length:,} | {fmt(median_of(runs, 'peak_mib'))} "
                     f"| {fmt(median_of(runs, 'step_peak_mib'))} | {fmt(median_of(runs, 'kept_mib'))} "
                     f"| {fmt(median_of(runs, 'seconds'), 2)} "
                     f"| {len(runs)}/{repeats} |")
    return "\n".join(lines)


def ratio_line(name: str, results, num: tuple[int, int], den: tuple[int, int], target: float) -> str:
    """The ratio of two cases' median peaks and its verdict against `target`.

    When a case kept attention or feed-forward outputs for the backward
    (reversible_keep_attention), the verdict judges the peaks less what each kept:
    that memory is a cache with a fixed budget (ReformerConfig.reversible_keep_attention_mib,
    the same at every depth and length), filled as far as the model has layers to
    fill it, so a shallow model keeps less of it than a deep one. What the targets
    are about, the activations the reversible stack holds, is the rest. The raw
    ratio is printed beside it.
    """
    peak = [median_of(results.get(case, []), "peak_mib") for case in (num, den)]
    step = [median_of(results.get(case, []), "step_peak_mib") for case in (num, den)]
    if num == den:
        return f"- {name}: n/a (needs two different cases; give more --layers or --lengths)"
    if None in peak:
        return f"- {name}: n/a (a case has no successful run)"
    raw = peak[0] / peak[1]
    step_note = f"; step peaks alone: {step[0] / step[1]:.2f}x" if step[1] else ""
    kept = [median_of(results.get(case, []), "kept_mib") for case in (num, den)]
    if None in kept or not any(kept):
        return f"- {name}: **{raw:.2f}x** (target <= {target}) **{verdict(raw, target)}**{step_note}"
    judged = (peak[0] - kept[0]) / (peak[1] - kept[1])
    return (f"- {name}, peaks less what each kept for the backward ({kept[0]:,.0f} and {kept[1]:,.0f} MiB of "
            f"reversible_keep_attention's fixed budget): **{judged:.2f}x** (target <= {target}) "
            f"**{verdict(judged, target)}**; raw peaks: {raw:.2f}x{step_note}")


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def ratios(results, layers: list[int], lengths: list[int]) -> str:
    shortest, longest, shallowest, deepest = min(lengths), max(lengths), min(layers), max(layers)
    return "\n".join([
        ratio_line(f"peak({deepest} layers) / peak({shallowest} layers) at length {shortest:,}",
                   results, (deepest, shortest), (shallowest, shortest), DEPTH_TARGET),
        ratio_line(f"peak(length {longest:,}) / peak(length {shortest:,}) at {shallowest} layers",
                   results, (shallowest, longest), (shallowest, shortest), LENGTH_TARGET),
    ])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def allocator_note(results) -> str:
    eager = [run["eager"] for runs in results.values() for run in runs]
    if eager and all(eager):
        from reformer.memory import DEFAULT_THRESHOLD, DEFAULT_TRIM_THRESHOLD

        return (f"`reformer.memory.release_freed_memory_eagerly()` (mmap threshold fixed at "
                f"{DEFAULT_THRESHOLD >> 20} MiB: freed blocks that large go back to the OS at once; heap trimmed "
                f"above {DEFAULT_TRIM_THRESHOLD >> 20} MiB free), as `make demo` does")
    return "glibc defaults (dynamic mmap threshold, up to 32 MiB: the heap keeps freed blocks)"


def report(args, results, wall: float) -> str:
    any_run = next((run for runs in results.values() for run in runs), {})
    return "\n".join([
        "# Peak RSS of one training step",
        "",
        f"All-LSH causal reversible ReformerLM: d_model {MODEL['d_model']}, {MODEL['n_heads']} heads of "
        f"{MODEL['d_head']}, d_ff {MODEL['d_ff']}, LSH chunk {MODEL['lsh_chunk_size']}, {args.n_hashes} hashes, "
        f"ff_chunk {args.ff_chunk}, batch 1, AdamW. Each run is a fresh process; "
        f"baseline = RSS after imports, model and optimiser, just before the step. "
        f"Allocator: {allocator_note(results)}.",
        "",
        table(results, args.repeats),
        "",
        ratios(results, args.layers, args.lengths),
        "",
        f"- command: `{command_line('memory.py', args.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {any_run.get('torch', 'n/a')}, {any_run.get('threads', 'n/a')} threads, "
        f"Python {platform.python_version()}",
        f"- CPU: {cpu_model()}, os.cpu_count() = {os.cpu_count()}",
        f"- wall time of the whole benchmark: {wall:.0f} s",
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536],
                   help="sequence lengths; every depth runs at the shortest (default: 16384 65536)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12],
                   help="depths; the shallowest runs at every length (default: 2 12)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per case; the table shows medians "
                   "(default: 3)")
    p.add_argument("--ff-chunk", type=int, default=1024,
                   help="positions per feed-forward chunk, config.ff_chunk_size; 0 = unchunked (default: 1024)")
    p.add_argument("--n-hashes", type=int, default=4, help="LSH hash rounds (default: 4)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file to write (default: {DEFAULT_OUT.relative_to(ROOT)}; "
                        f"{QUICK_OUT.relative_to(ROOT)} with --quick, {DEFAULT_MALLOC_OUT.relative_to(ROOT)} "
                        "with --default-malloc)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc malloc as it is; by default the workers call "
                        "reformer.memory.release_freed_memory_eagerly() first, so freed memory leaves the process")
    p.add_argument("--quick", action="store_true",
                   help="smoke configuration: length 1024, layers 1 and 2, 1 repeat (seconds)")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.lengths, args.layers, args.repeats = [1024], [1, 2], 1
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_MALLOC_OUT if args.default_malloc else DEFAULT_OUT)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.perf_counter()
    results = measure(args)
    text = report(args, results, time.perf_counter() - start)
    print(text)
    write_result(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
