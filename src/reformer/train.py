"""train(): the training loop behind `reformer train`, as a library function.

It returns its history and reads no global state: no argparse, no sys.argv, no
global RNG. A run directory holds `config.json` (the model), `train.json` (these
options), `metrics.jsonl` (one JSON object per train or eval record),
`checkpoints/` (see `reformer.checkpoint`) and `curves.png`.

Resuming restores the weights, AdamW and scheduler states, the step, the model's
generator and the data sampler, so an interrupted-and-resumed run reproduces the
uninterrupted one, loss for loss, on the CPU.

Under torchrun (see `reformer.distributed`) every process trains a DDP replica
on its shard of each global batch: `batch_size` sequences per micro-batch in
all, split evenly over the processes, so a run resumed on a different number
of processes sees the same batches. Only rank 0 writes files; losses and
evaluations are reduced over all ranks first. Gradient accumulation skips the
all-reduce until the last micro-step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (check_compatible, latest_checkpoint, load_model_config, load_state, resolve_checkpoint,
                         save_checkpoint)
from .config import ReformerConfig
from .memory import release_freed_memory_eagerly
from .model import ReformerLM

LN2 = math.log(2)


@dataclass
class TrainConfig:
    out: str  # run directory
    data: str | None = None  # a text file (bytes are tokens); or use task
    task: str | None = None  # "duplication": the paper's synthetic copy task
    valid_data: str | None = None  # a separate validation file (else the last valid_fraction of data)
    valid_fraction: float = 0.05
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 8  # sequences per micro-batch, over all processes together
    seq_len: int = 1024  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate of AdamW
    warmup: int = 100  # linear warm-up steps, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    eval_every: int = 100  # steps between evaluations (0 = only at the end)
    eval_batches: int = 4  # batches per evaluation
    save_every: int = 500  # steps between checkpoints (0 = only at the end)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"; under torchrun, cuda:LOCAL_RANK
    static_graph: bool = False  # DDP's static_graph (several processes only)
    compile: bool = False  # torch.compile the position-wise parts (`reformer.compile`)
    seed: int = 0  # data order; the model's seed is in its config
    resume: bool = False  # continue from the latest checkpoint in `out`
    init_from: str | None = None  # start a new run from these weights (a model, checkpoint or run directory)
    progress: bool = True  # show a tqdm progress bar

    def validate(self) -> None:
        if (self.data is None) == (self.task is None):
            raise ValueError("give exactly one of --data PATH or --task duplication")
        if self.task not in (None, "duplication"):
            raise ValueError(f"unknown task {self.task!r}; the only task is 'duplication'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_samplers(cfg: TrainConfig, model_config: ReformerConfig, process: distributed.Process | None = None):
    """(train sampler, fixed list of eval batches) of this process; every batch is (ids, labels).

    Each of the world_size processes gets its batch_size / world_size rows of every global batch.
    """
    process = process or distributed.Process()
    if cfg.batch_size % process.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is split over {process.world_size} processes; give a "
                         f"multiple of {process.world_size}")
    rows, shard = cfg.batch_size // process.world_size, dict(rank=process.rank, world_size=process.world_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if cfg.task == "duplication":
        from .duplication import DuplicationSampler

        train = DuplicationSampler(rows, cfg.seq_len, model_config.vocab_size, gen, **shard)
        valid = DuplicationSampler(rows, cfg.seq_len, model_config.vocab_size, eval_gen, **shard)
    else:
        from .data import WindowSampler, load_splits

        train_data, valid_data = load_splits(cfg.data, cfg.valid_data, cfg.valid_fraction)
        train = WindowSampler(train_data, cfg.seq_len, rows, gen, **shard)
        valid = WindowSampler(valid_data, cfg.seq_len, rows, eval_gen, **shard)
    return train, [valid.next_batch() for _ in range(cfg.eval_batches)]


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: ReformerLM, batches, precision: str = "fp32",
             process: distributed.Process | None = None) -> dict[str, float]:
    """Token-weighted mean loss (and bits per token) over `batches`, in eval mode; over every rank's shard."""
    model = distributed.unwrapped(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, labels in batches:
        with _autocast(precision, device):
            out = model(ids.to(device), labels=labels.to(device))
        total += out.loss.item() * out.n_tokens
        count += out.n_tokens
    model.train(was_training)
    total, count = distributed.sum_over_ranks([total, count], process or distributed.Process())
    loss = total / max(count, 1)
    return {"loss": loss, "bpc": loss / LN2}


class _Run:
    """The files of a run directory; a process that is not the writer (rank > 0) reads them only."""

    def __init__(self, out: str, process: distributed.Process):
        self.dir = Path(out)
        self.process = process
        self.writer = process.is_main
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.dir / "metrics.jsonl"

    def write_configs(self, cfg: TrainConfig, model_config: ReformerConfig) -> None:
        if not self.writer:
            return
        model_config.to_json(self.dir / "config.json")
        (self.dir / "train.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    def truncate_metrics(self, step: int) -> list[dict]:
        """Keep the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
        exists = self.metrics.exists()
        kept = [r for r in map(json.loads, self.metrics.read_text().splitlines()) if r["step"] <= step] \
            if exists else []
        distributed.barrier(self.process)  # every rank has read the file before rank 0 rewrites it
        if self.writer and exists:
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, model_config: ReformerConfig) -> list[dict]:
    """Train (or resume) a ReformerLM; returns the metrics records of the whole run.

    Under torchrun, every process calls this; each returns the same history.
    """
    cfg.validate()
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}; "
                         f"lower --seq-len or raise --max-seq-len")
    process = distributed.start(cfg.device)
    try:
        history = _train(cfg, model_config, process)
    except BaseException:
        distributed.stop(process, wait=False)
        raise
    distributed.stop(process)
    return history


def _train(cfg: TrainConfig, model_config: ReformerConfig, process: distributed.Process) -> list[dict]:
    release_freed_memory_eagerly()
    run = _Run(cfg.out, process)
    model = ReformerLM(model_config).to(process.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    sampler, eval_batches = make_samplers(cfg, model_config, process)
    step, history = _maybe_resume(cfg, run, model, optimizer, scheduler, sampler, model_config)
    if step == 0 and cfg.init_from:
        _load_initial_weights(model, cfg.init_from, model_config)
    run.write_configs(cfg, model_config)
    if cfg.compile:
        from .compile import compile_model

        compile_model(model)
    replica = distributed.wrap(model, process, cfg.static_graph)

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and process.is_main), unit="step",
               dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    start, start_step = time.perf_counter(), step
    while step < cfg.steps:
        loss = _train_step(cfg, replica, optimizer, scheduler, sampler, process)
        step += 1
        rate = (step - start_step) * tokens_per_step / (time.perf_counter() - start)
        record = {"step": step, "split": "train", "loss": loss, "bpc": loss / LN2,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate}
        run.log(record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", bpc=f"{loss / LN2:.3f}", tok_s=f"{rate:,.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            record = {"step": step, "split": "eval", **evaluate(model, eval_batches, cfg.precision, process)}
            run.log(record)
            history.append(record)
            bar.write(f"step {step}: eval loss {record['loss']:.4f}, {record['bpc']:.4f} bits per token")
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            if process.is_main:
                _save(run, model, optimizer, scheduler, sampler, step)
            distributed.barrier(process)  # no rank runs ahead of a checkpoint that may be resumed from
    bar.close()
    if process.is_main:
        plot_curves(history, run.dir / "curves.png")
    return history


def _train_step(cfg, model, optimizer, scheduler, sampler, process: distributed.Process | None = None) -> float:
    """One optimizer step over grad_accum micro-batches; the loss averaged over them and over all ranks."""
    process = process or distributed.Process()
    device = next(model.parameters()).device
    total = 0.0
    for micro in range(cfg.grad_accum):
        ids, labels = sampler.next_batch()
        with distributed.no_sync(model, last=micro == cfg.grad_accum - 1):
            with _autocast(cfg.precision, device):
                loss = model(ids.to(device), labels=labels.to(device)).loss
            (loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (total,) = distributed.sum_over_ranks([total], process)
    return total / process.world_size


def _save(run: _Run, model, optimizer, scheduler, sampler, step: int) -> None:
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "model_generator": model.generator.get_state(), "sampler": sampler.state_dict()}
    save_checkpoint(run.dir, model, state, step)


def _maybe_resume(cfg, run, model, optimizer, scheduler, sampler, model_config) -> tuple[int, list[dict]]:
    latest = latest_checkpoint(run.dir)
    if not cfg.resume:
        if latest is not None:
            raise ValueError(f"{run.dir} already holds a run; add --resume to continue it, or choose a new --out")
        run.truncate_metrics(-1)
        return 0, []
    if latest is None:
        raise ValueError(f"--resume: {run.dir} holds no checkpoint yet; drop --resume to start a new run")
    check_compatible(load_model_config(latest), model_config)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(latest / "model.safetensors")))
    state = load_state(latest)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    model.generator.set_state(state["model_generator"])
    sampler.load_state_dict(state["sampler"])
    return state["step"], run.truncate_metrics(state["step"])


def _load_initial_weights(model, path: str, model_config: ReformerConfig) -> None:
    from safetensors.torch import load_file

    source = resolve_checkpoint(path)
    check_compatible(load_model_config(source), model_config, fine_tune=True)
    model.load_state_dict(load_file(str(source / "model.safetensors")))


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Train and eval loss against steps, as a PNG (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in history if r["split"] == split]
        if points:
            ax.plot(*zip(*points), style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_for_eval(path: str | Path, **overrides: Any) -> ReformerLM:
    """A trained model from a run directory or a checkpoint directory, in eval mode."""
    return ReformerLM.from_pretrained(resolve_checkpoint(path), **overrides).eval()
