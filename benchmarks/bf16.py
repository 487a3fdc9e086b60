"""bfloat16 training against float32: the same run twice, its loss curves side by side.

A small byte-level Reformer (4 layers alternating local and LSH attention,
d_model 128, reversible) trains for --steps steps on Crime and Punishment
(../shared/data/crime-and-punishment-2554.txt; without it, this repository's
own source as text), once in float32 and once with `--precision bf16`
(`torch.autocast(bfloat16)`; parameters, AdamW, softmax statistics and the
loss stay in float32). Same seeds, same batches, same LSH rotations. The table
gives the held-out loss at every evaluation, the train loss averaged over the
last 20 steps, their relative gap, and the median step time; the plot both curves.

    python benchmarks/bf16.py                 # writes benchmarks/results/bf16.md and bf16_loss.png
    python benchmarks/bf16.py --steps 20 --eval-every 10
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import write_result  # noqa: E402
NOVEL = ROOT.parent / "shared" / "data" / "crime-and-punishment-2554.txt"
PRECISIONS = ("fp32", "bf16")


def text_file(work: Path) -> tuple[Path, str]:
    if NOVEL.is_file():
        return NOVEL, "Crime and Punishment (Project Gutenberg #2554)"
    files = sorted(ROOT.glob("src/**/*.py")) + sorted(ROOT.glob("*.md"))
    path = work / "source.txt"
    path.write_bytes(b"\n".join(f.read_bytes() for f in files))
    return path, "this repository's source and README (the novel is absent)"


def model_config(seq_len: int):
    from reformer import ReformerConfig
    from reformer.config import default_axial_shape

    return ReformerConfig(vocab_size=256, d_model=128, n_heads=2, d_head=64, d_ff=512,
                          attn_layers=("local", "lsh", "local", "lsh"), lsh_chunk_size=64, local_chunk_size=64,
                          n_hashes=2, axial_shape=default_axial_shape(seq_len), axial_dims=(32, 96),
                          max_seq_len=seq_len, reversible=True, seed=0)


def run(precision: str, data: Path, out: Path, args) -> tuple[list[dict], float]:
    from reformer.train import TrainConfig, train

    cfg = TrainConfig(out=str(out), data=str(data), steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, warmup=args.steps // 10, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=0, precision=precision, progress=False, device="cpu")
    start = time.perf_counter()
    history = train(cfg, model_config(args.seq_len))
    return history, (time.perf_counter() - start) / args.steps


def last_mean(history: list[dict], count: int = 20) -> float:
    losses = [r["loss"] for r in history if r["split"] == "train"][-count:]
    return statistics.fmean(losses)


def table(histories: dict[str, list[dict]], seconds: dict[str, float]) -> list[str]:
    evals = {p: {r["step"]: r["loss"] for r in h if r["split"] == "eval"} for p, h in histories.items()}
    rows = ["| | float32 | bfloat16 | bfloat16 / float32 - 1 |", "|---|---:|---:|---:|"]
    for step in sorted(evals["fp32"]):
        a, b = evals["fp32"][step], evals["bf16"].get(step, float("nan"))
        rows.append(f"| held-out loss at step {step} (nats/byte) | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} |")
    a, b = last_mean(histories["fp32"]), last_mean(histories["bf16"])
    rows.append(f"| train loss, mean of the last 20 steps | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} |")
    rows.append(f"| seconds per step (whole run / steps, evals included) | {seconds['fp32']:.3f} | "
                f"{seconds['bf16']:.3f} | {seconds['bf16'] / seconds['fp32'] - 1:+.1%} |")
    return rows


def plot(histories: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for precision, color in zip(PRECISIONS, ("tab:blue", "tab:orange")):
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [(r["step"], r["loss"]) for r in histories[precision] if r["split"] == split]
            ax.plot(*zip(*points), style, color=color, markersize=4, alpha=0.8 if split == "train" else 1,
                    label=f"{'float32' if precision == 'fp32' else 'bfloat16'} {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval-every must be at least 1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        data, source = text_file(Path(work))
        histories, seconds = {}, {}
        for precision in PRECISIONS:
            histories[precision], seconds[precision] = run(precision, data, Path(work) / precision, args)
            print(f"{precision}: {seconds[precision]:.3f} s per step", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    image = plot(histories, args.out_dir / "bf16_loss.png")
    text = ["# bfloat16 against float32 training\n",
            f"Command: `python {' '.join(['benchmarks/bf16.py', *(argv if argv is not None else sys.argv[1:])])}`. "
            f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{time.perf_counter() - started:.0f} s in all.\n",
            f"Data: {source}, bytes as tokens, the last 5% held out. Model: 4 reversible layers (local, LSH, local, "
            f"LSH), d_model 128, 2 heads x 64, d_ff 512, chunks of 64, 2 hashes. {args.steps} steps of "
            f"{args.batch_size} x {args.seq_len} bytes, AdamW at lr {args.lr:g}, warm-up then cosine. "
            f"Evaluations on {args.eval_batches} fixed held-out batches.\n",
            *table(histories, seconds), ""]
    if image:
        text.append(f"![loss curves]({image.name})")
    write_result(args.out_dir / "bf16.md", "\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
