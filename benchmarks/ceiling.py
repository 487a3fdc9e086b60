"""The most a training step could reach: its own matrix products, timed alone, against the matmul rate.

The model is the one of benchmarks/compare.py (6 causal reversible LSH layers,
d_model 256, 4 heads x 64, d_ff 1024, chunks of 64, 4 hashes, batch 1), with
reversible_keep_attention "auto" (the default), True and False. For each: one
warm-up step, then one step under a dispatch mode that records every
matrix-product call the step makes (`mm`, `addmm`, `bmm`, `baddbmm`, their
in-place and out= forms, PyTorch's CPU flash-attention kernel, and our native
window kernels, forward and backward: `benchmarks/products.py`) with the
shapes, strides and dtypes of its operands. Then --rounds rounds, the three
configurations in alternation, each: the matmul rate, one timed step, and each
distinct call of its step run again alone on fresh tensors of the same layout,
back to back as often as the step calls it (timed; median of --repeats). Each
share of the matmul rate is against the rate measured at the start of its
round, and the tables give medians over the rounds: this machine's rate drifts
by tens of percent within minutes.

The sum of those times is what the step would take if nothing but its matrix
products ran: no softmax outside the attention kernels, no masks, gathers, LayerNorm,
hashing, sorting, optimizer or Python. The model FLOPs of the step (counted as
in compare.py: 3x the forward, nothing computed again) over that time, as a
share of the 4096^3 matmul rate, is the ceiling of the issue's target 3 for this
algorithm on this machine. It is optimistic: the replayed operands stay in
cache, and the flash kernel runs under a mask of zeros (the real masks' -1e9
entries take exp's slow path). The attention kernels' times include their
softmax (and, for the native backward, the score gradients); the native ones
read their rows through indices (all of row 0 here, in cache) and build their
masks from positions.

It also checks compare.py's analytic count of the FLOPs a step executes against
the products recorded (written beside the table, and to ceiling.json).

    python benchmarks/ceiling.py                         # 16,384 tokens; writes benchmarks/results/ceiling.md
    python benchmarks/ceiling.py --length 4096 --out /tmp/ceiling-4k.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LAYERS, RATE_LABEL, executed_flops_per_step, matmul_gflops, model_flops_per_step  # noqa: E402
from products import PRODUCTS, RecordProducts, product_flops  # noqa: E402
from profile_step import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def fresh(spec, generator: torch.Generator):
    """A new operand of the recorded layout (random values; an additive mask of zeros; indices of row 0)."""
    if spec[0] != "tensor":
        return spec[1]
    _, shape, stride, dtype = spec
    tensor = torch.empty_strided(shape, stride, dtype=dtype)
    if dtype.is_floating_point:
        tensor.copy_(torch.randn(shape, generator=generator, dtype=dtype) * 0.1)
    else:
        tensor.zero_()  # the native kernel's row indices: valid for any rows
    return tensor


def time_call(func, args, kwargs, count: int, repeats: int) -> float:
    """Median seconds of `count` back-to-back calls on fresh operands of the recorded layouts."""
    generator = torch.Generator().manual_seed(0)
    values = [fresh(a, generator) for a in args]
    named = {k: fresh(v, generator) if k != "attn_mask" else torch.zeros(v[1], dtype=v[3]) for k, v in kwargs}
    func(*values, **named)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            func(*values, **named)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare(length: int, keep_attention) -> dict:
    """The model under one reversible_keep_attention setting, warmed up, and the product calls of one step."""
    step, model = build(length, keep_attention)
    step()
    recorder = RecordProducts()
    with recorder:
        step()
    return {"keep": keep_attention, "step": step, "kept": len(model.kept_attention_bytes),
            "kept_outputs": len(model.kept_output_bytes), "calls": recorder.calls}


def measure_round(contender: dict, repeats: int) -> dict:
    """The matmul rate now, then one step and the step's products alone: seconds per operator."""
    rate = matmul_gflops("cpu")
    start = time.perf_counter()
    contender["step"]()
    step_s = time.perf_counter() - start
    seconds: collections.Counter = collections.Counter()
    for (func, args, kwargs), count in contender["calls"].items():
        seconds[PRODUCTS[func]] += time_call(func, args, kwargs, count, repeats)
    return {"rate": rate, "step_s": step_s, "seconds": seconds}


def summarize(contender: dict, rounds: list[dict], length: int) -> dict:
    """Medians over the rounds; each share is against the rate measured at the start of its own round."""
    model_flops = model_flops_per_step(length)
    by_name: dict = {}  # name -> [calls, FLOPs, median seconds]
    for (func, args, _), count in contender["calls"].items():
        entry = by_name.setdefault(PRODUCTS[func], [0, 0, 0.0])
        entry[0] += count
        entry[1] += count * product_flops(func, args)
    for name, entry in by_name.items():
        entry[2] = statistics.median(r["seconds"][name] for r in rounds)
    products = [sum(r["seconds"].values()) for r in rounds]
    rate = statistics.median(r["rate"] for r in rounds)
    return {"keep": contender["keep"], "kept": contender["kept"], "kept_outputs": contender["kept_outputs"],
            "rounds": len(rounds), "rate": rate,
            "rates": [r["rate"] for r in rounds], "step_s": statistics.median(r["step_s"] for r in rounds),
            "products_s": statistics.median(products), "model_gflops": model_flops / 1e9, "by_name": by_name,
            "distinct": len(contender["calls"]),
            "executed_gflops": sum(entry[1] for entry in by_name.values()) / 1e9,
            "analytic_executed_gflops": executed_flops_per_step(length, contender["kept"],
                                                                contender["kept_outputs"]) / 1e9,
            "target_step_s": model_flops / 1e9 / (0.5 * rate),
            "step_share": statistics.median(model_flops / r["step_s"] / 1e9 / r["rate"] for r in rounds),
            "ceiling_share": statistics.median(model_flops / p / 1e9 / r["rate"] for p, r in zip(products, rounds))}


def report(results: list[dict], length: int, command: str) -> str:
    lines = [f"# The ceiling of a training step at {length:,} tokens: its matrix products alone\n",
             f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. {results[0]['rounds']} rounds, the configurations in alternation; each round: the "
             f"matmul rate (float32, {RATE_LABEL}, median of 5), one step, its products alone. Medians over the "
             "rounds, each share against the rate of its own round (the machine's rate drifts by tens of percent "
             "within minutes).\n",
             "Model FLOPs as in compare.py (3x the forward; what the step computes again not counted). "
             "`products alone`: every matrix-product call of one step, run again alone on fresh operands of the "
             "same layout, as often as the step calls it (the attention kernels with their softmax). The ceiling is "
             "the model FLOP/s if the step did nothing else. Target 3 (half the matmul rate) needs the step time in "
             "`50% needs`; the column after it is what that leaves for everything but the products, against "
             "what it takes now.\n",
             "| reversible_keep_attention | layers kept: attention, feed-forward outputs "
             "| matmul rate (GFLOP/s), median | step (s) "
             "| model FLOP/s, share of the matmul rate | products alone (s) | ceiling: share of the matmul rate "
             "| 50% needs a step of (s) | left for all but the products: at 50% / now (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['keep']!r} | {r['kept']}, {r['kept_outputs']} of {LAYERS} | {r['rate']:.0f} "
                     f"| {r['step_s']:.2f} "
                     f"| {r['step_share']:.0%} | {r['products_s']:.2f} | **{r['ceiling_share']:.0%}** "
                     f"| {r['target_step_s']:.2f} | {r['target_step_s'] - r['products_s']:.2f} / "
                     f"{r['step_s'] - r['products_s']:.2f} |")
    lines += ["\nThe FLOP count: the products the step ran (recorded) beside compare.py's analytic count of "
              "executed FLOPs (the recorded ones also hold the LSH hashing's rotations, which neither count "
              "counts).\n",
              "| reversible_keep_attention | model GFLOP | executed GFLOP, recorded | executed GFLOP, compare.py |",
              "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['keep']!r} | {r['model_gflops']:.1f} | {r['executed_gflops']:.1f} "
                     f"| {r['analytic_executed_gflops']:.1f} |")
    for r in results:
        rate = r["rate"]
        lines += [f"\n## reversible_keep_attention={r['keep']!r}: the products by operator "
                  f"({r['distinct']} distinct calls)\n",
                  "| operator | calls | executed GFLOP | alone (s) | GFLOP/s (share of the matmul rate) |",
                  "|---|---:|---:|---:|---:|"]
        for name, (calls, flops, seconds) in sorted(r["by_name"].items(), key=lambda item: -item[1][2]):
            achieved = flops / seconds / 1e9
            lines.append(f"| {name} | {calls:,} | {flops / 1e9:.1f} | {seconds:.2f} | {achieved:.0f} "
                         f"({achieved / rate:.0%}) |")
        achieved = r["executed_gflops"] / r["products_s"]
        lines.append(f"| all | {sum(entry[0] for entry in r['by_name'].values()):,} | {r['executed_gflops']:.1f} "
                     f"| {r['products_s']:.2f} | {achieved:.0f} ({achieved / rate:.0%}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions of each distinct call's count")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, the configurations in alternation: the rate, one step, its products alone")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ceiling.md")
    args = p.parse_args(argv)
    if min(args.repeats, args.rounds, args.length) < 1:
        p.error(f"--repeats, --rounds and --length must be at least 1 (got {args.repeats}, {args.rounds} and "
                f"{args.length})")
    contenders = [prepare(args.length, keep) for keep in ("auto", True, False)]
    rounds: list[list[dict]] = [[] for _ in contenders]
    for _ in range(args.rounds):
        for contender, done in zip(contenders, rounds):
            done.append(measure_round(contender, args.repeats))
    results = [summarize(contender, done, args.length) for contender, done in zip(contenders, rounds)]
    flags = "" if args.length == 16384 else f" --length {args.length}"
    flags += "" if args.repeats == 1 else f" --repeats {args.repeats}"
    flags += "" if args.rounds == 3 else f" --rounds {args.rounds}"
    default_out = ROOT / "benchmarks" / "results" / "ceiling.md"
    flags += "" if args.out.resolve() == default_out else f" --out {args.out}"
    text = report(results, args.length, f"python benchmarks/ceiling.py{flags}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
