"""train(): the training loop behind `reformer train`, as a library function.

It returns its history and reads no global state: no argparse, no sys.argv, no
global RNG. A run directory holds `config.json` (the model), `train.json` (these
options), `metrics.jsonl` (one JSON object per train or eval record),
`checkpoints/` (see `reformer.checkpoint`) and `curves.png`.

Resuming restores the weights, AdamW and scheduler states, the step, the model's
generator and the data sampler, so an interrupted-and-resumed run reproduces the
uninterrupted one, loss for loss, on the CPU. `train.json` records the options with
absolute data paths and each data file's size and sha256 (`run_settings` reads
them back; a resume refuses data that changed). SIGINT (Ctrl-C) finishes the step,
saves a checkpoint and raises `Interrupted`; a second one stops at once.

The run directory must be new, empty, or a run of ours (`check_out_dir`): nothing
else is ever overwritten, and a run that fails before writing anything leaves no
directory behind. Records: `loss` in nats per token, `bits_per_token`, and for
evaluations of text `bits_per_byte` (nats / ln 2 / the bytes the predicted tokens
stand for: the same number as bits per token when tokens are bytes).

Under torchrun (see `reformer.distributed`) every process trains a DDP replica
on its shard of each global batch: `batch_size` sequences per micro-batch in
all, split evenly over the processes, so a run resumed on a different number
of processes sees the same batches. Only rank 0 writes files; losses and
evaluations are reduced over all ranks first. Gradient accumulation skips the
all-reduce until the last micro-step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (check_compatible, checkpoint_dir, latest_checkpoint, load_model_config, load_state,
                         resolve_checkpoint, save_checkpoint)
from .config import ReformerConfig
from .memory import release_freed_memory_eagerly
from .model import ReformerLM

LN2 = math.log(2)


@dataclass
class TrainConfig:
    out: str  # run directory
    data: str | None = None  # a text file (bytes are tokens); for task "images", an image source (`reformer.images`)
    task: str | None = None  # "duplication" (the paper's synthetic copy task) or "images" (pixels of `data`)
    valid_data: str | None = None  # a separate validation file (else the last valid_fraction of data)
    image_size: str | None = None  # task "images": "HxW" resizes every image to it (else all must share a size)
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
    tokenizer: str | None = None  # a SentencePiece .model or tokenizers .json file (None: bytes are tokens)
    progress: bool = True  # show a tqdm progress bar

    def validate(self) -> None:
        if self.task not in (None, "duplication", "images"):
            raise ValueError(f"unknown task {self.task!r}; the tasks are 'duplication' and 'images'")
        if self.task == "images" and self.data is None:
            raise ValueError("--task images needs --data: an image directory, a .npy/.npz array or a named set "
                             "(mnist, fashion-mnist, cifar10, mnist-5k)")
        if self.task != "images" and (self.data is None) == (self.task is None):
            raise ValueError("give exactly one of --data PATH or --task duplication")
        if self.task is not None and self.tokenizer is not None:
            raise ValueError("--tokenizer reads text: give --data with it, not --task")
        if self.image_size is not None and self.task != "images":
            raise ValueError("--image-size resizes images: give it with --task images")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("warmup", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a number > 0, got {self.lr!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1), got {self.valid_fraction!r}")


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
    if cfg.task == "images":
        return _image_samplers(cfg, model_config, rows, shard, gen, eval_gen)
    if cfg.task == "duplication":
        from .duplication import DuplicationSampler

        train = DuplicationSampler(rows, cfg.seq_len, model_config.vocab_size, gen, **shard)
        valid = DuplicationSampler(rows, cfg.seq_len, model_config.vocab_size, eval_gen, **shard)
    else:
        from .data import WindowSampler, load_splits
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size is "
                             f"{model_config.vocab_size:,}; give --vocab-size {tokenizer.vocab_size} (or leave it out)")
        train_data, valid_data = load_splits(cfg.data, cfg.valid_data, cfg.valid_fraction, tokenizer)
        train = WindowSampler(train_data, cfg.seq_len, rows, gen, **shard)
        valid = WindowSampler(valid_data, cfg.seq_len, rows, eval_gen, **shard)
    return train, [valid.next_batch_with_bytes() for _ in range(cfg.eval_batches)]


def _image_samplers(cfg: TrainConfig, model_config: ReformerConfig, rows: int, shard: dict, gen, eval_gen):
    from .images import ImageSampler, parse_image_size, train_valid_split

    train_images, valid_images = train_valid_split(cfg.data, cfg.valid_data, cfg.valid_fraction,
                                                   parse_image_size(cfg.image_size))
    shape = train_images.shape
    if model_config.image_shape is not None and tuple(model_config.image_shape) != shape:
        raise ValueError(f"the images are {shape[0]}x{shape[1]}x{shape[2]} but the model's image_shape is "
                         f"{model_config.image_shape}; give --image-size {model_config.image_shape[0]}x"
                         f"{model_config.image_shape[1]} or a model for these images")
    if cfg.seq_len != math.prod(shape):
        raise ValueError(f"the images are {shape[0]}x{shape[1]}x{shape[2]} = {math.prod(shape):,} sub-pixels, so "
                         f"--seq-len must be {math.prod(shape)} (or left out), got {cfg.seq_len}")
    train = ImageSampler(train_images, rows, gen, **shard)
    valid = ImageSampler(valid_images, rows, eval_gen, **shard)
    return train, [valid.next_batch_with_bytes() for _ in range(cfg.eval_batches)]


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`: for CUDA through pinned memory and a non-blocking copy, so that the host goes on
    queueing the step while the batch travels (the copy is ordered on the stream before the kernels that read it)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: ReformerLM, batches, precision: str = "fp32", process: distributed.Process | None = None,
             shift_labels: bool = True) -> dict[str, float]:
    """Token-weighted mean loss (nats per token) and bits per token over `batches` ((ids, labels) or (ids, labels,
    bytes)), in eval mode, over every rank's shard; bits per byte too when every batch knows its bytes.
    shift_labels=False: labels are aligned with the logits (image batches), as `ReformerLM.forward` takes them."""
    model = distributed.unwrapped(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, n_bytes = 0.0, 0, 0
    for ids, labels, *extra in batches:
        with _autocast(precision, device):
            out = model(to_device(ids, device), labels=to_device(labels, device), shift_labels=shift_labels)
        total += out.loss.item() * out.n_tokens
        count += out.n_tokens
        n_bytes = None if n_bytes is None or not extra or extra[0] is None else n_bytes + extra[0]
    model.train(was_training)
    sums = [total, count] + ([] if n_bytes is None else [n_bytes])
    total, count, *n_bytes = distributed.sum_over_ranks(sums, process or distributed.Process())
    loss = total / max(count, 1)
    record = {"loss": loss, "bits_per_token": loss / LN2}
    if n_bytes:
        record["bits_per_byte"] = total / max(n_bytes[0], 1) / LN2
    return record


RUN_FILES = ("train.json", "config.json")  # a directory with both is a run of ours


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in RUN_FILES)


def check_out_dir(out: str | Path) -> bool:
    """Refuse an --out that holds anything but a run of ours; True when the directory exists already."""
    path = Path(out)
    if not path.exists():
        if path.is_symlink():
            raise ValueError(f"--out {path} is a broken link; give a directory")
        parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create --out {path}: {parent} is not writable; choose a writable place")
        return False
    if not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory; give a new directory (or a run of ours)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in --out {path} (permission denied); choose a writable directory")
    entries = sorted(os.listdir(path))
    if entries and not is_run_dir(path):
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise ValueError(f"--out {path} holds files that are not a reformer run ({shown}); give a new or empty "
                         "directory: nothing there is overwritten")
    return True


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file: a resumed run checks that its data did not change."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def _image_fingerprints(source: str) -> dict[str, dict[str, Any]]:
    """{path: fingerprint} of every file an image source reads (a directory's images, a named set's arrays)."""
    from .images import source_files

    return {str(Path(path).absolute()): file_fingerprint(path) for path in source_files(source)}


def run_settings(run_dir: str | Path) -> tuple[TrainConfig, ReformerConfig]:
    """The training options and model config a run was started with (train.json, config.json)."""
    from .checkpoint import CheckpointError

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run of ours (no train.json and config.json there); give the "
                              "--out of a `reformer train` run")
    try:
        saved = json.loads((run_dir / "train.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{run_dir / 'train.json'} is not valid JSON ({error})") from None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or "out" not in saved:
        raise CheckpointError(f"{run_dir / 'train.json'} is not the options of a `reformer train` run")
    if saved.get("tokenizer") and not Path(saved["tokenizer"]).is_absolute():
        saved["tokenizer"] = str(run_dir / saved["tokenizer"])  # stored in the run: wherever the run is now
    try:
        return TrainConfig(**{k: v for k, v in saved.items() if k in fields}), load_model_config(run_dir)
    except TypeError as error:
        raise CheckpointError(f"{run_dir / 'train.json'} is not the options of a `reformer train` run "
                              f"({error})") from None


def check_data_unchanged(run_dir: str | Path, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose data files are gone or differ from those it started with."""
    saved = json.loads((Path(run_dir) / "train.json").read_text()).get("data_files", {})
    for path, fingerprint in saved.items():
        if not Path(path).is_file():
            raise ValueError(f"the run's data file {path} is gone; put it back to resume (its sha256 is "
                             f"{fingerprint['sha256'][:16]}...)")
        if Path(path).stat().st_size != fingerprint["size"] or file_fingerprint(path) != fingerprint:
            raise ValueError(f"the run's data file {path} changed since the run started; resume with the same "
                             "data, or start a new run with a new --out")
    if cfg.task == "images" and saved:
        from .images import source_files

        now = {str(Path(p).absolute()) for source in (cfg.data, cfg.valid_data) if source is not None
               for p in source_files(source)}
        added = sorted(now - set(saved))
        if added:
            raise ValueError(f"the run's images changed since the run started: {len(added)} file(s) added, e.g. "
                             f"{added[0]}; resume with the same images, or start a new run with a new --out")


class _Run:
    """The files of a run directory; a process that is not the writer (rank > 0) reads them only."""

    def __init__(self, out: str, process: distributed.Process):
        self.dir = Path(out)
        self.process = process
        self.writer = process.is_main
        self.created = False
        if self.writer:
            existed = check_out_dir(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.created = not existed
        self.metrics = self.dir / "metrics.jsonl"

    def write_configs(self, cfg: TrainConfig, model_config: ReformerConfig) -> None:
        if not self.writer:
            return
        from .tokenizer import STORED, load_tokenizer, store_tokenizer

        options = dataclasses.asdict(cfg)
        data_files = {}
        for key in ("data", "valid_data", "tokenizer"):
            if options[key] is not None:
                if cfg.task == "images" and key != "tokenizer":
                    from .images import is_named_set

                    if not is_named_set(options[key]):  # a named set is found by its name wherever the run is
                        options[key] = str(Path(options[key]).absolute())
                    data_files.update(_image_fingerprints(options[key]))
                    continue
                options[key] = str(Path(options[key]).absolute())
                if key != "tokenizer":
                    data_files[options[key]] = file_fingerprint(options[key])
        if cfg.resume and (self.dir / "train.json").is_file():
            data_files = json.loads((self.dir / "train.json").read_text()).get("data_files", data_files)
        stored = store_tokenizer(load_tokenizer(cfg.tokenizer), self.dir)
        options["tokenizer"] = None if stored is None else stored.name  # relative to the run: it may move
        for name in STORED.values():  # a tokenizer an earlier attempt in this directory left
            if stored is None or name != stored.name:
                (self.dir / name).unlink(missing_ok=True)
        model_config.to_json(self.dir / "config.json")
        (self.dir / "train.json").write_text(json.dumps({**options, "data_files": data_files}, indent=2) + "\n")

    def remove_if_empty(self) -> None:
        """A directory this run created and left empty (it failed before writing anything) goes again."""
        if self.created and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

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


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT at `step`, with its newest checkpoint `checkpoint` (None: there is none), saved
    just now (`saved_now`) or before the interrupt."""

    def __init__(self, step: int, checkpoint: Path | None, saved_now: bool = True):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint, self.saved_now = step, checkpoint, saved_now


class _SigintToCheckpoint:
    """While training, the first SIGINT asks for a checkpoint after the running step; a second stops at once,
    except while a checkpoint is being written: then right after it.

    Only in the main thread (where Python delivers signals); elsewhere SIGINT keeps its usual meaning.
    """

    def __init__(self):
        self.requested = self.saving = self.abort = False
        self.installed, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested = True
        elif self.saving:
            self.abort = True
        else:
            raise KeyboardInterrupt

    def saved(self) -> None:
        """A checkpoint write has ended: a second SIGINT that came during it stops now."""
        self.saving = False
        if self.abort:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


def train(cfg: TrainConfig, model_config: ReformerConfig) -> list[dict]:
    """Train (or resume) a ReformerLM; returns the metrics records of the whole run.

    Under torchrun, every process calls this; each returns the same history. Raises `Interrupted` after saving
    a checkpoint when SIGINT arrives.
    """
    cfg.validate()
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}; "
                         f"lower --seq-len or raise --max-seq-len")
    process = distributed.start(cfg.device)
    try:
        with _SigintToCheckpoint() as interrupt:
            history = _train(cfg, model_config, process, interrupt)
    except BaseException:
        distributed.stop(process, wait=False)
        raise
    distributed.stop(process)
    return history


def _train(cfg: TrainConfig, model_config: ReformerConfig, process: distributed.Process,
           interrupt: _SigintToCheckpoint) -> list[dict]:
    release_freed_memory_eagerly()
    model = ReformerLM(model_config).to(process.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    sampler, eval_batches = make_samplers(cfg, model_config, process)  # bad data fails before --out is touched
    run = _Run(cfg.out, process)
    try:
        step, history = _maybe_resume(cfg, run, model, optimizer, scheduler, sampler, model_config)
        if step == 0 and cfg.init_from:
            _load_initial_weights(model, cfg.init_from, model_config)
        run.write_configs(cfg, model_config)
    except BaseException:
        run.remove_if_empty()
        raise
    if cfg.compile:
        from .compile import compile_model

        compile_model(model)
    replica = distributed.wrap(model, process, cfg.static_graph)

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and process.is_main), unit="step",
               dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    start, start_step = time.perf_counter(), step
    if _all_ranks_any(interrupt.requested, process):  # before the first step: nothing new to save
        bar.close()
        raise Interrupted(step, latest_checkpoint(run.dir) if step else None, saved_now=False)
    while step < cfg.steps:
        loss = _train_step(cfg, replica, optimizer, scheduler, sampler, process)
        step += 1
        rate = (step - start_step) * tokens_per_step / (time.perf_counter() - start)
        record = {"step": step, "split": "train", "loss": loss, "bits_per_token": loss / LN2,
                  "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate}
        run.log(record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", bits=f"{loss / LN2:.3f}", tok_s=f"{rate:,.0f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            record = {"step": step, "split": "eval",
                      **evaluate(model, eval_batches, cfg.precision, process, sampler.shift_labels)}
            if cfg.task == "images":
                record["bits_per_dim"] = record["bits_per_token"]  # a token is a sub-pixel
            run.log(record)
            history.append(record)
            if process.is_main:
                bar.write(f"step {step}: {describe_eval(record)}")
        stop = _all_ranks_any(interrupt.requested, process)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop:
            interrupt.saving = True
            if process.is_main:
                _save(run, model, optimizer, scheduler, sampler, step)
            distributed.barrier(process)  # no rank runs ahead of a checkpoint that may be resumed from
            interrupt.saved()
        if stop:
            bar.close()
            raise Interrupted(step, checkpoint_dir(run.dir) / f"step-{step:08d}")
    bar.close()
    if process.is_main:
        plot_curves(history, run.dir / "curves.png")
    return history


def describe_eval(record: dict) -> str:
    """One evaluation record in words: its loss per token, and bits per byte when the data is text."""
    if "bits_per_dim" in record:
        return f"eval loss {record['loss']:.4f} nats per sub-pixel, {record['bits_per_dim']:.4f} bits/dim"
    words = f"eval loss {record['loss']:.4f} nats per token"
    if "bits_per_byte" in record:
        return words + f", {record['bits_per_byte']:.4f} bits per byte"
    return words + f", {record['loss'] / LN2:.4f} bits per token"  # records of older runs have no bits_per_token


def _all_ranks_any(flag: bool, process: distributed.Process) -> bool:
    """Whether any rank has `flag` set (one scalar all-reduce with several processes)."""
    if process.world_size == 1:
        return flag
    (count,) = distributed.sum_over_ranks([float(flag)], process)
    return count > 0


def _train_step(cfg, model, optimizer, scheduler, sampler, process: distributed.Process | None = None) -> float:
    """One optimizer step over grad_accum micro-batches; the loss averaged over them and over all ranks."""
    process = process or distributed.Process()
    device = next(model.parameters()).device
    total = 0.0
    for micro in range(cfg.grad_accum):
        ids, labels = sampler.next_batch()
        with distributed.no_sync(model, last=micro == cfg.grad_accum - 1):
            with _autocast(cfg.precision, device):
                loss = model(to_device(ids, device), labels=to_device(labels, device),
                             shift_labels=sampler.shift_labels).loss
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

    from .checkpoint import CheckpointError

    state = load_state(latest)
    missing = [key for key in ("optimizer", "scheduler", "model_generator", "sampler", "step") if key not in state]
    if missing:
        raise CheckpointError(f"{latest / 'state.pt'} lacks {', '.join(missing)}: not a checkpoint of `reformer train`")
    if state["step"] >= cfg.steps:
        raise ValueError(f"the run is at step {state['step']} already (--steps {cfg.steps}); give --steps above "
                         f"{state['step']} to train on")
    model.load_state_dict(load_file(str(latest / "model.safetensors")))
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


class _CallableModule(types.ModuleType):
    """`reformer.train(cfg, model_config)` calls `train` (this module's main function); `reformer.train.train` too."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
