"""Reformer against Longformer, side by side: every attention family on the same model, data, seeds and steps.

One model skeleton, the speed table's (benchmarks/compare.py: causal, d_model 256, 4 heads x 64, d_ff 1024,
reversible, the feed-forward in chunks of 1024), with every layer's attention set to each family in turn:
- LSH: 4 hashes, chunks of 64 (buckets from the length);
- sliding: Longformer's window, 128 keys before each query (causal);
- sliding, char-LM pattern: the Longformer paper's character LM, windows growing with depth (32 at the bottom
  to 128 at the top) and dilation 2 on two of the four heads of the upper half;
- local: chunks of 128, each attending to itself and the chunk before (causal);
- full: dense attention (PyTorch's SDPA);
- local/LSH: the published Reformer's mix, local and LSH layers alternating;
- sliding + global (duplication only, the task with natural global tokens): the two separators global.
Every row of a task: the same seed, batches, steps and learning-rate schedule (AdamW, linear warm-up, cosine).

Tasks, each chosen to separate the families:
- duplication (the paper's `0 w 0 w`, vocabulary 128) at --dup-length 512: each symbol of the second copy
  sits 256 positions after its first, beyond a 128-key window. Held-out greedy copy accuracy (second copy
  only) after --dup-steps 400 steps of batch 8; chance is 1/127. One layer, as the paper's duplication model
  (so the depth patterns, char-LM and local/LSH, are left out: with one layer they are "sliding" and "local"),
  learned absolute positions (examples/duplication_demo.py: axial positions stall this task). The paper's
  length 1,024 does not fit this machine's budget: there a one-layer LSH model stayed at chance (loss ln 127)
  for 300 steps of batch 8 (~5 minutes), while at 512 it jumps from chance to 99% between steps 250 and 300.
- text: Crime and Punishment as bytes (../shared/data; without it, this repository's source) at --text-length
  4,096 tokens, the whole skeleton (--text-layers 6): held-out bits per byte every --text-eval-every steps, reported
  at the last step (equal steps) and at the time the fastest family needed for its steps (equal wall-clock).
- cost: one training step of the six-layer skeleton at 4,096, 16,384 and 65,536 tokens (batch 1), each in a
  fresh process (compare.py's worker pattern: a warm-up step, then the median of --repeats): seconds, tokens/s,
  peak RSS. A cell predicted (from the family's two shorter lengths) to take more than --max-step-s is skipped.

Writes benchmarks/results/families.md, families.json and families.png (held-out quality against step time).

    python benchmarks/families.py            # <= 60 minutes on a 2-core CPU; `make bench-families`
    python benchmarks/families.py --quick --out /tmp/families   # every part at toy sizes (~5 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16 import text_file  # noqa: E402  (the novel, or this repository's source without it)
from harness import command_line, cpu_name, run_worker, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
D_MODEL, HEADS, D_HEAD, D_FF, FF_CHUNK = 256, 4, 64, 1024, 1024
HASHES, LSH_CHUNK, WINDOW, LOCAL_CHUNK = 4, 64, 128, 128
FAMILIES = ("LSH", "sliding", "sliding, char-LM pattern", "local", "full", "local/LSH", "sliding + global")
COST_LENGTHS = (4096, 16384, 65536)
DEPTH_PATTERNS = ("sliding, char-LM pattern", "local/LSH")  # patterns over layers: one layer makes them plain
DUP_VOCAB = 128


def family_fields(family: str, layers: int) -> dict:
    """The ReformerConfig fields that make every one of `layers` layers `family`'s attention."""
    if family == "LSH":
        return dict(attn_layers=("lsh",) * layers)
    if family in ("sliding", "sliding + global"):
        return dict(attn_layers=("sliding",) * layers, sliding_window=WINDOW)
    if family == "sliding, char-LM pattern":
        windows = tuple(max(32, WINDOW * (i + 1) // layers) for i in range(layers))  # growing with depth
        dilation = tuple((1, 1, 2, 2) if 2 * i >= layers else (1, 1, 1, 1) for i in range(layers))
        return dict(attn_layers=("sliding",) * layers, sliding_window=windows, sliding_dilation=dilation)
    if family == "local":
        return dict(attn_layers=("local",) * layers, local_chunk_size=LOCAL_CHUNK)
    if family == "full":
        return dict(attn_layers=("full",) * layers)
    if family == "local/LSH":
        return dict(attn_layers=tuple("local" if i % 2 == 0 else "lsh" for i in range(layers)),
                    local_chunk_size=LOCAL_CHUNK)
    raise ValueError(f"unknown family {family!r}")


def model_config(family: str, layers: int, length: int, vocab: int, positions: str = "axial"):
    from reformer import ReformerConfig
    from reformer.config import default_axial_shape

    axial = dict(axial_shape=default_axial_shape(length), axial_dims=(64, 192)) if positions == "axial" else dict(
        axial_shape=None, axial_dims=None)
    return ReformerConfig(vocab_size=vocab, d_model=D_MODEL, n_heads=HEADS, d_head=D_HEAD, d_ff=D_FF,
                          lsh_chunk_size=LSH_CHUNK, n_hashes=HASHES, max_seq_len=length, ff_chunk_size=FF_CHUNK,
                          loss_chunk_size=4096, reversible=True, causal=True, seed=0, **axial,
                          **family_fields(family, layers))


# --- quality: one training run ----------------------------------------------------------------------

def train_family(family: str, task: str, args, text: Path | None) -> dict:
    """Train `family` on `task` with a plain loop (fixed seeds and batches), evaluating every eval_every steps."""
    import torch

    from reformer import ReformerLM
    from reformer.data import WindowSampler, open_tokens, split
    from reformer.duplication import duplication_accuracy, duplication_batch
    from reformer.memory import release_freed_memory_eagerly
    from reformer.train import lr_factor

    release_freed_memory_eagerly()
    if task == "duplication":
        layers, length, steps, batch = args.dup_layers, args.dup_length, args.dup_steps, args.dup_batch
        every = args.dup_eval_every
        config = model_config(family, layers, length, DUP_VOCAB, positions="absolute")
        data_gen = torch.Generator().manual_seed(1)
        held_out = duplication_batch(args.eval_rows, length, DUP_VOCAB, torch.Generator().manual_seed(12345))

        def batch_of(step):
            return duplication_batch(batch, length, DUP_VOCAB, data_gen)
    else:
        layers, length, steps, batch = args.text_layers, args.text_length, args.text_steps, args.text_batch
        every = args.text_eval_every
        config = model_config(family, layers, length, 256)
        train_data, valid_data = split(open_tokens(text), 0.05)
        sampler = WindowSampler(train_data, length, batch, torch.Generator().manual_seed(1))
        windows = WindowSampler(valid_data, length, args.eval_rows, torch.Generator().manual_seed(12345))
        held_out = windows.next_batch()

        def batch_of(step):
            return sampler.next_batch()
    model = ReformerLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.dup_lr if task == "duplication" else args.lr,
                                  weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, max(1, steps // 10), steps, 0.1))
    global_mask = None
    if family == "sliding + global":  # the two separators of `0 w 0 w`
        global_mask = torch.zeros(1, length, dtype=torch.bool)
        global_mask[0, 0] = global_mask[0, length // 2] = True

    def evaluate() -> float:
        model.eval()
        ids, labels = held_out
        with torch.no_grad():
            if task == "duplication":
                value = accuracy_with(model, ids, labels, global_mask, duplication_accuracy)
            else:
                value = model(ids, labels=labels).loss.item() / math.log(2)  # bits per byte
        model.train()
        return value

    history, trained_s = [], 0.0
    for step in range(steps):
        ids, labels = batch_of(step)
        start = time.perf_counter()
        mask = None if global_mask is None else global_mask.expand(ids.shape[0], -1)
        loss = model(ids, labels=labels, global_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_s += time.perf_counter() - start
        if (step + 1) % every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "seconds": trained_s, "value": evaluate(), "loss": loss.item()})
    return {"family": family, "task": task, "layers": layers, "length": length, "steps": steps, "batch": batch,
            "seconds_per_step": trained_s / steps, "history": history, "final": history[-1]["value"]}


def accuracy_with(model, ids, labels, global_mask, accuracy) -> float:
    """Copy accuracy; with global tokens, the model's forward takes their mask (duplication_accuracy cannot)."""
    if global_mask is None:
        return accuracy(model, ids, labels)
    from reformer.model import IGNORE_INDEX

    logits = model(ids, global_mask=global_mask.expand(ids.shape[0], -1)).logits
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return (logits[:, :-1].argmax(dim=-1)[scored] == targets[scored]).double().mean().item()


# --- cost: one training step in a fresh process ---------------------------------------------------

def cost_worker(family: str, length: int, repeats: int) -> dict:
    import torch

    from reformer import ReformerLM
    from reformer.memory import peak_rss_mib, release_freed_memory_eagerly

    release_freed_memory_eagerly()
    model = ReformerLM(model_config(family, 6, length, 256)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    times = [step() for _ in range(repeats)]
    return {"family": family, "length": length, "step_s": statistics.median(times), "peak_mib": peak_rss_mib()}


def predicted_seconds(done: list[dict], length: int) -> float | None:
    """A step's seconds at `length`, extrapolated from the family's last two measured lengths (power law)."""
    cells = [cell for cell in done if "step_s" in cell][-2:]
    if len(cells) < 2:
        return None
    (l1, t1), (l2, t2) = [(cell["length"], cell["step_s"]) for cell in cells]
    return t2 * (t2 / t1) ** (math.log(length / l2) / math.log(l2 / l1))


# --- the report ---------------------------------------------------------------------------------------

def at_time(run: dict, seconds: float) -> dict | None:
    """The run's last evaluation at or before `seconds` of training."""
    reached = [record for record in run["history"] if record["seconds"] <= seconds * 1.0001]
    return reached[-1] if reached else None


def report(argv, args, runs: list[dict], costs: list[dict], text_name: str, seconds: float) -> str:
    import torch

    lines = ["# Attention families side by side: LSH, sliding window, local, full and the mixes\n",
             f"Command: `{command_line('families.py', argv)}`. {datetime.date.today()}, {cpu_name()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {seconds:.0f} s in all.\n",
             f"Skeleton (every row): causal, d_model {D_MODEL}, {HEADS} heads x {D_HEAD}, d_ff {D_FF}, reversible, "
             f"feed-forward chunks of {FF_CHUNK}. LSH: {HASHES} hashes, chunks of {LSH_CHUNK}; sliding: {WINDOW} "
             f"keys before each query; local: chunks of {LOCAL_CHUNK} and the one before; char-LM pattern: windows "
             "growing with depth, dilation 2 on half the heads of the upper layers. Same seed, batches, steps and "
             f"schedule in every row of a task (AdamW, peak lr {args.dup_lr:g} for duplication and {args.lr:g} for "
             "text, 10% warm-up, cosine).\n"]
    dup = [run for run in runs if run["task"] == "duplication"]
    if dup:
        first = dup[0]
        lines += [f"## Duplication: copy {first['length'] // 2} positions back\n",
                  f"`0 w 0 w` at length {first['length']:,} (vocabulary {DUP_VOCAB}, chance "
                  f"{1 / (DUP_VOCAB - 1):.1%}), "
                  f"{first['layers']} layer{'s' if first['layers'] > 1 else ''}, learned absolute positions, batch "
                  f"{first['batch']}, {first['steps']} "
                  f"steps. Held-out greedy accuracy on the second copy ({args.eval_rows} sequences).\n",
                  "| family | copy accuracy | best during training | s/step |", "|---|---:|---:|---:|"]
        for run in dup:
            best = max(record["value"] for record in run["history"])
            lines.append(f"| {run['family']} | {run['final']:.1%} | {best:.1%} | {run['seconds_per_step']:.2f} |")
        lines.append("")
    text_runs = [run for run in runs if run["task"] == "text"]
    if text_runs:
        first = text_runs[0]
        equal_time = min(run["history"][-1]["seconds"] for run in text_runs)
        lines += ["## Text: bits per byte\n",
                  f"{text_name} as bytes, {first['length']:,} tokens a sequence, batch {first['batch']}, "
                  f"{first['layers']} layers (axial positions), {first['steps']} steps; held-out bits per byte on "
                  f"{args.eval_rows} fixed windows. Equal time: each family's last evaluation within "
                  f"{equal_time:.0f} s of training, the time the fastest family took for all its steps.\n",
                  f"| family | bits/byte at step {first['steps']} | bits/byte at {equal_time:.0f} s (step) | s/step |",
                  "|---|---:|---:|---:|"]
        for run in text_runs:
            timed = at_time(run, equal_time)
            cell = "-" if timed is None else f"{timed['value']:.3f} ({timed['step']})"
            lines.append(f"| {run['family']} | {run['final']:.3f} | {cell} | {run['seconds_per_step']:.2f} |")
        lines.append("")
    if costs:
        lengths = sorted({cell["length"] for cell in costs})
        families = list(dict.fromkeys(cell["family"] for cell in costs))
        lines += ["## Cost: one training step of the six-layer skeleton\n",
                  f"Batch 1, byte vocabulary; a fresh process per cell, a warm-up step, the median of {args.repeats} "
                  "timed steps (forward, backward, AdamW); peak RSS of the process.\n",
                  "| family | " + " | ".join(f"{n:,} tokens: s/step, tokens/s, peak GiB" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for family in families:
            cells = []
            for length in lengths:
                cell = next((c for c in costs if c["family"] == family and c["length"] == length), {})
                if "step_s" in cell:
                    cells.append(f"{cell['step_s']:.2f} s, {length / cell['step_s']:,.0f}, "
                                 f"{cell['peak_mib'] / 1024:.2f}")
                else:
                    cells.append(cell.get("skip") or f"failed: {cell.get('error', '-')}")
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in ("duplication", "text") if any(run["task"] == task for run in runs)]
    if not tasks:
        return None
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for run in (run for run in runs if run["task"] == task):
            axis.plot([r["seconds"] for r in run["history"]], [r["value"] for r in run["history"]], marker="o",
                      markersize=3, label=f"{run['family']} ({run['seconds_per_step']:.2f} s/step)")
        axis.set_xlabel("training seconds")
        axis.set_ylabel("held-out copy accuracy" if task == "duplication" else "held-out bits per byte")
        axis.set_title(task)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--tasks", nargs="+", choices=("duplication", "text", "cost"), default=["duplication", "text",
                                                                                            "cost"])
    p.add_argument("--dup-length", type=int, default=512)
    p.add_argument("--dup-layers", type=int, default=1)
    p.add_argument("--dup-steps", type=int, default=400)
    p.add_argument("--dup-batch", type=int, default=8)
    p.add_argument("--dup-eval-every", type=int, default=50)
    p.add_argument("--dup-lr", type=float, default=2e-3, help="duplication's peak learning rate (the demo's)")
    p.add_argument("--text-length", type=int, default=4096)
    p.add_argument("--text-layers", type=int, default=6)
    p.add_argument("--text-steps", type=int, default=60)
    p.add_argument("--text-batch", type=int, default=1)
    p.add_argument("--text-eval-every", type=int, default=15)
    p.add_argument("--eval-rows", type=int, default=4, help="held-out sequences per evaluation")
    p.add_argument("--lr", type=float, default=1e-3, help="text's peak learning rate")
    p.add_argument("--cost-lengths", type=int, nargs="+", default=list(COST_LENGTHS))
    p.add_argument("--repeats", type=int, default=1, help="timed steps per cost cell, after a warm-up")
    p.add_argument("--max-step-s", type=float, default=120.0, help="skip a cost cell predicted slower than this")
    p.add_argument("--quick", action="store_true", help="every part at toy sizes (a smoke run, minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="directory of the results")
    p.add_argument("--worker", nargs=2, metavar=("FAMILY", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    counts = ("dup_length", "dup_layers", "dup_steps", "dup_batch", "dup_eval_every", "text_length", "text_layers",
              "text_steps", "text_batch", "text_eval_every", "eval_rows", "repeats")
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dup_length < 4 or args.dup_length % 2:
        p.error(f"--dup-length must be even and at least 4 (0 w 0 w), got {args.dup_length}")
    if any(length < 1 for length in args.cost_lengths) or args.lr <= 0 or args.dup_lr <= 0:
        p.error("--cost-lengths, --lr and --dup-lr must be positive")
    if args.worker:
        print(json.dumps(cost_worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    if args.quick:
        args.dup_length, args.dup_layers, args.dup_steps, args.dup_batch, args.eval_rows = 128, 2, 4, 2, 2
        args.text_length, args.text_layers, args.text_steps, args.text_batch = 256, 2, 4, 1
        args.dup_eval_every = args.text_eval_every = 2
        args.cost_lengths = [256, 512]
    started = time.perf_counter()
    runs, costs = [], []
    with tempfile.TemporaryDirectory() as work:
        text, text_name = text_file(Path(work))
        for task in ("duplication", "text"):
            if task not in args.tasks:
                continue
            for family in args.families:
                if family == "sliding + global" and task != "duplication":
                    continue  # text has no natural global tokens
                if task == "duplication" and args.dup_layers == 1 and family in DEPTH_PATTERNS:
                    continue  # one layer: the same model as "sliding" and "local"
                runs.append(train_family(family, task, args, text))
                print(json.dumps({key: value for key, value in runs[-1].items() if key != "history"}), flush=True)
    if "cost" in args.tasks:
        for family in (f for f in args.families if f != "sliding + global"):
            done = []
            for length in args.cost_lengths:
                predicted = predicted_seconds(done, length)
                if predicted is not None and predicted > args.max_step_s:
                    cell = {"family": family, "length": length,
                            "skip": f"skipped: predicted {predicted:.0f} s > {args.max_step_s:g} s"}
                else:
                    command = [sys.executable, __file__, "--worker", family, str(length), "--repeats",
                               str(args.repeats)]
                    cell = run_worker(command, family, length, timeout_s=args.max_step_s * (2 + args.repeats) + 120)
                    cell.setdefault("family", family)
                done.append(cell)
                costs.append(cell)
                print(json.dumps(cell), flush=True)
    text = report(argv, args, runs, costs, text_name, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    image = plot(runs, args.out / "families.png")
    if image is not None:
        text += f"\n![held-out quality against training time]({image.name})\n"
    write_result(args.out / "families.md", text)
    (args.out / "families.json").write_text(json.dumps({"runs": runs, "costs": costs}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
