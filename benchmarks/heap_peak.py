"""What the resident memory at a training step's peak is made of, per glibc mmap threshold.

The question it answers: with a higher mmap threshold (`reformer.memory.release_freed_memory_eagerly`),
blocks below it come from the heap instead of being mapped. Does a step's peak RSS then hold more live
tensors, or the heap's free (freed, fragmented, or kept-at-the-top) memory?

Each run is a fresh process per (threshold, repeat): the architecture of
tests/layers/test_reversible.py's nine-activations test (the million-token model: d_model 256, 2 heads of
64, d_ff 512, local and LSH layers, chunk 64, 1 hash; feed-forward and loss chunks of 8,192 positions, 16
MiB hidden chunks), one forward and backward at --length tokens, without an optimiser. A thread samples,
every --every-ms, the process's RSS (/proc/self/statm) and glibc's `mallinfo2()`: the heap's bytes in use
(uordblks), its free bytes (fordblks; resident or not) and the bytes mapped for large blocks (hblkhd). The
table reports, at the sample of highest RSS: the step's RSS over the baseline (before the step), in MiB and
in activations of (n, d_model) float32; the heap's free bytes then; and the step's RSS less the growth of
the heap's free bytes over the baseline (what live tensors and the heap's in-use part account for). The
sampled maximum can miss the true peak by what one interval allocates; the true peak (ru_maxrss) is
printed beside it.

    python benchmarks/heap_peak.py                       # 8 and 32 MiB, 65,536 tokens, 2 repeats
    python benchmarks/heap_peak.py --length 16384 --thresholds 8 16 32 --out /tmp/heap.md
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (it imports torch only inside its functions)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "heap_peak.md"
MIB = 1 << 20


# --- worker: one fresh process --------------------------------------------

def mallinfo2():
    """glibc's mallinfo2 as a function returning (in use, free, mapped) bytes, or None off glibc >= 2.33."""
    import ctypes
    import ctypes.util

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = Info

    def read() -> tuple[int, int, int]:
        info = function()
        return info.uordblks, info.fordblks, info.hblkhd
    return read


def worker(spec: dict) -> dict:
    import threading
    import time

    import torch

    from reformer.memory import peak_rss_mib, release_freed_memory_eagerly

    if not release_freed_memory_eagerly(spec["threshold_mib"] * MIB):
        raise SystemExit("heap_peak.py needs glibc (mallopt)")
    read_heap = mallinfo2()
    if read_heap is None:
        raise SystemExit("heap_peak.py needs glibc 2.33 or later (mallinfo2)")
    from reformer import ReformerConfig, ReformerLM

    n = spec["length"]
    side = max(256, 1 << ((n - 1).bit_length() + 1) // 2)  # the axial grid: (256, 256) up to 65,536 tokens
    torch.manual_seed(0)
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=2, d_head=64, d_ff=512,
                            attn_layers=tuple(spec["layers"]), lsh_chunk_size=64, local_chunk_size=64, n_hashes=1,
                            axial_shape=(side, side), max_seq_len=side * side, ff_chunk_size=spec["ff_chunk"],
                            loss_chunk_size=8192, reversible_keep_attention=False)
    model = ReformerLM(config).train()
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> tuple[int, int, int, int]:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * page
        return (rss, *read_heap())

    baseline = sample()
    highest, done = [baseline], threading.Event()

    def watch() -> None:
        while not done.wait(spec["every_ms"] / 1000):
            now = sample()
            if now[0] > highest[0][0]:
                highest[0] = now
    watcher = threading.Thread(target=watch, daemon=True)
    peak_before = peak_rss_mib()
    watcher.start()
    model(ids, labels=ids).loss.backward()
    done.set()
    watcher.join()
    after = sample()
    return {"baseline": baseline, "peak": highest[0], "after": after,
            "maxrss_step_mib": peak_rss_mib() - baseline[0] / MIB, "maxrss_before_mib": peak_before}


# --- driver ----------------------------------------------------------------

def run_worker(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {spec} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], length: int) -> dict:
    """Medians over repeats of the step's figures at the sampled peak, in MiB and activations."""
    activation = length * 256 * 4 / MIB

    def figures(run: dict) -> dict:
        (rss_before, _, free_before, _), (rss, in_use, free, mapped) = run["baseline"], run["peak"]
        step, free_growth = (rss - rss_before) / MIB, (free - free_before) / MIB
        return {"step_mib": step, "step_act": step / activation, "maxrss_act": run["maxrss_step_mib"] / activation,
                "heap_used_mib": in_use / MIB, "heap_free_mib": free / MIB, "free_growth_mib": free_growth,
                "mapped_mib": mapped / MIB, "without_free_act": (step - free_growth) / activation,
                "free_after_mib": run["after"][2] / MIB}
    each = [figures(run) for run in runs]
    return {key: statistics.median(f[key] for f in each) for key in each[0]}


def table(args, argv: list[str] | None, results: dict[int, dict]) -> str:
    activation = args.length * 256 * 4 / MIB
    lines = [
        "# The resident memory at a step's peak, per mmap threshold",
        "",
        f"Command: `{compare.command_line('heap_peak.py', argv)}`.",
        f"{datetime.date.today()}, {platform.machine()}, Python {platform.python_version()}; "
        f"{args.length:,} tokens, layers {','.join(args.layers)}, feed-forward chunks of {args.ff_chunk:,} positions "
        f"({args.ff_chunk * 512 * 4 / MIB:g} MiB hidden chunks), one forward and backward per fresh process, "
        f"medians of {args.repeats}; one activation = (n, d_model) float32 = {activation:g} MiB; "
        f"sampled every {args.every_ms} ms.",
        "",
        "| mmap threshold | step RSS at the sampled peak (MiB) | in activations | true peak (ru_maxrss), activations "
        "| heap in use then (MiB) | heap free then (MiB) | its growth in the step (MiB) | mapped blocks then (MiB) "
        "| step less the free heap's growth, activations | heap free after the step (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threshold, s in results.items():
        lines.append(f"| {threshold} MiB | {s['step_mib']:,.0f} | {s['step_act']:.1f} | {s['maxrss_act']:.1f} "
                     f"| {s['heap_used_mib']:,.0f} | {s['heap_free_mib']:,.0f} | {s['free_growth_mib']:,.0f} "
                     f"| {s['mapped_mib']:,.0f} | {s['without_free_act']:.1f} | {s['free_after_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=65536, help="tokens (a multiple of 128)")
    p.add_argument("--thresholds", type=int, nargs="+", default=[8, 32], help="mmap thresholds in MiB (1-32)")
    p.add_argument("--layers", nargs="+", default=["lsh", "local"] * 3, help="attention kinds, one per layer")
    p.add_argument("--ff-chunk", type=int, default=8192, help="feed-forward chunk in positions")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per threshold")
    p.add_argument("--every-ms", type=float, default=2.0, help="sampling interval")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if any(not 1 <= t <= 32 for t in args.thresholds):
            p.error("--thresholds are MiB from 1 to 32 (glibc's largest mmap threshold)")
        if args.length < 128 or args.length % 128:
            p.error("--length must be a positive multiple of 128 (the model's chunks)")
        if args.repeats < 1 or args.every_ms <= 0 or args.ff_chunk < 1:
            p.error("--repeats and --ff-chunk must be at least 1, --every-ms positive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    runs: dict[int, list[dict]] = {t: [] for t in args.thresholds}
    for repeat in range(args.repeats):
        for threshold in args.thresholds:
            spec = {"threshold_mib": threshold, "length": args.length, "layers": args.layers,
                    "ff_chunk": args.ff_chunk, "every_ms": args.every_ms}
            runs[threshold].append(run_worker(spec))
            print(f"repeat {repeat + 1}, {threshold} MiB: {runs[threshold][-1]}", file=sys.stderr, flush=True)
    text = table(args, argv, {t: summarize(r, args.length) for t, r in runs.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
