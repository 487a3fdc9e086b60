"""Sampling: temperature, top-k and top-p (nucleus), reproducible from a seed.

`generate(model, prompt_ids, ...)` yields one token id at a time, so callers can
stream text as it is produced. With `use_cache=True` (the default) each token
costs one incremental step (`reformer.decoding`); with `use_cache=False` every
step runs the model over the last `max_seq_len` tokens.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import torch

from .decoding import decode_step, prefill, start_decoding


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p.

    logits (..., vocab) -> (..., vocab). The most likely token always survives.
    """
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits (b, vocab); temperature 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int = 100, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             use_cache: bool = True) -> Iterator[int]:
    """Yield `max_new_tokens` sampled token ids continuing `prompt_ids` (1-D or (1, n))."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    ids = prompt_ids.reshape(1, -1).to(next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token")
    vocab = model.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"the prompt has token ids outside the model's vocabulary [0, {vocab})")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    window = model.config.max_seq_len
    if use_cache and ids.shape[1] + max_new_tokens > window:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                         f"{window}; shorten them, or pass use_cache=False to slide a window")
    try:
        if use_cache:
            state = start_decoding(model, ids.shape[1] + max_new_tokens)
            logits = prefill(model, ids, state)  # (1, vocab)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = model(ids[:, -window:]).logits[:, -1]  # (1, vocab)
            next_id = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            yield int(next_id)
            if use_cache and step + 1 < max_new_tokens:
                logits = decode_step(model, next_id, state)
    finally:
        model.train(was_training)


class _CallableModule(types.ModuleType):
    """`reformer.generate(...)` calls `generate` (this module's main function); `reformer.generate.generate` too."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
