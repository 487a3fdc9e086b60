"""The "sliding" (Longformer) layer inside ReformerLM: reversible, padding, global tokens, decoding, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.decoding import decode_step, prefill, start_decoding
from tests.conftest import assert_close, random_batch, tiny_config

NOVEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "crime-and-punishment-2554.txt"


def sliding_config(**overrides) -> ReformerConfig:
    fields = dict(attn_layers=("sliding", "lsh", "sliding", "local"), sliding_window=(3, 1, 2, 1),
                  sliding_dilation=((1, 2), 1, 2, 1))
    fields.update(overrides)
    return tiny_config(**fields)


def batch_with_globals(config, length=29):
    ids, mask = random_batch(config, length=length, pad_from=20)
    glob = torch.zeros_like(mask)
    glob[:, 0] = True
    glob[1, 10] = glob[1, 25] = True  # 25 is padding: never global
    return ids, mask, glob


def gradients(model, ids, mask, glob, seed=3):
    model.train()
    model.manual_seed(seed)
    loss = model(ids, mask, labels=ids, global_mask=glob).loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_globals", [False, True])
@pytest.mark.parametrize("execution", [dict(attn_dropout=0.1), dict(attn_dropout=0.0),
                                       dict(attn_dropout=0.0, reversible_keep_attention=True)],
                         ids=["explicit", "fused", "fused-kept"])
def test_reversible_equals_plain(causal, with_globals, execution):
    """Attention dropout takes the explicit path; without it the fused kernel runs, its recompute replayed or not."""
    config = sliding_config(causal=causal, dropout=0.1, **execution)
    reversible = ReformerLM(config).double()
    plain = ReformerLM(ReformerConfig.from_dict({**config.to_dict(), "reversible": False})).double()
    plain.load_state_dict(reversible.state_dict())
    ids, mask, glob = batch_with_globals(config)
    glob = glob if with_globals else None
    loss, grads = gradients(reversible, ids, mask, glob)
    plain_loss, plain_grads = gradients(plain, ids, mask, glob)
    assert_close(loss, plain_loss, 1e-12, "loss")
    for (name, _), g, pg in zip(reversible.named_parameters(), grads, plain_grads):
        assert_close(g, pg, 1e-10, name)


def test_reversible_equals_plain_with_global_tokens_under_bfloat16_autocast():
    """Global tokens on the fused path under autocast(bfloat16): the reversible backward recomputes them as the
    forward ran; gradients within 2^-6 of each one's norm of the plain model's, the loss equal."""
    config = sliding_config(causal=False, attn_layers=("sliding", "local", "sliding", "lsh"), dropout=0.1)
    ids, mask, glob = batch_with_globals(config)
    results = []
    for reversible in (True, False):
        model = ReformerLM(ReformerConfig.from_dict({**config.to_dict(), "reversible": reversible})).train()
        model.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, mask, labels=ids, global_mask=glob).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_rev, grads_rev), (loss_plain, grads_plain) = results
    assert torch.equal(loss_rev, loss_plain)
    for name, grad in grads_rev.items():
        if grads_plain[name] is None or not grads_plain[name].any():
            continue
        error = ((grad - grads_plain[name]).norm() / grads_plain[name].norm()).item()
        assert error <= 2.0 ** -6, f"{name}: {error:.2e} of its norm"


def test_global_projections_start_as_copies_and_learn_only_from_global_tokens():
    config = sliding_config()
    model = ReformerLM(config).double()
    core = model.layers[0].attention.attention
    for local, glob in ((core.q, core.global_q), (core.k, core.global_k), (core.v, core.global_v)):
        assert torch.equal(local.weight, glob.weight)
    ids, mask, glob = batch_with_globals(config)
    names = [name for name, _ in model.named_parameters()]
    _, without = gradients(model, ids, mask, None)
    _, with_globals = gradients(model, ids, mask, glob)
    for name, g0, g1 in zip(names, without, with_globals):
        if ".global_" in name:
            assert torch.equal(g0, torch.zeros_like(g0)) and bool((g1 != 0).any()), name


def test_global_tokens_change_the_logits_and_are_ignored_elsewhere():
    config = sliding_config(causal=False)
    model = ReformerLM(config).double().eval()
    ids, mask, glob = batch_with_globals(config)
    plain = model(ids, mask).logits
    assert not torch.allclose(model(ids, mask, global_mask=glob).logits, plain)
    lsh_only = ReformerLM(tiny_config(attn_layers=("lsh", "local"))).eval()
    assert torch.equal(lsh_only(ids, mask, global_mask=glob).logits, lsh_only(ids, mask).logits)


def test_without_global_projections():
    config = sliding_config(sliding_global_projections=False)
    model = ReformerLM(config).double()
    assert not any(".global_" in name for name, _ in model.named_parameters())
    ids, mask, glob = batch_with_globals(config)
    loss, _ = gradients(model, ids, mask, glob)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("pad_to_multiple", [0, 8])
def test_padding_leaves_real_logits_unchanged(pad_to_multiple):
    """Right padding (by the user's mask or by pad_to_multiple) changes no real position's logits."""
    config = sliding_config(pad_to_multiple=pad_to_multiple)
    model = ReformerLM(config).double().eval()
    ids, _ = random_batch(config, batch=1, length=21)
    glob = torch.zeros_like(ids, dtype=torch.bool)
    glob[0, 4] = True
    alone = model(ids, global_mask=glob).logits
    padded_ids = torch.cat([ids, torch.randint(0, config.vocab_size, (1, 6))], dim=1)
    mask = torch.arange(27)[None] < 21
    padded = model(padded_ids, mask, global_mask=torch.cat([glob, torch.ones(1, 6, dtype=torch.bool)], dim=1)).logits
    assert_close(padded[:, :21], alone, 1e-10, "padded logits")


def test_cached_decoding_gives_the_uncached_logits():
    config = sliding_config(attn_layers=("sliding", "local", "sliding"), sliding_window=(3, 1, 4),
                            sliding_dilation=((1, 3), 1, 2))
    model = ReformerLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits[0]  # (40, vocab)
    state = start_decoding(model, 40)
    assert_close(prefill(model, ids[:, :13], state)[0], full[12], 1e-10, "prefill")
    for position in range(13, 40):
        assert_close(decode_step(model, ids[:, position], state)[0], full[position], 1e-10, f"step {position}")


def test_bad_global_masks_and_configs_are_explained():
    config = sliding_config()
    model = ReformerLM(config)
    ids, mask, glob = batch_with_globals(config)
    with pytest.raises(ValueError, match=r"global_mask must have the shape of input_ids \(2, 29\)"):
        model(ids, mask, global_mask=glob[:, :-1])
    with pytest.raises(TypeError, match="global_mask must be bool"):
        model(ids, mask, global_mask=glob.double())
    with pytest.raises(ValueError, match="sliding_window must be integers >= 1"):
        sliding_config(sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window has 2 entries for 4 layers"):
        sliding_config(sliding_window=(2, 2))
    with pytest.raises(ValueError, match="sliding_dilation must be integers >= 1"):
        sliding_config(sliding_dilation=0)
    with pytest.raises(ValueError, match=r"has 3 values for n_heads = 2"):
        sliding_config(sliding_dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="sliding_dilation has 2 per-layer entries for 4 layers"):
        sliding_config(sliding_dilation=((1, 2), 1))


def test_config_round_trips_through_json():
    config = sliding_config()
    assert ReformerConfig.from_json(config.to_json()) == config
    assert config.sliding_global_rule == "longformer"
    assert ReformerConfig.from_json(sliding_config(sliding_global_rule="global_kv").to_json()).sliding_global_rule \
        == "global_kv"
    with pytest.raises(ValueError, match="sliding_global_rule must be one of"):
        sliding_config(sliding_global_rule="hf")


def test_the_config_rule_is_the_layers_and_the_attention_functions():
    from reformer.attention import sliding
    from reformer.config import SLIDING_GLOBAL_RULES

    assert SLIDING_GLOBAL_RULES == sliding.GLOBAL_RULES
    ids, mask, glob = batch_with_globals(sliding_config())
    logits = {}
    for rule in SLIDING_GLOBAL_RULES:
        model = ReformerLM(sliding_config(causal=False, sliding_global_rule=rule)).double().eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # global projections apart from the local ones: the rules differ
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        assert all(layer.attention.attention.global_rule == rule for layer in model.layers
                   if hasattr(layer.attention.attention, "global_rule"))
        logits[rule] = model(ids, mask, global_mask=glob).logits
    assert not torch.allclose(*logits.values())


def old_config(**overrides) -> dict:
    """A config.json as models were saved before sliding_global_rule existed."""
    data = sliding_config(**overrides).to_dict()
    del data["sliding_global_rule"]
    return data


def test_models_saved_before_the_longformer_rule_keep_theirs_and_say_so(tmp_path):
    """A config.json without sliding_global_rule (sliding layers with global projections) loads with the rule
    it was trained with, "global_kv", and a warning naming the change; other old configs load as they were."""
    import json
    import warnings

    from reformer.checkpoint import load_model_config

    with pytest.warns(UserWarning, match="keeps the rule it was trained with, sliding_global_rule='global_kv'"):
        assert ReformerConfig.from_saved(old_config()).sliding_global_rule == "global_kv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (old_config(sliding_global_projections=False), old_config(attn_layers=("lsh", "local", "full", "local")),
                     sliding_config().to_dict()):
            assert ReformerConfig.from_saved(data).sliding_global_rule == "longformer"
        assert ReformerConfig.from_saved({**old_config(), "sliding_global_rule": "longformer"}) == sliding_config()

    model = ReformerLM(sliding_config(sliding_global_rule="global_kv"))
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(old_config()))
    with pytest.warns(UserWarning, match="sliding_global_rule='longformer'"):
        loaded = ReformerLM.from_pretrained(tmp_path)
    assert loaded.config == sliding_config(sliding_global_rule="global_kv")
    with pytest.warns(UserWarning):
        assert load_model_config(tmp_path).sliding_global_rule == "global_kv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moved = ReformerLM.from_pretrained(tmp_path, sliding_global_rule="longformer")
    assert moved.config.sliding_global_rule == "longformer"


def training_text() -> bytes:
    if NOVEL.is_file():
        return NOVEL.read_bytes()[100_000:400_000]
    words = "the old woman lived on the fourth floor and the student climbed the stairs every evening ".split()
    gen = torch.Generator().manual_seed(0)
    return " ".join(words[int(i)] for i in torch.randint(0, len(words), (60_000,), generator=gen)).encode()


def test_sliding_and_lsh_layers_learn_text():
    """Two layers, "sliding" then "lsh", on Crime and Punishment (or a synthetic text): the loss falls."""
    config = ReformerConfig(vocab_size=256, d_model=64, n_heads=2, d_head=32, d_ff=128, attn_layers=("sliding", "lsh"),
                            sliding_window=32, sliding_dilation=(1, 2), lsh_chunk_size=32, n_hashes=2,
                            axial_shape=(16, 16), axial_dims=(16, 48), max_seq_len=256, seed=0)
    model = ReformerLM(config)
    data = torch.frombuffer(bytearray(training_text()), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch():
        starts = torch.randint(0, data.numel() - 256, (8,), generator=gen)
        return torch.stack([data[s:s + 256] for s in starts.tolist()])

    held_out = batch()
    glob = torch.zeros_like(held_out, dtype=torch.bool)
    glob[:, 0] = True  # a global first token in every row

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(held_out, labels=held_out, global_mask=glob).loss.item()
        model.train()
        return loss

    before = held_out_loss()
    for _ in range(60):
        ids = batch()
        loss = model(ids, labels=ids, global_mask=glob).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = held_out_loss()
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.5, (before, after)  # from ~5.5 nats (uniform over bytes) to below ~3


def test_compiled_position_wise_parts_give_the_eager_gradients():
    """--compile (aot_eager) with sliding layers, with and without global tokens (6 or 3 projections)."""
    from reformer.compile import compile_model

    config = sliding_config(dropout=0.1)
    compiled, eager = ReformerLM(config), ReformerLM(config)
    compile_model(compiled, backend="aot_eager")
    ids, mask, glob = batch_with_globals(config)
    for global_mask in (glob, None):
        (loss, grads), (eager_loss, eager_grads) = (gradients(m, ids, mask, global_mask) for m in (compiled, eager))
        assert_close(loss, eager_loss, 1e-6, "loss")
        for (name, _), g, eg in zip(eager.named_parameters(), grads, eager_grads):
            assert_close(g, eg, 1e-5, name)
