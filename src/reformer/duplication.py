"""The synthetic duplication task of the Reformer paper (section 2.1, Table 2).

An example is `0 w 0 w`: a random word w of symbols in 1..N (N = vocab_size - 1)
written twice, each copy after a 0. The paper uses N = 127 (vocab 128) and
|w| = 511, so length 1024. Only the second copy is scored: it can be predicted
exactly by attending to the first copy, so a model that learns to look back
reaches accuracy 1.0, while one that cannot stays near 1/N.

    positions   0 | 1 .. n/2-1 | n/2 | n/2+1 .. n-1
    ids         0 |     w      |  0  |      w
    labels   -100 |   -100     | -100|      w          (model predicts labels[:, 1:] from logits[:, :-1])

Examples are generated on the fly from a `torch.Generator`; the same seed gives
the same examples. `DuplicationSampler` has the sampler interface described in
`reformer.data` (next_batch() -> (ids, labels), state_dict / load_state_dict,
rank shards of one global batch).
"""

from __future__ import annotations

import torch
from torch import nn

from .data import ShardedSampler
from .model import IGNORE_INDEX  # labels the model's loss skips


def duplication_batch(
    batch_size: int, length: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (batch_size, length) int64 on the generator's device; see the module docstring."""
    check_duplication_args(batch_size, length, vocab_size)
    words = draw_words(batch_size, length, vocab_size, generator)  # (b, length // 2 - 1)
    return build_examples(words)


def check_duplication_args(batch_size: int, length: int, vocab_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("length", length), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if length < 4 or length % 2:
        raise ValueError(f"length must be even and >= 4 (0 w 0 w with |w| = length/2 - 1 >= 1), got {length}; "
                         "the paper uses 1024")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (symbol 0 plus at least two word symbols), got {vocab_size}; "
                         "the paper uses 128")


def draw_words(rows: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random words, (rows, length // 2 - 1) int64 with symbols in [1, vocab_size)."""
    shape = (rows, length // 2 - 1)
    return torch.randint(1, vocab_size, shape, generator=generator, device=generator.device)


def build_examples(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`0 w 0 w` for each word (b, m) -> ids (b, 2m + 2); labels keep only the second copy of w."""
    zero = words.new_zeros(words.shape[0], 1)
    ids = torch.cat([zero, words, zero, words], dim=1)  # (b, n)
    second = words.shape[1] + 2  # n/2 + 1: first position of the second copy
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, second:] = ids[:, second:]
    return ids, labels


@torch.no_grad()
def duplication_accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Greedy next-token accuracy on the labelled positions: argmax logits[:, :-1] vs labels[:, 1:].

    Runs without gradients in the model's current mode (call model.eval() first
    for deterministic LSH rotations and no dropout).
    """
    if ids.shape != labels.shape or ids.dim() != 2:
        raise ValueError(f"ids and labels must be (batch, length) of one shape, got {tuple(ids.shape)} "
                         f"and {tuple(labels.shape)}")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if not bool(scored.any()):
        raise ValueError("labels has no position other than -100; use the labels from duplication_batch")
    predictions = model(ids).logits[:, :-1].argmax(dim=-1)  # (b, n - 1)
    return (predictions[scored] == targets[scored]).double().mean().item()


class DuplicationSampler(ShardedSampler):
    """Duplication examples with the sampler interface of `reformer.data`: next_batch() -> (ids, labels).

    With world_size 1, its batches equal `duplication_batch` on the same generator.
    """

    def __init__(
        self,
        batch_size: int,
        length: int,
        vocab_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(batch_size, generator, rank, world_size)
        check_duplication_args(batch_size, length, vocab_size)
        self.length = length
        self.seq_len = length  # the same name as WindowSampler's
        self.vocab_size = vocab_size

    def _draw_plan(self, rows: int) -> torch.Tensor:
        return draw_words(rows, self.length, self.vocab_size, self.generator)  # (rows, length // 2 - 1)

    def _build(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return build_examples(plan)
