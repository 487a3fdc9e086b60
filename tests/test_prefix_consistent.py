"""Prefix-consistent causal LSH in a model: no logit depends on the future; cached decoding = a full pass."""

from __future__ import annotations

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.decoding import decode_step, prefill, start_decoding
from tests.conftest import assert_close, random_batch, tiny_config


def mixed_config(**overrides) -> ReformerConfig:
    """Prefix-consistent LSH layers beside local ones, 3 rounds, a window of 5 keys per round."""
    fields = dict(attn_layers=("lsh", "local", "lsh"), lsh_prefix_consistent=True, n_hashes=3, lsh_chunk_size=4,
                  lsh_causal_window=5)
    fields.update(overrides)
    return tiny_config(**fields)


def later_tokens_changed(ids: torch.Tensor, t: int, vocab: int, seed: int) -> torch.Tensor:
    changed = ids.clone()
    gen = torch.Generator().manual_seed(seed)
    changed[:, t + 1:] = torch.randint(0, vocab, changed[:, t + 1:].shape, generator=gen)
    return changed


@pytest.mark.parametrize("dedup", [False, True])
def test_logits_up_to_t_are_bit_identical_whatever_follows(dedup):
    config = mixed_config(lsh_dedup=dedup)
    model = ReformerLM(config).double().eval()
    ids, _ = random_batch(config, batch=2, length=50)
    logits = model(ids).logits
    for t in (0, 7, 23, 48):
        changed = model(later_tokens_changed(ids, t, config.vocab_size, t)).logits
        assert torch.equal(changed[:, :t + 1], logits[:, :t + 1]), t


def test_standard_causal_lsh_is_not_prefix_consistent():
    """The control: the same model with standard LSH changes earlier logits when later tokens change."""
    config = mixed_config(lsh_prefix_consistent=False)
    model = ReformerLM(config).double().eval()
    ids, _ = random_batch(config, batch=2, length=50)
    logits = model(ids).logits
    changed = model(later_tokens_changed(ids, 23, config.vocab_size, 1)).logits
    assert not torch.equal(changed[:, :24], logits[:, :24])


@pytest.mark.parametrize("dedup", [False, True])
def test_cached_decoding_gives_the_full_forward_logits(dedup):
    config = mixed_config(lsh_dedup=dedup)
    model = ReformerLM(config).double().eval()
    ids, _ = random_batch(config, batch=1, length=50)
    full = model(ids).logits[0]  # (50, vocab)
    state = start_decoding(model, 50)
    assert_close(prefill(model, ids[:, :9], state)[0], full[8], 1e-10, "prefill")
    for position in range(9, 50):
        assert_close(decode_step(model, ids[:, position], state)[0], full[position], 1e-10, f"step {position}")


def test_200_generated_tokens_equal_uncached_recomputation():
    """float32: every cached step's logits equal a full forward pass over the same prefix, to 1e-6."""
    config = mixed_config(max_seq_len=256, axial_shape=(16, 16), lsh_chunk_size=8, lsh_causal_window=0)
    model = ReformerLM(config).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    state = start_decoding(model, prompt.shape[1] + 200)
    ids, logits = prompt, prefill(model, prompt, state)
    worst = 0.0
    with torch.no_grad():
        for step in range(200):
            recomputed = model(ids).logits[0, -1]
            worst = max(worst, (logits[0] - recomputed).abs().max().item())
            next_id = torch.multinomial(torch.softmax(logits[0].double(), -1), 1,
                                        generator=torch.Generator().manual_seed(step))
            ids = torch.cat([ids, next_id[None]], dim=1)
            if step < 199:
                logits = decode_step(model, next_id, state)
    print(f"largest logit difference over 200 tokens: {worst:.2e}")
    assert worst <= 1e-6, worst


def test_reversible_equals_plain_with_dropout():
    config = mixed_config(dropout=0.1, attn_dropout=0.1)
    reversible = ReformerLM(config).double()
    plain = ReformerLM(ReformerConfig.from_dict({**config.to_dict(), "reversible": False})).double()
    plain.load_state_dict(reversible.state_dict())
    ids, mask = random_batch(config, length=29, pad_from=20)
    results = []
    for model in (reversible, plain):
        model.train()
        model.manual_seed(5)
        loss = model(ids, mask, labels=ids).loss
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    assert_close(results[0][0], results[1][0], 1e-12, "loss")
    for (name, _), g, pg in zip(reversible.named_parameters(), results[0][1], results[1][1]):
        assert_close(g, pg, 1e-10, name)


def test_bucket_count_does_not_depend_on_the_length():
    model = ReformerLM(mixed_config())
    core = model.layers[0].attention.attention
    assert core.resolve_n_buckets(12, None) == core.resolve_n_buckets(60, None)


def test_bad_configs_are_explained():
    with pytest.raises(ValueError, match="set causal=True"):
        mixed_config(causal=False)
    with pytest.raises(ValueError, match="set lsh_wrap=False"):
        mixed_config(lsh_wrap=True)
    with pytest.raises(ValueError, match="lsh_causal_window must be an integer >= 0"):
        mixed_config(lsh_causal_window=-1)
