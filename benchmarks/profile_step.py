"""Where the time of one training step goes: torch.profiler's table of the operators that dominate.

The model is the one of benchmarks/compare.py (6 causal reversible LSH layers,
d_model 256, 4 heads x 64, d_ff 1024, chunks of 64, 4 hashes, batch 1). One
warm-up step, then one profiled step; the table lists operators by their own
CPU time and is written as markdown.

    python benchmarks/profile_step.py                  # 16,384 tokens; writes benchmarks/results/profile.md
    python benchmarks/profile_step.py --length 4096 --rows 15
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from reformer import ReformerConfig, ReformerLM
from reformer.config import default_axial_shape
from reformer.memory import release_freed_memory_eagerly

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile.md")
    args = p.parse_args(argv)

    release_freed_memory_eagerly()
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024, attn_layers=("lsh",) * 6,
                            lsh_chunk_size=64, n_hashes=4, axial_shape=default_axial_shape(args.length),
                            axial_dims=(64, 192), max_seq_len=args.length, ff_chunk_size=4096, loss_chunk_size=4096)
    model = ReformerLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, args.length), generator=torch.Generator().manual_seed(0))

    def step():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    rows = ["| operator | own time (s) | share | calls |", "|---|---:|---:|---:|"]
    for e in events[:args.rows]:
        rows.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} | "
                    f"{e.count} |")
    text = (f"# One training step at {args.length:,} tokens, by operator\n\n"
            f"Command: `python benchmarks/profile_step.py{'' if args.length == 16384 else f' --length {args.length}'}`."
            f" {datetime.date.today()}, {torch.get_num_threads()} threads, torch {torch.__version__}. The profiled "
            f"step took {wall:.1f} s (the profiler adds a little).\n\n" + "\n".join(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
