"""Bits per byte of a trained model on a file: the library side of `reformer eval`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .train import load_for_eval


@torch.no_grad()
def evaluate_file(checkpoint: str | Path, path: str | Path, *, seq_len: int | None = None,
                  max_windows: int | None = None, progress: bool = True) -> dict[str, float]:
    """Mean next-byte loss over contiguous windows of `path`; returns loss (nats), bpc and tokens."""
    from .data import ByteData, eval_windows

    model = load_for_eval(checkpoint)
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}; "
                         "give a smaller --seq-len")
    data = ByteData.open(path)
    windows = list(eval_windows(data, seq_len, max_windows))
    total, count = 0.0, 0
    for ids in tqdm(windows, disable=not progress, unit="window"):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] < 2:
            continue
        out = model(ids, labels=ids)
        total += out.loss.item() * out.n_tokens
        count += out.n_tokens
    if count == 0:
        raise ValueError(f"{path} is too short to score: it needs at least 2 bytes")
    loss = total / count
    return {"loss": loss, "bpc": loss / math.log(2), "tokens": count}
