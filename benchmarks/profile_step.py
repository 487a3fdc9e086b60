"""Where the time of one training step goes: by operator (torch.profiler) and by part of the model.

The model is the one of benchmarks/compare.py (6 causal reversible LSH layers,
d_model 256, 4 heads x 64, d_ff 1024, chunks of 64, 4 hashes, batch 1). One
warm-up step, then:

- by operator: one step under torch.profiler, operators listed by their own CPU time;
- by part: --steps unprofiled steps with wall-clock timers around the library's
  parts (the feed-forward, the window kernels, the gathers, the masks, hashing, ...),
  each part's own time without the parts it calls; then one more step under a
  dispatch mode (`benchmarks/products.py`) gives the FLOPs of the matrix
  products made inside each part, hence its FLOP rate.

    python benchmarks/profile_step.py                  # 16,384 tokens; writes benchmarks/results/profile.md
    python benchmarks/profile_step.py --length 4096 --rows 15 --out /tmp/profile-4k.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import reformer.attention.fused_chunks as fused_chunks
import reformer.attention.lsh as lsh
import reformer.layers.attention as attention_layers
import reformer.layers.feed_forward as feed_forward
import reformer.layers.reversible as reversible

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import LAYERS, VOCAB, build_ours  # noqa: E402
from harness import RATE_LABEL, matmul_gflops, write_result  # noqa: E402
from products import RecordProducts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OTHER = "everything else (embedding, optimizer, Python)"

# (module or class, attribute, part name): timed around every call
PARTS = [
    (feed_forward.FeedForward, "chunk", "feed-forward (forward and its recompute)"),
    (reversible, "_feed_forward_backward", "feed-forward backward"),
    (fused_chunks, "window_block_forward", "window kernel, forward"),
    (fused_chunks, "window_block_backward", "window kernel, backward"),
    (fused_chunks, "gathered_block_forward", "window kernel, forward"),
    (fused_chunks, "gathered_block_backward", "window kernel, backward"),
    (fused_chunks, "_block_rows", "gathers of q, k, v per block"),
    (fused_chunks.MaskRecipe, "block", "block masks"),
    (fused_chunks, "_combine_rounds", "combining the rounds"),
    (fused_chunks._SlotGradients, "add", "window gradients onto slots"),
    (fused_chunks._SlotGradients, "end", "gradients back to positions"),
    (fused_chunks.ChunkedAttention, "forward", "fused attention, rest of forward"),
    (fused_chunks.ChunkedAttention, "backward", "fused attention, rest of backward"),
    (lsh, "hash_vectors", "hashing"),
    (lsh, "sort_by_bucket", "sorting"),
    (lsh, "chunk_plan", "plans (index tensors, mask recipes)"),
    (attention_layers.AttentionBranch, "project_chunk", "LayerNorm and projections"),
    (attention_layers.AttentionBranch, "output_chunk", "output projection"),
    (reversible, "_projection_backward", "projections backward"),
    (reversible, "_attention_backward", "attention branch backward, rest"),
    (reversible, "_block_forward", "block forward, rest"),
    (reversible, "_tail_forward", "head and loss"),
    (reversible, "_tail_backward", "head and loss backward"),
]


def build(length: int, keep_attention: bool | str = "auto"):
    """compare.py's model of ours (and its allocator setting), AdamW, and one training step on a fixed batch."""
    model, loss = build_ours(length, torch.device("cpu"), keep_attention=keep_attention)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))

    def step():
        loss(ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model


def by_operator(step, rows: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    table = ["| operator | own time (s) | share | calls |", "|---|---:|---:|---:|"]
    for e in events[:rows]:
        table.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} | "
                     f"{e.count} |")
    return table, wall


def by_part(step, steps: int) -> tuple[list[str], float, tuple[float, float]]:
    """Own wall time of each part per step (timers nest: a part's time excludes the parts it calls), and the
    GFLOP/s of the matrix products made inside each part (counted in one more step, under a dispatch mode),
    against the mean of the matmul rates measured just before and just after the timed steps."""
    own: collections.Counter = collections.Counter()
    names: list[str] = []  # the parts running now, innermost last
    inner: list[float] = []  # the time of the parts each of those called
    originals = []

    def timed(function, name):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            names.append(name)
            inner.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                names.pop()
                own[name] += elapsed - inner.pop()
                if inner:
                    inner[-1] += elapsed
        return wrapper

    for owner, attribute, name in PARTS:
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))
        setattr(owner, attribute, timed(original, name))
    try:
        rates = [matmul_gflops("cpu")]
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        rates.append(matmul_gflops("cpu"))
        timings = own.copy()
        recorder = RecordProducts(tag=lambda: names[-1] if names else OTHER)
        with recorder:
            step()
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    rate = sum(rates) / 2
    table = ["| part | own time per step (s) | share | GFLOP/s of its products (share of the matmul rate) |",
             "|---|---:|---:|---:|"]
    rest = wall - sum(timings.values()) / steps
    for name, seconds in [*((n, t / steps) for n, t in timings.most_common()), (OTHER, rest)]:
        flops = recorder.flops_by_tag[name]
        achieved = flops / seconds / 1e9 if flops and seconds > 0 else None
        rate_cell = "" if achieved is None else f"{achieved:.0f} ({achieved / rate:.0%})"
        table.append(f"| {name} | {seconds:.3f} | {seconds / wall:.0%} | {rate_cell} |")
    return table, wall, (rates[0], rates[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--keep-attention", action="store_true",
                   help="reversible_keep_attention=True (default: the config's 'auto', within its budget)")
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    p.add_argument("--steps", type=int, default=3, help="timed steps for the table by part")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile.md")
    args = p.parse_args(argv)
    if args.steps < 1 or args.length < 1:
        p.error(f"--steps and --length must be at least 1 (got {args.steps} and {args.length})")

    step, model = build(args.length, True if args.keep_attention else "auto")
    step()
    parts, wall, (before, after) = by_part(step, args.steps)
    kept = len(model.kept_attention_bytes)
    operators, profiled = by_operator(step, args.rows)
    flags = "" if args.length == 16384 else f" --length {args.length}"
    flags += " --keep-attention" if args.keep_attention else ""
    flags += "" if args.steps == 3 else f" --steps {args.steps}"
    flags += "" if args.rows == 20 else f" --rows {args.rows}"
    default_out = ROOT / "benchmarks" / "results" / "profile.md"
    flags += "" if args.out.resolve() == default_out else f" --out {args.out}"
    mode = "True" if args.keep_attention else "'auto'"
    text = (f"# One training step at {args.length:,} tokens: where the time goes\n\n"
            f"Command: `python benchmarks/profile_step.py{flags}`. {datetime.date.today()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; matmul rate (float32, {RATE_LABEL}, median "
            f"of 5) {before:.0f} GFLOP/s just before the timed steps and {after:.0f} just after (the shares "
            "below are of their mean).\n\n"
            f"reversible_keep_attention={mode}: the attention was kept for the backward in {kept} of {LAYERS} "
            f"layers.\n\n"
            f"## By part ({args.steps} steps, {wall:.2f} s per step)\n\n"
            "FLOP rates: the FLOPs of the matrix products made inside each part (not in the parts it calls), "
            "recorded in one more step under a dispatch mode (`benchmarks/products.py`: `mm`, `addmm`, `bmm`, "
            "`baddbmm`, the flash kernel's q.k and p.v, and the native window kernels' products), over the part's "
            "own time.\n\n"
            + "\n".join(parts)
            + f"\n\n## By operator (one profiled step, {profiled:.1f} s: the profiler adds a little)\n\n"
            + "\n".join(operators) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
