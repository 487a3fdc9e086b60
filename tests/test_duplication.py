"""The duplication task: structure, labels on the second copy only, seeds, samplers, accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reformer import ReformerLM
from reformer.duplication import DuplicationSampler, duplication_accuracy, duplication_batch
from tests.conftest import seeded, tiny_config


class Oracle(nn.Module):
    """Cheats: its logits at position t put the maximum on ids[:, t + 1]."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 1.0)
        return SimpleNamespace(logits=logits)


class Guesser(nn.Module):
    """Guesses a uniformly random symbol in 1..vocab-1 at every position."""

    def __init__(self, vocab_size: int, seed: int):
        super().__init__()
        self.vocab_size, self.generator = vocab_size, seeded(seed)

    def forward(self, ids):
        logits = torch.rand(*ids.shape, self.vocab_size, generator=self.generator)
        logits[..., 0] = -1.0  # never the separator
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("length, vocab", [(4, 3), (16, 5), (1024, 128)])
def test_structure_is_0_w_0_w(length, vocab):
    ids, labels = duplication_batch(3, length, vocab, seeded(0))
    half = length // 2
    assert ids.shape == labels.shape == (3, length) and ids.dtype == labels.dtype == torch.int64
    assert bool((ids[:, 0] == 0).all()) and bool((ids[:, half] == 0).all())
    first, second = ids[:, 1:half], ids[:, half + 1:]
    assert first.shape[1] == half - 1 and torch.equal(first, second)
    assert int(first.min()) >= 1 and int(first.max()) <= vocab - 1


def test_labels_only_on_the_second_copy():
    ids, labels = duplication_batch(4, 20, 7, seeded(1))
    assert bool((labels[:, :11] == -100).all())
    assert torch.equal(labels[:, 11:], ids[:, 11:])


def test_the_model_loss_counts_exactly_the_second_copy():
    config = tiny_config(vocab_size=9)
    ids, labels = duplication_batch(2, 32, 9, seeded(2))
    out = ReformerLM(config).eval()(ids, labels=labels)
    assert out.n_tokens == 2 * 15, "|w| = 15 scored positions per example"


def test_same_seed_same_examples():
    a = duplication_batch(4, 64, 128, seeded(5))
    b = duplication_batch(4, 64, 128, seeded(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], duplication_batch(4, 64, 128, seeded(6))[0])


@pytest.mark.parametrize("args, message", [((2, 7, 10), "even"), ((2, 2, 10), ">= 4"), ((2, 8, 2), "vocab_size"),
                                           ((0, 8, 10), "batch_size")])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        duplication_batch(*args, seeded(0))


# --- sampler --------------------------------------------------------------


def test_sampler_matches_duplication_batch_and_resumes():
    sampler = DuplicationSampler(3, 16, 11, seeded(4))
    got, want = sampler.next_batch(), duplication_batch(3, 16, 11, seeded(4))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    state = sampler.state_dict()
    expected = [sampler()[0] for _ in range(3)]
    resumed = DuplicationSampler(3, 16, 11, seeded(123))
    resumed.load_state_dict(state)
    for want_ids in expected:
        assert torch.equal(next(resumed)[0], want_ids)


def test_sampler_rank_shards_are_slices_of_the_global_batch():
    whole = DuplicationSampler(4, 12, 9, seeded(8))
    ranks = [DuplicationSampler(2, 12, 9, seeded(8), rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        ids, labels = whole.next_batch()
        shards = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([s[0] for s in shards]), ids)
        assert torch.equal(torch.cat([s[1] for s in shards]), labels)


# --- accuracy -------------------------------------------------------------


def test_oracle_accuracy_is_one():
    ids, labels = duplication_batch(4, 64, 16, seeded(0))
    assert duplication_accuracy(Oracle(16), ids, labels) == 1.0


def test_random_guessing_scores_about_one_over_n():
    vocab = 5
    ids, labels = duplication_batch(64, 202, vocab, seeded(1))
    accuracy = duplication_accuracy(Guesser(vocab, seed=2), ids, labels)
    assert abs(accuracy - 1 / (vocab - 1)) < 0.03, accuracy


def test_accuracy_keeps_the_mode_and_takes_no_gradients():
    model = ReformerLM(tiny_config(vocab_size=9)).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    ids, labels = duplication_batch(2, 32, 9, seeded(3))
    accuracy = duplication_accuracy(model, ids, labels)
    assert 0.0 <= accuracy <= 1.0 and model.training and calls == [False]
