"""One training step at 1,048,576 tokens: the Google AI blog's "a million tokens" claim, on a CPU.

The architecture is the Reformer's Crime and Punishment model: 6 reversible
layers alternating local and LSH attention, d_model 256, 2 heads x 64, d_ff
512, chunks of 64, 1 hash, a byte vocabulary, axial positions (1024 x 1024).
One step = forward, backward and AdamW update on one sequence of random bytes,
in a fresh process; the script reports the peak RSS (getrusage), the RSS
before the step, and the wall time of each phase, and writes a markdown table.

    python benchmarks/million.py                     # writes benchmarks/results/million.md
    python benchmarks/million.py --tokens 65536      # a quicker look
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import cpu_name, write_result  # noqa: E402


def worker(tokens: int, ff_chunk: int) -> dict:
    import torch

    from reformer import ReformerConfig, ReformerLM
    from reformer.memory import current_rss_mib, peak_rss_mib, release_freed_memory_eagerly

    release_freed_memory_eagerly()
    side = 1 << ((tokens - 1).bit_length() + 1) // 2
    config = ReformerConfig(
        vocab_size=256, d_model=256, n_heads=2, d_head=64, d_ff=512,
        attn_layers=("local", "lsh", "local", "lsh", "local", "lsh"), lsh_chunk_size=64, local_chunk_size=64,
        n_hashes=1, axial_shape=(side, max(side, tokens // side)), axial_dims=(64, 192), max_seq_len=tokens,
        ff_chunk_size=ff_chunk, loss_chunk_size=16384, reversible=True,
    )
    model = ReformerLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    baseline = current_rss_mib()
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return {"tokens": tokens, "loss": loss.item(), "peak_mib": peak_rss_mib(), "baseline_mib": baseline,
            "forward_s": forward - start, "backward_s": backward - forward, "optimizer_s": end - backward,
            "step_s": end - start, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20, help="sequence length (default 1,048,576)")
    p.add_argument("--ff-chunk", type=int, default=16384, help="positions per feed-forward chunk")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "million.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.tokens, args.ff_chunk)))
        return

    command = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--ff-chunk", str(args.ff_chunk)]
    started = time.perf_counter()
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
                        .splitlines()[-1])
    wall = time.perf_counter() - started
    import torch

    gib = result["peak_mib"] / 1024
    table = [
        "| tokens | peak RSS (GiB) | RSS before the step (GiB) | forward (s) | backward (s) | AdamW (s) | step (s) "
        "| loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['tokens']:,} | {gib:.2f} | {result['baseline_mib'] / 1024:.2f} | {result['forward_s']:.1f} | "
        f"{result['backward_s']:.1f} | {result['optimizer_s']:.2f} | {result['step_s']:.1f} | {result['loss']:.3f} |",
    ]
    text = (f"# One training step at {result['tokens']:,} tokens\n\n"
            f"Command: `python benchmarks/million.py{'' if args.tokens == 1 << 20 else f' --tokens {args.tokens}'}`. "
            f"{datetime.date.today()}, {cpu_name()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; one fresh process, "
            f"{wall:.0f} s in all.\n\n"
            f"The Reformer's Crime and Punishment architecture ({result['parameters']:,} parameters): 6 reversible "
            "layers alternating local and LSH attention, d_model 256, 2 heads x 64, d_ff 512 (chunks of "
            f"{args.ff_chunk:,} positions), chunks of 64, 1 hash, byte vocabulary, batch 1, AdamW.\n\n"
            + "\n".join(table) + "\n\nTarget: the step fits in 12 GB of RSS: "
            f"**{'PASS' if gib * 1.073741824 <= 12 else 'FAIL'}** ({gib * 1.073741824:.2f} GB).\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
