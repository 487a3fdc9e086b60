"""Quality of prefix-consistent causal LSH beside standard LSH and full attention: the same runs, three ways.

Two tasks, each trained three times with the same seeds, batches and step count, changing only the
attention of the LSH layers:
- "LSH": standard causal LSH (chunks of the sorted sequence, causal mask by position);
- "prefix-consistent LSH": `lsh_prefix_consistent=True`, per round the 2 * chunk latest keys of the
  query's own bucket (no output depends on a later token);
- "full": those layers replaced by full attention (the Transformer baseline).

The tasks:
- duplication: the paper's `0 w 0 w` task as `make demo` runs it (one layer, d_model 256, 4 heads,
  chunk 64, 2 hashes, length 512, vocabulary 128), --dup-steps steps. Loss and accuracy count the
  second copy only.
- text: Crime and Punishment (../shared/data; without it, this repository's source as text), the model
  of benchmarks/bf16.py (4 layers alternating local and LSH, d_model 128, chunk 64, 2 hashes, length
  1024), --text-steps steps.

Reported: the held-out loss at the end (nats per token, from the training run's fixed evaluation
batches), the held-out copy accuracy (duplication), and the seconds per step.

    python benchmarks/prefix_lsh.py              # writes benchmarks/results/prefix_lsh.md
    python benchmarks/prefix_lsh.py --dup-steps 20 --text-steps 20 --out /tmp/prefix
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from harness import write_result  # noqa: E402

VARIANTS = {"LSH": {}, "prefix-consistent LSH": {"lsh_prefix_consistent": True}, "full": None}


def with_variant(config, variant: str):
    from reformer import ReformerConfig

    fields = config.to_dict()
    if VARIANTS[variant] is None:
        fields["attn_layers"] = tuple("full" if kind == "lsh" else kind for kind in config.attn_layers)
    else:
        fields.update(VARIANTS[variant])
    return ReformerConfig.from_dict(fields)


def train_run(task: str, variant: str, steps: int, work: Path, data: Path | None) -> dict:
    from reformer.train import TrainConfig, load_for_eval, train

    if task == "duplication":
        import duplication_demo as demo

        base = demo.model_config(demo.DEFAULT_LENGTH, demo.DEFAULT_VOCAB, seed=0)
        cfg = TrainConfig(out=str(work), task="duplication", steps=steps, batch_size=demo.BATCH_SIZE,
                          seq_len=demo.DEFAULT_LENGTH, lr=demo.LR, warmup=demo.WARMUP, eval_every=0,
                          eval_batches=4, save_every=0, progress=False, device="cpu")
    else:
        import bf16

        base = bf16.model_config(1024)
        cfg = TrainConfig(out=str(work), data=str(data), steps=steps, batch_size=8, seq_len=1024, lr=1e-3,
                          warmup=steps // 10, eval_every=0, eval_batches=4, save_every=0, progress=False,
                          device="cpu")
    config = with_variant(base, variant)
    start = time.perf_counter()
    history = train(cfg, config)
    seconds = (time.perf_counter() - start) / steps
    result = {"task": task, "variant": variant, "steps": steps, "seconds_per_step": seconds,
              "held_out_loss": [r["loss"] for r in history if r["split"] == "eval"][-1]}
    if task == "duplication":
        from reformer.duplication import duplication_accuracy, duplication_batch

        model = load_for_eval(work).eval()
        gen = torch.Generator().manual_seed(demo.EVAL_SEED)
        ids, labels = duplication_batch(demo.EVAL_SEQUENCES, demo.DEFAULT_LENGTH, demo.DEFAULT_VOCAB, gen)
        result["accuracy"] = duplication_accuracy(model, ids, labels)
    return result


def table(results: list[dict]) -> list[str]:
    rows = ["| task | attention | steps | held-out loss (nats) | vs LSH | vs full | held-out copy accuracy "
            "| s per step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["task"], r["variant"]): r for r in results}
    for r in results:
        lsh, full = by.get((r["task"], "LSH")), by.get((r["task"], "full"))
        versus = [f"{r['held_out_loss'] - other['held_out_loss']:+.3f}" if other and other is not r else ""
                  for other in (lsh, full)]
        accuracy = f"{r['accuracy']:.1%}" if "accuracy" in r else ""
        rows.append(f"| {r['task']} | {r['variant']} | {r['steps']} | {r['held_out_loss']:.4f} | {versus[0]} "
                    f"| {versus[1]} | {accuracy} | {r['seconds_per_step']:.2f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dup-steps", type=int, default=250)
    parser.add_argument("--text-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.dup_steps < 1 or args.text_steps < 1:
        parser.error(f"--dup-steps and --text-steps must be at least 1 (got {args.dup_steps} and {args.text_steps})")

    from bf16 import text_file
    from reformer.memory import release_freed_memory_eagerly

    release_freed_memory_eagerly()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data, source = text_file(Path(tmp))
        for task, steps in (("duplication", args.dup_steps), ("text", args.text_steps)):
            for variant in VARIANTS:
                result = train_run(task, variant, steps, Path(tmp) / f"{task}-{len(results)}", data)
                results.append(result)
                print(result, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/prefix_lsh.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# Prefix-consistent causal LSH beside standard LSH and full attention", "",
             f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. Text: {source}. Same seeds, batches and steps in every row of a task; "
             "'vs LSH' / 'vs full' are differences of held-out loss (negative: better).", "",
             *table(results), ""]
    write_result(args.out / "prefix_lsh.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
