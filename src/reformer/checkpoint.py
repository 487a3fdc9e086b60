"""Training checkpoints: written atomically, verified before use, complete enough to resume bit for bit.

Layout of a run directory:

    RUN_DIR/checkpoints/step-00000100/   model.safetensors, config.json, state.pt, manifest.json
    RUN_DIR/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step-XXXXXXXX.tmp`, flushed, then renamed; only then
does `latest` (itself written to a temporary file and renamed) point at it. A
crash at any moment leaves either the previous checkpoint or the new one, never
half of one. `state.pt` holds the optimizer and scheduler states, the step, the
model's generator state and the data sampler's state; `manifest.json` the size
and sha256 of every other file.

Reading a run (`latest_checkpoint`) verifies its newest checkpoint against the
manifest (a checkpoint of an older version, without one: its safetensors header
against the file's size, and state.pt's zip structure) and falls back to the
newest intact one, with a warning that names both. A damaged checkpoint is never
deleted: pruning skips it, and a save that meets one at its own step moves it
aside as `step-XXXXXXXX.damaged` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import ReformerConfig

LATEST = "latest"
MANIFEST = "manifest.json"


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
    """Write model weights, config and training `state` for `step`; keep the newest `keep` intact checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished write
    model.save_pretrained(tmp)
    torch.save({**state, "step": step}, tmp / "state.pt")
    _write_manifest(tmp)
    for name in os.listdir(tmp):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    replaced = None
    if final.exists():  # a resumed run saves this step again: the old one goes once the new one is in place
        replaced = final.rename(final.with_name(final.name + ".old") if damage(final) is None else _aside(final))
    tmp.rename(final)
    _fsync_dir(root)
    _write_atomically(root / LATEST, final.name + "\n")
    if replaced is not None and replaced.name.endswith(".old"):
        shutil.rmtree(replaced, ignore_errors=True)
    _prune(root, final, keep)
    return final


def _aside(path: Path) -> Path:
    """A new name beside `path` for a damaged checkpoint: step-X.damaged, step-X.damaged-2, ..."""
    candidate, n = path.with_name(path.name + ".damaged"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.damaged-{n}")
    return candidate


def _write_manifest(directory: Path) -> None:
    files = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
             for name in sorted(os.listdir(directory)) if name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: dict[tuple, str | None] = {}  # (path, its files' sizes and times) -> damage: each checked once
_WARNED: set[str] = set()  # a fallback is said once (per command: `forget_fallback_warnings`)


def forget_fallback_warnings() -> None:
    """Say each fallback to an older checkpoint again (the command line calls this once per command)."""
    _WARNED.clear()


def damage(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be used (a short reason), or None when it is intact."""
    try:
        key = (str(Path(path).resolve()), tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                       for p in Path(path).iterdir() if p.is_file())))
    except OSError as error:
        return f"unreadable ({error})"
    if key not in _VERIFIED:
        _VERIFIED[key] = _damage(Path(path))
    return _VERIFIED[key]


def _damage(path: Path) -> str | None:
    try:
        manifest = path / MANIFEST
        if manifest.is_file():
            files = json.loads(manifest.read_text())["files"]
            if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
                return "manifest.json is not a manifest"
            for name, expected in files.items():
                file = path / name
                if not file.is_file():
                    return f"{name} is missing"
                if file.stat().st_size != expected["size"]:
                    return f"{name} is {file.stat().st_size:,} bytes, {expected['size']:,} when written"
                if _sha256(file) != expected["sha256"]:
                    return f"{name} does not match its sha256"
            return None
        return _structure_damage(path, with_state=True)  # written before manifests
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
        return f"unreadable ({error})"


def model_damage(path: Path) -> str | None:
    """Why the model directory `path` (config.json, model.safetensors) cannot be loaded, or None."""
    try:
        return _structure_damage(path, with_state=False)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        return f"unreadable ({error})"


def _structure_damage(path: Path, with_state: bool) -> str | None:
    for name in ("model.safetensors", "config.json", *(["state.pt"] if with_state else [])):
        if not (path / name).is_file():
            return f"{name} is missing"
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
        if header_size is None or 8 + header_size > size:
            return f"model.safetensors is {size:,} bytes, too short for its header: truncated or not safetensors"
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "model.safetensors has no valid header: not a safetensors file"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if weights.stat().st_size != 8 + header_size + end:
        return f"model.safetensors is {weights.stat().st_size:,} bytes, its header needs {8 + header_size + end:,}"
    json.loads((path / "config.json").read_text())
    if not with_state:
        return None
    try:
        with zipfile.ZipFile(path / "state.pt") as archive:
            if archive.testzip() is not None:
                return "state.pt is corrupt"
    except zipfile.BadZipFile:
        return "state.pt is truncated or corrupt"
    return None


def _prune(root: Path, saved: Path, keep: int) -> None:
    """Keep `saved` and the newest keep - 1 intact checkpoints before it; delete older intact ones. Damaged
    checkpoints, later ones and everything else stay."""
    older = sorted((p for p in root.glob("step-*") if p.is_dir() and _is_step(p.name) and p.name < saved.name),
                   reverse=True)
    intact = [p for p in older if damage(p) is None]
    for old in intact[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def _is_step(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run (at or before the one `latest` names), or None when it has none yet.

    A newer checkpoint that is damaged (a truncated file, a kill during a copy) is passed over with a warning
    that names it and the one used; CheckpointError when every checkpoint is damaged.
    """
    root = checkpoint_dir(run_dir)
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and _is_step(p.name)), reverse=True) \
        if root.is_dir() else []
    pointer = root / LATEST
    newest = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    if _is_step(newest):  # the newest the run committed to; newer ones were never pointed at
        steps = [p for p in steps if p.name <= newest]
    if not steps:
        return None
    skipped = []
    for path in steps:
        reason = damage(path)
        if reason is None:
            message = f"{'; '.join(skipped)}: using {path} (the newest intact checkpoint); the damaged files are " \
                      "left as they are"
            if skipped and message not in _WARNED:
                _WARNED.add(message)
                warnings.warn(message, UserWarning, stacklevel=2)
            return path
        skipped.append(f"{path.name} is damaged ({reason})")
    raise CheckpointError(f"{run_dir} holds no intact checkpoint: {'; '.join(skipped)}")


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
        is_checkpoint = (path / "state.pt").is_file() or (path / MANIFEST).is_file()
        reason = damage(path) if is_checkpoint else model_damage(path)
        if reason is not None:
            raise CheckpointError(f"{path} is damaged ({reason}); give its run directory to use the newest intact "
                                  "checkpoint")
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
