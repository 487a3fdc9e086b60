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
    """The model's loss on the text of `path`, with the tokenizer stored with it (bytes when none).

    Windows of seq_len tokens (default: the model's max_seq_len), each starting at the last token of the one
    before, predict every token but the first once. Returns loss (nats per token), bits_per_token,
    bits_per_byte (total nats / ln 2 / the bytes of text those tokens stand for: comparable across
    tokenizers), tokens and bytes.
    """
    from .checkpoint import resolve_checkpoint
    from .data import eval_window_starts, open_tokens
    from .tokenizer import find_tokenizer

    source = resolve_checkpoint(checkpoint)
    model = load_for_eval(source)
    tokenizer = find_tokenizer(source)
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"--max-windows must be a whole number >= 1 (or left out: all windows), got {max_windows!r}")
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len or seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} must be in [2, the model's max_seq_len {model.config.max_seq_len}]")
    data = open_tokens(path, tokenizer)
    if len(data) < 2:
        raise ValueError(f"{path} is too short to score: it needs at least 2 tokens")
    total, count, n_bytes = 0.0, 0, 0
    for start in tqdm(eval_window_starts(len(data), seq_len, max_windows), disable=not progress, unit="window"):
        length = min(seq_len, len(data) - start)
        ids = data.windows([start], length)  # (1, length)
        out = model(ids, labels=ids)
        total += out.loss.item() * out.n_tokens
        count += out.n_tokens
        n_bytes += data.byte_counts([start], length)
    return {"loss": total / count, "bits_per_token": total / count / math.log(2),
            "bits_per_byte": total / max(n_bytes, 1) / math.log(2), "tokens": count, "bytes": n_bytes}


@torch.no_grad()
def evaluate_images(checkpoint: str | Path, source: str, *, max_images: int | None = None, batch_size: int = 8,
                    image_size: tuple[int, int] | None = None, progress: bool = True) -> dict[str, float]:
    """Bits/dim of an image model on the images of `source` (a named set's test split): nats per sub-pixel over
    every sub-pixel of every image (the first too, predicted from START), / ln 2. Returns loss (nats per
    sub-pixel), bits_per_dim, images and sub-pixels.
    """
    from .checkpoint import resolve_checkpoint
    from .images import ImageError, images_to_tokens, load_images, shift_right

    model = load_for_eval(resolve_checkpoint(checkpoint))
    shape = model.config.image_shape
    if shape is None:
        raise ValueError(f"{checkpoint} is not an image model (no image_shape in its config); score text with "
                         "--data FILE, or give the run of a `reformer train --task images`")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"--max-images must be a whole number >= 1, got {max_images!r}")
    images = load_images(source, split="test", image_size=image_size, channels=shape[2])
    if images.shape != tuple(shape):
        raise ImageError(f"the images of {source} are {images.shape[0]}x{images.shape[1]} pixels but the model's "
                         f"are {shape[0]}x{shape[1]}; give --image-size {shape[0]}x{shape[1]} to resize them")
    count = len(images) if max_images is None else min(max_images, len(images))
    total = 0.0
    for start in tqdm(range(0, count, batch_size), disable=not progress, unit="batch"):
        tokens = images_to_tokens(images.array[start:min(start + batch_size, count)])  # (b, n)
        out = model(shift_right(tokens), labels=tokens, shift_labels=False)
        total += out.loss.item() * out.n_tokens
    dims = count * math.prod(shape)
    return {"loss": total / dims, "bits_per_dim": total / dims / math.log(2), "images": count, "sub_pixels": dims}


TABLE2_COLUMNS = ("Full", "LSH-8", "LSH-4", "LSH-2", "LSH-1")
PAPER_TABLE2 = {  # Reformer paper, Table 2: accuracy (%) on the second copy; rows = training attention
    "Full Attention": (100.0, 94.8, 92.5, 76.9, 52.5),
    "LSH-4": (0.8, 100.0, 99.9, 99.4, 91.9),
    "LSH-2": (0.8, 100.0, 99.9, 98.1, 86.8),
    "LSH-1": (0.8, 99.9, 99.6, 94.8, 77.9),
}


@torch.no_grad()
def duplication_table(model, *, length: int, n_examples: int = 32, seed: int = 1234,
                      batch_size: int = 32) -> dict[str, float]:
    """Accuracy (%) on the second copy, evaluated with full attention and with LSH at 8, 4, 2 and 1 hashes.

    The held-out set is `duplication_batch` drawn from `seed`, `batch_size` sequences at a time.
    """
    from .duplication import duplication_accuracy, duplication_batch

    gen = torch.Generator().manual_seed(seed)
    batches = [duplication_batch(min(batch_size, n_examples - i), length, model.config.vocab_size, gen)
               for i in range(0, n_examples, batch_size)]
    original = model.config.n_hashes
    results = {}
    try:
        for column in TABLE2_COLUMNS:
            full = column == "Full"
            model.set_lsh_eval(n_hashes=None if full else int(column.split("-")[1]), full_attention=full)
            accuracies = [duplication_accuracy(model, ids, labels) * len(ids) for ids, labels in batches]
            results[column] = 100.0 * sum(accuracies) / n_examples
    finally:
        model.set_lsh_eval(n_hashes=original, full_attention=False)
    return results


def format_table2(rows: dict[str, dict[str, float] | tuple]) -> str:
    """Markdown in the paper's Table 2 layout: one row per training setting."""
    lines = ["| Train \\ Eval | " + " | ".join(TABLE2_COLUMNS) + " |", "|---|" + "---:|" * len(TABLE2_COLUMNS)]
    for name, values in rows.items():
        cells = values.values() if isinstance(values, dict) else values
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}%" for v in cells) + " |")
    return "\n".join(lines)
