"""Training checkpoints: written atomically, complete enough to resume bit for bit.

Layout of a run directory:

    RUN_DIR/checkpoints/step-00000100/   model.safetensors, config.json, state.pt
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step-XXXXXXXX.tmp`, flushed, then renamed; only then
does `latest` (itself written to a temporary file and renamed) point at it. A
crash at any moment leaves either the previous checkpoint or the new one, never
half of one. `state.pt` holds the optimizer and scheduler states, the step, the
model's generator state and the data sampler's state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ReformerConfig

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, model, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write model weights, config and training `state` for `step`; keep the newest `keep` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({**state, "step": step}, tmp / "state.pt")
    for name in os.listdir(tmp):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(root)
    _write_atomically(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def load_model_config(path: str | Path) -> ReformerConfig:
    """The model config of a checkpoint or run directory (RUN_DIR/config.json or CKPT/config.json)."""
    path = Path(path)
    for candidate in (path / "config.json", *(p / "config.json" for p in [latest_checkpoint(path)] if p)):
        if candidate.is_file():
            return ReformerConfig.from_saved(json.loads(candidate.read_text()))
    raise CheckpointError(f"no config.json in {path}; give a run directory written by `reformer train`")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory, checked to be complete."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run directory written by `reformer train --out`")
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint; train with `--save-every` or let the run finish")
    return latest


def check_compatible(saved: ReformerConfig, wanted: ReformerConfig, fine_tune: bool = False) -> None:
    """The weights of `saved` must fit `wanted`: the same fields except execution choices.

    fine_tune (`--init-from`, a new run from these weights): the rule of global tokens may change too (the
    same weights, computed with Longformer's rule); a resumed run keeps the rule it was trained with.
    """
    free = {"reversible", "reversible_keep_attention", "reversible_keep_attention_mib", "reversible_keep_feed_forward",
            "ff_chunk_size", "loss_chunk_size", "n_hashes", "dropout", "attn_dropout", "lsh_attn_dropout"}
    if fine_tune:
        free.add("sliding_global_rule")
    differ = [
        f"{name}: checkpoint {getattr(saved, name)!r} vs requested {getattr(wanted, name)!r}"
        for name in saved.to_dict()
        if name not in free and getattr(saved, name) != getattr(wanted, name)
    ]
    if saved.sliding_global_rule != wanted.sliding_global_rule and not fine_tune:
        differ.append(f"add --sliding-global-rule {saved.sliding_global_rule} to continue as it was trained")
    if differ:
        raise CheckpointError("the checkpoint's model config differs (" + "; ".join(differ) +
                              "); drop the conflicting flags, or start a new run with a new --out")
