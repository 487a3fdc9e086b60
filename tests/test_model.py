"""ReformerLM: padding, causality, randomness, loss, save/load, config and input checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig, ReformerLM
from tests.conftest import assert_close, random_batch, seeded, tiny_config


def logits_of(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("causal", [True, False])
def test_right_padding_does_not_change_real_logits(mode, causal):
    config = tiny_config(causal=causal)
    ids, _ = random_batch(config, batch=1, length=23)
    expected = None
    for extra in (0, 1, 6, 17):
        model = ReformerLM(config).double().train(mode == "train")
        padded = torch.cat([ids, torch.randint(0, config.vocab_size, (1, extra), generator=seeded(extra))], dim=1)
        mask = torch.arange(23 + extra)[None] < 23
        logits = logits_of(model, padded, mask)[:, :23]
        if expected is None:
            expected = logits
        assert_close(logits, expected, 1e-10, f"{extra} padding")


@pytest.mark.parametrize("kinds", [("local", "full", "local"), ("full",), ("local",)])
def test_causal_local_and_full_never_see_the_future(kinds):
    config = tiny_config(attn_layers=kinds)
    model = ReformerLM(config).double().eval()
    ids, _ = random_batch(config, batch=1, length=31)
    base = logits_of(model, ids)
    for cut in (1, 5, 17, 30):
        changed = ids.clone()
        changed[:, cut:] = (changed[:, cut:] + 1) % config.vocab_size
        assert_close(logits_of(model, changed)[:, :cut], base[:, :cut], 1e-12, f"cut {cut}")
        assert not torch.allclose(logits_of(model, changed)[:, cut:], base[:, cut:])


def test_eval_rotations_are_fixed_and_training_rotations_fresh():
    config = tiny_config(attn_layers=("lsh", "lsh"), n_buckets=8)
    model = ReformerLM(config).double()
    ids, _ = random_batch(config, batch=1, length=40)
    model.eval()
    first, second = logits_of(model, ids), logits_of(model, ids)
    assert torch.equal(first, second)
    assert torch.equal(first, logits_of(ReformerLM(config).double().eval(), ids)), "eval rotations come from the seed"
    model.train()
    train_a, train_b = logits_of(model, ids), logits_of(model, ids)
    assert not torch.allclose(train_a, train_b), "training must draw fresh rotations each step"


@pytest.mark.parametrize("causal", [False, True])
def test_pad_to_multiple_changes_nothing_without_wrap_around(causal):
    """Extra right padding is invisible to real tokens in our default layouts (it matters only with wrap)."""
    config = tiny_config(causal=causal, n_buckets=4)
    model = ReformerLM(config).double().eval()
    padded = ReformerLM(tiny_config(causal=causal, n_buckets=4, pad_to_multiple=20)).double().eval()
    padded.load_state_dict(model.state_dict())
    ids, mask = random_batch(config, length=23, pad_from=19)
    assert_close(logits_of(padded, ids, mask)[mask], logits_of(model, ids, mask)[mask], 1e-10, "logits")


def test_hash_seed_fixes_the_rotations_in_training_too():
    """HF's hash_seed: the same rotations on every call; without it, training draws fresh ones."""
    ids, _ = random_batch(tiny_config(), length=29)
    for hash_seed, same in ((5, True), (None, False)):
        model = ReformerLM(tiny_config(hash_seed=hash_seed, attn_layers=("lsh",), n_hashes=1)).train()
        losses = [model(ids, labels=ids).loss.item() for _ in range(4)]
        assert (len(set(losses)) == 1) == same, losses


def test_more_hashes_at_eval_time():
    config = tiny_config(attn_layers=("lsh",), n_hashes=1)
    model = ReformerLM(config).eval()
    ids, _ = random_batch(config)
    one = logits_of(model, ids)
    model.layers[0].attention.attention.n_hashes = 4
    four = logits_of(model, ids)
    assert four.shape == one.shape and not torch.allclose(one, four)


def test_loss_is_shifted_cross_entropy_ignoring_padding_and_minus_100():
    config = tiny_config()
    model = ReformerLM(config).double().eval()
    ids, mask = random_batch(config, length=29, pad_from=20)
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
    targets = labels[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert_close(out.loss, expected, 1e-12, "loss")
    assert out.n_tokens == int((targets != -100).sum())
    assert model(ids, attention_mask=mask, labels=labels).logits is None


def test_head_and_loss_run_in_chunks():
    config = tiny_config(loss_chunk_size=6)
    model = ReformerLM(config).train()
    widths = []
    model.head.register_forward_hook(lambda m, i, out: widths.append(out.shape[1]))
    ids, mask = random_batch(config, length=40)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert max(widths) == 6 and len(widths) == 2 * 7  # 7 chunks of the 39 predicting positions, twice


def test_axial_positions_accept_any_length_up_to_the_grid():
    config = tiny_config()
    model = ReformerLM(config).eval()
    for length in (1, 2, 33, 64):
        ids, _ = random_batch(config, batch=1, length=length)
        assert logits_of(model, ids).shape == (1, length, config.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_save_and_load_round_trip(tmp_path):
    config = tiny_config(dropout=0.1)
    model = ReformerLM(config).eval()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path).eval()
    ids, _ = random_batch(config)
    assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))
    plain = ReformerLM.from_pretrained(tmp_path, reversible=False).eval()
    assert not plain.config.reversible
    assert torch.equal(logits_of(model, ids), logits_of(plain, ids))


def test_reversible_is_only_an_execution_choice():
    reversible = ReformerLM(tiny_config(reversible=True))
    plain = ReformerLM(tiny_config(reversible=False))
    plain.load_state_dict(reversible.state_dict())
    assert reversible.state_dict().keys() == plain.state_dict().keys()


def test_config_json_round_trip(tmp_path):
    config = tiny_config(n_buckets=(2, 4), attn_layers=("lsh", "full"))
    again = ReformerConfig.from_json(config.to_json())
    assert again == config and isinstance(again.n_buckets, tuple) and isinstance(again.attn_layers, tuple)
    path = tmp_path / "c.json"
    config.to_json(path)
    assert ReformerConfig.from_json(path) == config


@pytest.mark.parametrize("fields, message", [
    (dict(attn_layers=("lsh", "dense")), "unknown kinds"),
    (dict(attn_layers=()), "attn_layers is empty"),
    (dict(n_buckets=5), "even"),
    (dict(axial_dims=(6, 9)), "sum\\(axial_dims\\)"),
    (dict(max_seq_len=100), "prod\\(axial_shape\\)"),
    (dict(axial_shape=None), "both"),
    (dict(dropout=1.5), "dropout"),
    (dict(d_model=0), "d_model"),
    (dict(ff_chunk_size=-1), "ff_chunk_size"),
    (dict(pad_to_multiple=-8), "pad_to_multiple must be an integer >= 0"),
    (dict(lsh_bucket_rule="paper"), "lsh_bucket_rule must be one of"),
    (dict(lsh_normalize="sparsemax"), "lsh_normalize must be one of"),
    (dict(ff_activation="tanh"), "ff_activation must be one of"),
    (dict(hash_seed="7"), "hash_seed must be an integer"),
    (dict(lsh_attn_dropout=1.0), "lsh_attn_dropout"),
    (dict(local_chunks_after=1), "local_chunks_after = 1 in a causal model"),
    (dict(lsh_chunks_before=-1), "lsh_chunks_before must be an integer >= 0"),
    (dict(causal=False, lsh_dedup=True, lsh_chunks_after=1), "lsh_dedup needs lsh_chunks_before=1"),
    (dict(reversible_keep_attention="yes"), "reversible_keep_attention must be True, False or 'auto'"),
    (dict(reversible_keep_attention=1), "reversible_keep_attention must be True, False or 'auto'"),
    (dict(reversible_keep_attention_mib=-1), "reversible_keep_attention_mib must be a number of MiB >= 0"),
    (dict(reversible_keep_attention_mib="64"), "reversible_keep_attention_mib must be a number of MiB >= 0"),
    (dict(reversible_keep_attention_mib=float("nan")), "reversible_keep_attention_mib must be a number of MiB"),
    (dict(reversible_keep_feed_forward="yes"), "reversible_keep_feed_forward must be True or False"),
])
def test_config_errors_say_what_to_change(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match="unknown ReformerConfig fields"):
        ReformerConfig.from_dict(json.loads(tiny_config().to_json()) | {"n_layer": 3})


def test_bad_inputs_are_explained():
    config = tiny_config()
    model = ReformerLM(config)
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.tensor([[1, 2, 37]]))
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 99]]))


def test_init_does_not_touch_the_global_rng():
    state = torch.get_rng_state()
    a, b = ReformerLM(tiny_config()), ReformerLM(tiny_config())
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = ReformerLM(tiny_config(seed=3))
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.slow
def test_two_layer_lsh_model_overfits_one_batch_of_repetitive_text():
    text = (b"The quick brown fox jumps over the lazy dog. " * 30)[:1024]
    ids = torch.tensor(list(text))[None]
    config = ReformerConfig(
        vocab_size=256, d_model=64, n_heads=2, d_head=32, d_ff=128, attn_layers=("lsh", "lsh"),
        lsh_chunk_size=32, n_hashes=2, axial_shape=(32, 32), axial_dims=(16, 48), max_seq_len=1024, seed=0,
    )
    model = ReformerLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.1:
            break
    assert min(losses) < 0.1, f"loss after {len(losses)} steps: {losses[-1]:.3f}"
