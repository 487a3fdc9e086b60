"""Image completion, as the Reformer blog shows it: keep the top rows of an image, sample the rest pixel by pixel.

Legend: N given images, S samples of each, b = N * S rows sampled together, H, W, C the model's image shape,
n = H * W * C sub-pixels, m = keep_rows * W * C of them given.

The model reads START and the given sub-pixels in one ordinary forward pass (`decoding.prefill`), whose last
logits predict sub-pixel m; each sampled sub-pixel is then fed to the cached decoder (`decoding.decode_step`),
one position at a time, until all n are there. The given rows are copied into the result, never sampled, so
they are exactly the given image's. `use_cache=False` runs the whole model over the prefix for every sub-pixel
instead (the slow reference the benchmark compares against).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decoding import decode_step, prefill, start_decoding
from .generate import sample_next
from .images import START, images_to_tokens, shift_right, tokens_to_images


@dataclass
class Completion:
    samples: np.ndarray  # (N, S, H, W, C) uint8; N = 1 when nothing was given
    sampled_tokens: int  # sub-pixels sampled, over all rows
    seconds: float  # time spent sampling them

    @property
    def tokens_per_s(self) -> float:
        return self.sampled_tokens / max(self.seconds, 1e-9)


@torch.no_grad()
def complete_images(model, given: np.ndarray | None, *, keep_rows: int, samples: int, temperature: float = 1.0,
                    seed: int = 0, use_cache: bool = True) -> Completion:
    """Complete the images `given` (N, H, W, C) uint8 below their first `keep_rows` rows, `samples` times each.

    keep_rows 0 samples unconditionally (then `given` may be None: one set of `samples` images). The same seed
    gives the same samples.
    """
    shape = _image_shape(model)
    height, width, channels = shape
    if not isinstance(keep_rows, int) or not 0 <= keep_rows <= height:
        raise ValueError(f"--keep-rows must be a whole number in [0, {height}] (the model's images have {height} "
                         f"rows), got {keep_rows!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be a whole number >= 1, got {samples!r}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = the most likely value), got {temperature}")
    if given is None:
        if keep_rows:
            raise ValueError("--keep-rows above 0 keeps rows of a given image: give --image")
        given = np.zeros((1, *shape), np.uint8)
    if tuple(given.shape[1:]) != shape:
        raise ValueError(f"the given images are {given.shape[1:]}, the model's {shape}")
    n, m = math.prod(shape), keep_rows * width * channels
    device = next(model.parameters()).device
    tokens = images_to_tokens(given).repeat_interleave(samples, dim=0).to(device)  # (b, n): each image S times
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    try:
        sample = _sample_cached if use_cache else _sample_uncached
        tokens = sample(model, tokens, m, n, temperature, generator)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    images = tokens_to_images(tokens, shape).reshape(len(given), samples, *shape)  # (N, S, H, W, C)
    return Completion(images, (n - m) * tokens.shape[0], seconds)


def _sample_cached(model, tokens: torch.Tensor, m: int, n: int, temperature: float, generator) -> torch.Tensor:
    """Sub-pixels m..n-1 of tokens (b, n), sampled with the cached decoder; the first m stay."""
    tokens = tokens.clone()
    state = start_decoding(model, n)
    logits = prefill(model, shift_right(tokens)[:, :m + 1], state)  # (b, vocab): predicts sub-pixel m
    for position in range(m, n):
        tokens[:, position] = _draw(logits, temperature, generator)
        if position + 1 < n:
            logits = decode_step(model, tokens[:, position], state)
    return tokens


def _sample_uncached(model, tokens: torch.Tensor, m: int, n: int, temperature: float, generator) -> torch.Tensor:
    """The same, running the whole model over the prefix for every sub-pixel."""
    tokens = tokens.clone()
    for position in range(m, n):
        inputs = shift_right(tokens)[:, :position + 1]  # (b, position + 1)
        tokens[:, position] = _draw(model(inputs).logits[:, -1], temperature, generator)
    return tokens


def _draw(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """A sub-pixel value per row of logits (b, vocab), among the 256 values only."""
    return sample_next(logits[:, :256], temperature=temperature, top_k=None, top_p=None, generator=generator)


def _image_shape(model) -> tuple[int, int, int]:
    shape = model.config.image_shape
    if shape is None:
        raise ValueError("this model was not trained on images (its config has no image_shape); give the run of a "
                         "`reformer train --task images`")
    return tuple(shape)


# --- pictures -------------------------------------------------------------------------


def to_pil(image: np.ndarray):
    """(H, W, C) uint8 -> a Pillow image (mode L for one channel, RGB for three)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("writing PNGs needs Pillow: pip install 'reformer[images]' (or pip install Pillow)") from None

    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, "L" if image.shape[2] == 1 else "RGB")


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write (H, W, C) uint8 as a PNG, atomically (a temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def completion_grid(completion: Completion, given: np.ndarray | None, keep_rows: int, *,
                    cell: int = 96, gap: int = 4) -> np.ndarray:
    """The blog's figure as one (rows, columns, 3) uint8 array: a row per given image, holding the fragment (the
    kept rows, the rest gray), the samples, and the original; unconditional samples fill one row.

    Each image is enlarged by a whole factor (nearest neighbour) to about `cell` pixels; white gaps between.
    """
    samples = completion.samples  # (N, S, H, W, C)
    height, width = samples.shape[2:4]
    rows = []
    for i in range(samples.shape[0]):
        row = list(samples[i])
        if given is not None:
            fragment = given[i].copy()
            fragment[keep_rows:] = 128  # what the model did not see: gray
            row = [fragment, *row, given[i]]
        rows.append(row)
    scale = max(1, round(cell / max(height, width)))
    big_h, big_w = height * scale, width * scale
    columns = max(len(r) for r in rows)
    grid = np.full((gap + len(rows) * (big_h + gap), gap + columns * (big_w + gap), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image  # (H, W, 3)
            big = rgb.repeat(scale, axis=0).repeat(scale, axis=1)  # (H * scale, W * scale, 3)
            top, left = gap + r * (big_h + gap), gap + c * (big_w + gap)
            grid[top:top + big_h, left:left + big_w] = big
    return grid


__all__ = ["START", "Completion", "complete_images", "completion_grid", "save_png", "to_pil"]
