"""The native CPU kernels beside their PyTorch paths, call by call, at the benchmark model's shapes.

Four calls, each with the native kernels on and off (REFORMER_NATIVE=1 / 0, in
alternation within one process, --rounds rounds of --calls calls each, and
--layer-calls for the whole layer; the table gives medians over the rounds of the
mean time per call):
- the window kernel's forward on one block: 64 chunks of 64 queries, d 64,
  windows of 2 chunks (the block of benchmarks/compare.py's model: LSH chunks of
  64, one chunk looked back), 30% of the keys masked; PyTorch's path is its CPU
  flash-attention kernel over strided window views;
- its backward on the same block; PyTorch's path is the batched products of
  `window_block_backward_batched`;
- LSH hashing (`hash_vectors`) of one layer: 4 heads x d 64, 4 rounds, the
  buckets the model takes (n_buckets=None: 2n / 64, factorised), at each
  --lengths; PyTorch's path is `first_signed_argmax`'s float passes;
- the causal LSH attention of one layer (`lsh_attention`, the same heads, rounds
  and buckets, chunks of 64), forward and backward, at each --lengths: the
  native kernel reads each block's rows through the plan's indices and builds
  its mask in cache; PyTorch's path gathers the rows, builds the mask and runs
  the flash kernel and the batched backward. It includes the hashing, sorting,
  plans and the rounds' combination, which both paths share.
FLOP rates count the forward's 2 and the backward's 5 (c, w, d) products per
chunk, against the matmul rate (float32, compare.py's RATE_SIZE^3: 4096^3 by default) measured at the start of
each round.

    python benchmarks/kernel_calls.py            # writes benchmarks/results/kernels.md and kernels.json
    python benchmarks/kernel_calls.py --rounds 3 --calls 20 --out /tmp/kernels.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import CHUNK, D_HEAD, HASHES, HEADS, RATE_LABEL, command_line, matmul_gflops  # noqa: E402

from reformer.attention import lsh, native, window_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"native": "1", "PyTorch": "0"}
PARTS, BLOCK_CHUNKS, MASKED_SHARE = 2, 64, 0.3


def block(seed: int = 0) -> dict:
    """One block of the benchmark model's shape, with its forward's outputs for the backward."""
    gen = torch.Generator().manual_seed(seed)
    g, c, d, w = BLOCK_CHUNKS, CHUNK, D_HEAD, PARTS * CHUNK
    q = torch.randn(g, c, d, generator=gen)
    k, v = (torch.randn((g + PARTS - 1) * c, d, generator=gen) for _ in range(2))
    mask = torch.where(torch.rand(g, c, w, generator=gen) < MASKED_SHARE, -1e9, 0.0)
    mask[:, :, w - c:].diagonal(dim1=1, dim2=2).zero_()  # every query sees at least itself
    scale = d ** -0.5
    out, lse = window_kernel.window_block_forward(q, k, v, mask, scale)
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": scale, "out": out, "lse": lse,
            "grad": torch.randn(g, c, d, generator=gen), "flops": {"forward": 2, "backward": 5}}


def calls(lengths: list[int]) -> dict:
    """name -> (a function of no arguments, its FLOPs per call or None)."""
    b = block()
    chunk_flops = 2 * BLOCK_CHUNKS * CHUNK * PARTS * CHUNK * D_HEAD  # one (c, w, d) product per chunk of the block
    table = {
        "window kernel, forward (one block)": (
            lambda: window_kernel.window_block_forward(b["q"], b["k"], b["v"], b["mask"], b["scale"]),
            2 * chunk_flops),
        "window kernel, backward (one block)": (
            lambda: window_kernel.window_block_backward(b["grad"], b["q"], b["k"], b["v"], b["out"], b["lse"],
                                                        b["mask"], b["scale"]),
            5 * chunk_flops),
    }
    gen = torch.Generator().manual_seed(1)
    for length in lengths:
        x = torch.randn(1, HEADS, length, D_HEAD, generator=gen)
        buckets = lsh.n_buckets_for_length(length, CHUNK)  # the model's rule (n_buckets=None), factorised
        rotations = torch.randn(HEADS, D_HEAD, HASHES, lsh.rotation_size(buckets), generator=gen)
        table[f"LSH hashing, one layer at {length:,} tokens ({buckets} buckets)"] = (
            lambda x=x, rotations=rotations, buckets=buckets: lsh.hash_vectors(x, rotations, buckets), None)
    for length in lengths:
        table[f"LSH attention of one layer at {length:,} tokens, forward and backward"] = (
            lsh_layer(length, gen), None, "layer")
    return table


def lsh_layer(length: int, gen: torch.Generator):
    """One causal LSH attention call of the benchmark model's layer shape and its backward."""
    qk, v = (torch.randn(1, HEADS, length, D_HEAD, generator=gen, requires_grad=True) for _ in range(2))
    buckets = lsh.n_buckets_for_length(length, CHUNK)
    rotations = torch.randn(HEADS, D_HEAD, HASHES, lsh.rotation_size(buckets), generator=gen)
    grad = torch.randn(1, HEADS, length, D_HEAD, generator=gen)

    def call():
        out, _ = lsh.lsh_attention(qk, v, rotations, n_buckets=buckets, chunk_size=CHUNK, causal=True)
        out.backward(grad)
    return call


def time_calls(function, count: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - start) / count


def measure(table: dict, rounds: int, count: int, layer_count: int) -> tuple[list[float], dict]:
    rates, seconds = [], {(name, setting): [] for name in table for setting in SETTINGS}
    for _ in range(rounds):
        rates.append(matmul_gflops("cpu"))
        for name, (function, _, *kind) in table.items():
            for setting, value in SETTINGS.items():
                os.environ[native.ENABLE_VARIABLE] = value
                seconds[(name, setting)].append(time_calls(function, layer_count if kind else count))
    os.environ.pop(native.ENABLE_VARIABLE, None)
    return rates, seconds


def report(table: dict, rates: list[float], seconds: dict, command: str) -> str:
    rate = statistics.median(rates)
    lines = [f"# The native CPU kernels beside their PyTorch paths\n",
             f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. {len(rates)} rounds, the two paths in alternation; medians over the rounds of "
             f"the mean time per call. Matmul rate (float32, {RATE_LABEL}): {', '.join(f'{r:.0f}' for r in rates)} "
             f"GFLOP/s in the rounds, median {rate:.0f}.\n",
             "| call | native (ms) | PyTorch (ms) | speed-up | native GFLOP/s (share of the matmul rate) "
             "| PyTorch GFLOP/s (share) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (_, flops, *_) in table.items():
        fast, slow = (statistics.median(seconds[(name, s)]) for s in SETTINGS)
        rates_text = [f"{flops / t / 1e9:.0f} ({flops / t / 1e9 / rate:.0%})" if flops else "" for t in (fast, slow)]
        lines.append(f"| {name} | {fast * 1e3:.2f} | {slow * 1e3:.2f} | {slow / fast:.2f}x | {rates_text[0]} "
                     f"| {rates_text[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=50, help="calls per path per round")
    p.add_argument("--layer-calls", type=int, default=3, help="calls of the whole layer per path per round")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="hashing lengths")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.layer_calls < 1:
        p.error("--rounds, --calls and --layer-calls must be at least 1")
    if native.library() is None:
        p.error("the native kernels are unavailable here (no C++ compiler, or REFORMER_NATIVE=0): nothing to compare")
    table = calls(args.lengths)
    rates, seconds = measure(table, args.rounds, args.calls, args.layer_calls)
    command = command_line("kernel_calls.py", argv)
    text = report(table, rates, seconds, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"rates": rates, "seconds": {f"{name} | {setting}": v for (name, setting), v in seconds.items()}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
