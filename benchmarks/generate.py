"""Generation speed with and without the incremental cache.

For each prompt length, times `reformer.generate.generate` producing --new-tokens
tokens greedily from a randomly initialised model (speed does not depend on the
weights), with use_cache=True and use_cache=False, after one warm-up run, and
reports the median tokens per second over --repeats runs as a markdown table.

    python benchmarks/generate.py                    # writes benchmarks/results/generate.md
    python benchmarks/generate.py --prompt-lengths 256 --new-tokens 32 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from reformer import ReformerConfig, ReformerLM
from reformer.config import default_axial_shape
from reformer.generate import generate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import write_result  # noqa: E402


def build_model(max_len: int, layers: tuple[str, ...]) -> ReformerLM:
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024, attn_layers=layers,
                            lsh_chunk_size=64, local_chunk_size=64, n_hashes=2, max_seq_len=max_len,
                            axial_shape=default_axial_shape(max_len), axial_dims=(64, 192))
    return ReformerLM(config).eval()


def tokens_per_second(model, prompt, new_tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    for _ in generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache):
        pass
    return new_tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[256, 1024, 4096],
                   help="prompt lengths in tokens (default: 256 1024 4096)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the table shows medians")
    p.add_argument("--layers", default="local,lsh,local,lsh,local,lsh",
                   help="attention kinds, one per layer (default: the Crime-and-Punishment pattern)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate.md")
    args = p.parse_args(argv)

    layers = tuple(args.layers.split(","))
    model = build_model(max(args.prompt_lengths) + args.new_tokens, layers)
    gen = torch.Generator().manual_seed(0)
    rows = ["| prompt tokens | with cache (tokens/s) | without cache (tokens/s) | speed-up |", "|---:|---:|---:|---:|"]
    for length in args.prompt_lengths:
        prompt = torch.randint(0, 256, (length,), generator=gen)
        speeds = {}
        for use_cache in (True, False):
            tokens_per_second(model, prompt, args.new_tokens, use_cache)  # warm-up: one full untimed run
            speeds[use_cache] = statistics.median(
                tokens_per_second(model, prompt, args.new_tokens, use_cache) for _ in range(args.repeats))
        rows.append(f"| {length:,} | {speeds[True]:.1f} | {speeds[False]:.1f} | {speeds[True] / speeds[False]:.1f}x |")
        print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join([
        "# Generation speed", "",
        f"Layers {layers}, d_model 256, 4 heads × 64, d_ff 1024, chunks 64, 2 hashes; greedy, "
        f"{args.new_tokens} new tokens, batch 1, median of {args.repeats} runs. The cached time includes feeding "
        "the prompt through the cache token by token.", "",
        *rows, "",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}", "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
