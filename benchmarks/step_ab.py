"""Variants of our training step side by side in one process: steps in alternation, paired ratios.

This machine's speed drifts by 10-40% from one process to the next, more than
most single changes. Here every variant is its own model (the benchmark model of
compare.py, the same initial weights, each with its own AdamW) in one process,
and the timed steps alternate between them (the order reversed every other
round, so that a drift within a round weighs on both sides). Each round gives
each variant's step time over the first variant's in the same round; the table
reports the median of these paired ratios, and in how many rounds the variant
was faster. A variant is a name and config overrides (ReformerConfig fields);
`native=0` runs a variant without the native kernels (REFORMER_NATIVE),
`products=blas` with the native window kernel's chunk products in the BLAS
instead of its own tile products (`native.use_tile_products`), and
`backward=autograd` with the reversible backward's chunks differentiated
through autograd instead of by hand (`reversible.use_hand_written_backward`). Peak
memory is per process, not per variant, so it is not reported: compare.py
measures it.

    python benchmarks/step_ab.py --variant default --variant keep reversible_keep_attention=true
    python benchmarks/step_ab.py --variant tile --variant blas products=blas --tag tile-products
    python benchmarks/step_ab.py --variant hand --variant autograd backward=autograd --tag hand-backward
    python benchmarks/step_ab.py --length 4096 --rounds 8 --variant default \
        --variant budget256 reversible_keep_attention_mib=256 --tag keep-budget
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (RATE_LABEL, build_ours, command_line, matmul_gflops,  # noqa: E402
                     model_flops_per_step, write_result)

from reformer import ReformerConfig, ReformerLM  # noqa: E402
from reformer.attention import native  # noqa: E402
from reformer.layers.reversible import use_hand_written_backward  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NATIVE_KEY = "native"  # a variant's setting for REFORMER_NATIVE, beside the config's fields
PRODUCTS_KEY = "products"  # "tile" (the default where compiled) or "blas": the window kernel's chunk products
BACKWARD_KEY = "backward"  # "hand" (the default) or "autograd": reversible.use_hand_written_backward


def parse_variant(words: list[str]) -> tuple[str, dict]:
    """`NAME [KEY=VALUE ...]` -> (name, overrides); values are JSON (true, 256, "x"), else plain strings."""
    name, overrides = words[0], {}
    fields = {f.name for f in dataclasses.fields(ReformerConfig)} | {NATIVE_KEY, PRODUCTS_KEY, BACKWARD_KEY}
    for word in words[1:]:
        key, sep, text = word.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"variant {name!r}: {word!r} is not KEY=VALUE with KEY a ReformerConfig field "
                             f"(or {NATIVE_KEY}, {PRODUCTS_KEY}, {BACKWARD_KEY})")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return name, overrides


class Variant:
    def __init__(self, name: str, overrides: dict, base: ReformerLM):
        self.name, self.overrides = name, dict(overrides)
        self.native = str(self.overrides.pop(NATIVE_KEY, "1"))
        self.products = self.overrides.pop(PRODUCTS_KEY, "tile")
        if self.products not in ("tile", "blas"):
            raise ValueError(f"variant {name!r}: {PRODUCTS_KEY} must be tile or blas, not {self.products!r}")
        self.backward = self.overrides.pop(BACKWARD_KEY, "hand")
        if self.backward not in ("hand", "autograd"):
            raise ValueError(f"variant {name!r}: {BACKWARD_KEY} must be hand or autograd, not {self.backward!r}")
        config = dataclasses.replace(base.config, **self.overrides)  # validates the overrides
        self.model = ReformerLM(config)
        self.model.load_state_dict(base.state_dict())
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.times: list[float] = []

    def step(self, ids: torch.Tensor) -> float:
        os.environ[native.ENABLE_VARIABLE] = self.native
        if native.library() is not None:
            native.use_tile_products(self.products == "tile")
        use_hand_written_backward(self.backward == "hand")
        start = time.perf_counter()
        self.model(ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def run(variants: list[Variant], length: int, rounds: int) -> list[float]:
    """Alternate the variants' steps for `rounds` rounds (after one warm-up step each); the matmul rates."""
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    for variant in variants:
        variant.step(ids)
    rates = []
    for index in range(rounds):
        rates.append(matmul_gflops("cpu"))
        order = variants if index % 2 == 0 else variants[::-1]
        for variant in order:
            variant.times.append(variant.step(ids))
        print(f"round {index + 1}: " + ", ".join(f"{v.name} {v.times[-1]:.2f} s" for v in variants), flush=True)
    os.environ.pop(native.ENABLE_VARIABLE, None)
    if native.library() is not None:
        native.use_tile_products(True)
    use_hand_written_backward(True)
    return rates


def report(variants: list[Variant], rates: list[float], length: int, command: str) -> str:
    first = variants[0]
    rate = statistics.median(rates)
    model = model_flops_per_step(length)
    lines = [f"# Variants of our training step, in alternation in one process\n",
             f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. The benchmark model of compare.py at {length:,} tokens; {len(rates)} rounds "
             f"after one warm-up step each, the variants in alternation (the order reversed every other round). "
             f"Matmul rate (float32, {RATE_LABEL}) at the start of each round: {', '.join(f'{r:.0f}' for r in rates)} "
             f"GFLOP/s, median {rate:.0f}.\n",
             f"| variant | overrides | median step (s) | over {first.name}: median of the paired ratios "
             f"| rounds faster than {first.name} | model GFLOP/s (share of the median matmul rate) |",
             "|---|---|---:|---:|---:|---:|"]
    for variant in variants:
        ratios = [t / base for t, base in zip(variant.times, first.times)]
        settings = {**variant.overrides, **({} if variant.native == "1" else {NATIVE_KEY: variant.native}),
                    **({} if variant.products == "tile" else {PRODUCTS_KEY: variant.products}),
                    **({} if variant.backward == "hand" else {BACKWARD_KEY: variant.backward})}
        overrides = ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"
        faster = "-" if variant is first else f"{sum(r < 1 for r in ratios)} of {len(ratios)}"
        median = statistics.median(variant.times)
        lines.append(f"| {variant.name} | {overrides} | {median:.2f} | {statistics.median(ratios):.3f} | {faster} "
                     f"| {model / median / 1e9:.1f} ({model / median / 1e9 / rate:.0%}) |")
    lines.append("\nStep times by round (s): " + "; ".join(
        f"{v.name} {', '.join(f'{t:.2f}' for t in v.times)}" for v in variants) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY=VALUE]", required=True,
                   help="a variant: its name and config overrides; the first is the reference")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="name the output step_ab_TAG.md")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.length < 1:
        p.error("--rounds and --length must be at least 1")
    try:
        specs = [parse_variant(words) for words in args.variant]
    except ValueError as error:
        p.error(str(error))
    if len({name for name, _ in specs}) != len(specs):
        p.error("variant names must differ")
    torch.manual_seed(0)
    base, _ = build_ours(args.length, torch.device("cpu"))  # also sets compare.py's malloc settings
    try:
        variants = [Variant(name, overrides, base) for name, overrides in specs]
    except (TypeError, ValueError) as error:
        p.error(f"a variant's overrides do not make a valid config: {error}")
    del base
    rates = run(variants, args.length, args.rounds)
    text = report(variants, rates, args.length, command_line("step_ab.py", argv))
    write_result(args.out_dir, "step_ab", args.tag, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
