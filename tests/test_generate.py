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
    greedy = list(generate(model, prompt, 8, temperature=0.0, use_cache=False))  # LSH layers: the cache approximates
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
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        list(generate(model, torch.tensor([1] * 60), 10))
    with pytest.raises(ValueError, match="more than max_seq_len"):
        from reformer.decoding import prefill, start_decoding

        prefill(model, torch.ones(1, 65, dtype=torch.long), start_decoding(model, 65))


@pytest.mark.parametrize("kinds, before", [(("local", "full", "local"), 1), (("local",), 1), (("full",), 1),
                                           (("local",), 0), (("local", "local"), 2)])
def test_cache_gives_exactly_the_uncached_logits_for_local_and_full(kinds, before):
    from reformer.decoding import decode_step, start_decoding

    config = tiny_config(attn_layers=kinds, local_chunk_size=4, local_chunks_before=before)
    model = ReformerLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits[0]  # (23, vocab)
    state = start_decoding(model, 23)
    for position in range(23):
        step = decode_step(model, ids[:, position], state)[0]
        torch.testing.assert_close(step, full[position], rtol=0, atol=1e-10)


def test_cached_and_uncached_generation_agree_for_local_models():
    model = ReformerLM(tiny_config(attn_layers=("local", "full"))).eval()
    prompt = torch.tensor([3, 1, 4, 1, 5])
    cached = list(generate(model, prompt, 20, temperature=0.0, use_cache=True))
    uncached = list(generate(model, prompt, 20, temperature=0.0, use_cache=False))
    assert cached == uncached


def test_lsh_cache_decodes_with_fixed_rotations():
    model = ReformerLM(tiny_config(attn_layers=("lsh", "local"), n_hashes=2)).eval()
    prompt = torch.tensor([3, 1, 4, 1, 5])
    a = list(generate(model, prompt, 30, seed=1))
    b = list(generate(model, prompt, 30, seed=1))
    assert a == b and len(a) == 30


def test_prefill_then_steps_equal_the_uncached_logits():
    from reformer.decoding import decode_step, prefill, start_decoding

    config = tiny_config(attn_layers=("local", "full"), local_chunk_size=4)
    model = ReformerLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits[0]
    state = start_decoding(model, 30)
    torch.testing.assert_close(prefill(model, ids[:, :11], state)[0], full[10], rtol=0, atol=1e-10)
    for position in range(11, 30):
        torch.testing.assert_close(decode_step(model, ids[:, position], state)[0], full[position], rtol=0, atol=1e-10)


def test_lsh_step_equals_the_masked_dense_formulation():
    """The gathered LSH decode step against the plain one: all cached keys, masked to the same visible set."""
    import reformer.decoding as decoding
    from reformer.attention.chunking import mask_values

    def dense_lsh_step(core, x, cache, position, n_buckets):
        qk = decoding.split_heads(core.qk(x), core.n_heads)
        v = decoding.split_heads(core.v(x), core.n_heads)
        buckets = decoding.hash_vectors(qk, core.rotations(n_buckets, None), n_buckets)
        cache.buckets = buckets if cache.buckets is None else torch.cat([cache.buckets, buckets], dim=-1)
        decoding._append(cache, decoding.normalize_keys(qk), v, position, keep=None)
        shares = (cache.buckets == buckets).any(dim=2)
        shares[..., -1] = False
        visible = shares & (shares.flip(-1).cumsum(-1).flip(-1) <= core.n_hashes * 2 * core.chunk_size)
        self_value, masked_value = mask_values(qk.dtype)
        logits = (qk @ cache.keys.transpose(-1, -2)).masked_fill(~visible[:, :, None, :], masked_value)
        logits[..., -1] = self_value
        return torch.softmax(logits, dim=-1) @ cache.values

    config = tiny_config(attn_layers=("lsh", "lsh"), n_hashes=2, lsh_chunk_size=2, n_buckets=4)
    model = ReformerLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for step_fn in (decoding._lsh_step, dense_lsh_step):
        original = decoding._lsh_step
        decoding._lsh_step = step_fn
        try:
            state = decoding.start_decoding(model, 40)
            logits = [decoding.prefill(model, ids[:, :5], state)]
            logits += [decoding.decode_step(model, ids[:, p], state) for p in range(5, 40)]
        finally:
            decoding._lsh_step = original
        results.append(torch.stack(logits))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)
