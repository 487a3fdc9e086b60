"""Sampling: filters, reproducibility, streaming."""

from __future__ import annotations

import pytest
import torch

from reformer import ReformerLM
from reformer.generate import filter_logits, generate
from tests.conftest import tiny_config


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8)).tolist() == [[False, True, False, True]]


def test_same_seed_same_sample_and_greedy_is_deterministic():
    model = ReformerLM(tiny_config())
    prompt = torch.tensor([1, 2, 3])
    a = list(generate(model, prompt, 12, seed=5, top_k=10))
    b = list(generate(model, prompt, 12, seed=5, top_k=10))
    c = list(generate(model, prompt, 12, seed=6, top_k=10))
    assert a == b and a != c and all(0 <= t < model.config.vocab_size for t in a)
    greedy = list(generate(model, prompt, 8, temperature=0.0))
    ids = prompt[None]
    for token in greedy:
        assert token == int(model.eval()(ids).logits[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_bad_prompts_and_arguments():
    model = ReformerLM(tiny_config())
    with pytest.raises(ValueError, match="vocabulary"):
        list(generate(model, torch.tensor([99]), 2))
    with pytest.raises(ValueError, match="empty"):
        list(generate(model, torch.tensor([], dtype=torch.long), 2))
    with pytest.raises(ValueError, match="temperature"):
        list(generate(model, torch.tensor([1]), 2, temperature=-1))
