"""Hugging Face Reformer checkpoints: logits parity, generation, round trips, training, errors.

Tiny random HF models are built locally (no hub). HF is run in eval mode with
`hash_seed` set, so its LSH rotations are fixed; our converted model uses the
same rotations without touching the global RNG.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ReformerConfig as HFConfig  # noqa: E402
from transformers import ReformerForMaskedLM, ReformerModelWithLMHead  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from reformer import ReformerConfig, ReformerLM  # noqa: E402
from reformer.generate import generate  # noqa: E402
from reformer.hf import ConversionError, config_from_hf, differences_from_hf, hf_applies_head_bias  # noqa: E402

hf_logging.set_verbosity_error()  # HF warns about padding to chunk multiples on every call
TOLERANCE = 1e-5


def tiny_hf(causal=True, layers=("local", "lsh"), n_hashes=1, buckets=4, lsh_chunk=4, local_chunk=4,
            vocab=30, axial=True, seed=0, **extra):
    torch.manual_seed(seed)  # HF initialises from the global RNG; only the test touches it
    config = HFConfig(
        vocab_size=vocab, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
        attn_layers=list(layers), axial_pos_embds=axial, axial_pos_shape=[8, 8], axial_pos_embds_dim=[4, 12],
        max_position_embeddings=64, is_decoder=causal, lsh_attn_chunk_length=lsh_chunk,
        local_attn_chunk_length=local_chunk, num_buckets=buckets, num_hashes=n_hashes, hash_seed=7,
        eos_token_id=None, **extra)
    model = (ReformerModelWithLMHead if causal else ReformerForMaskedLM)(config).eval()
    with torch.no_grad():  # away from the init's zeros and ones, so that every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_logits(model, ids, mask=None) -> torch.Tensor:
    """HF's logits, with `lm_head.bias` added where this transformers version leaves it out (5.x; see hf.py)."""
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    head = model.lm_head
    return logits if head.decoder.bias is not None else logits + head.bias


def our_logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=None if mask is None else mask.bool()).logits


def batch(n, masked, causal, seed=0, vocab=30):
    ids = torch.randint(1, vocab, (2, n), generator=torch.Generator().manual_seed(seed))
    if not masked:
        return ids, None
    mask = torch.ones(2, n, dtype=torch.long)
    mask[0, -2:] = 0  # right padding
    if not causal:
        mask[1, 0] = 0  # left padding
    return ids, mask


def assert_same_real_logits(hf, ours, n, masked, causal):
    ids, mask = batch(n, masked, causal, seed=n)
    expected, got = hf_logits(hf, ids, mask), our_logits(ours, ids, mask)
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    err = (expected - got)[real].abs().max().item()  # padded positions' logits are meaningless in HF
    assert err < TOLERANCE, f"length {n}, masked {masked}: max logit error {err:.2e}"


LSH_LAYERS = [("local", "lsh"), ("lsh", "local", "lsh"), ("lsh",)]
PARITY_CASES = [(layers, n_hashes, buckets) for layers in LSH_LAYERS for n_hashes in (1, 3)
                for buckets in (4, [2, 4], None)] + [(("local",), 1, None)]


def case_id(case) -> str:
    layers, n_hashes, buckets = case
    kind = {int: "int", list: "factorised", type(None): "hf-rule"}[type(buckets)]
    return "-".join(layers) + (f"-{n_hashes}hash-{kind}" if "lsh" in layers else "")


@pytest.mark.parametrize("causal", [True, False], ids=["ModelWithLMHead", "ForMaskedLM"])
@pytest.mark.parametrize("layers, n_hashes, buckets", PARITY_CASES, ids=[case_id(c) for c in PARITY_CASES])
def test_logits_match_hf(causal, layers, n_hashes, buckets):
    """Lengths below, at, between and above chunk multiples (chunks 4 and 8: HF pads to 8), with and without padding."""
    lsh_chunk = 8 if len(layers) == 3 else 4
    for n in (3, 8, 13, 24):
        for masked in (False, True):
            hf = tiny_hf(causal, layers, n_hashes, buckets, lsh_chunk=lsh_chunk)  # fresh: HF freezes num_buckets=None
            ours = ReformerLM.from_hf(hf).eval()
            assert_same_real_logits(hf, ours, n, masked, causal)


@pytest.mark.parametrize("causal, windows", [
    (True, dict(lsh_num_chunks_before=2, local_num_chunks_before=0)),
    (False, dict(lsh_num_chunks_before=1, lsh_num_chunks_after=1, local_num_chunks_before=0,
                 local_num_chunks_after=1)),
    (False, dict(lsh_num_chunks_before=2, lsh_num_chunks_after=1, local_num_chunks_before=2,
                 local_num_chunks_after=2)),
])
def test_chunks_before_and_after_match_hf(causal, windows):
    for n, masked in ((13, True), (24, False), (40, True)):
        hf = tiny_hf(causal, ("local", "lsh", "local"), n_hashes=2, buckets=[2, 4], **windows)
        ours = ReformerLM.from_hf(hf).eval()
        assert (ours.config.lsh_chunks_before, ours.config.lsh_chunks_after) == (
            windows["lsh_num_chunks_before"], windows.get("lsh_num_chunks_after", 0))
        assert_same_real_logits(hf, ours, n, masked, causal)


@pytest.mark.parametrize("axial, activation", [(False, "gelu"), (True, "gelu_new"), (True, "silu")])
def test_absolute_positions_and_activations_match_hf(axial, activation):
    hf = tiny_hf(layers=("local", "lsh"), n_hashes=2, axial=axial, hidden_act=activation)
    ours = ReformerLM.from_hf(hf).eval()
    assert ours.config.axial_shape is None if not axial else ours.config.axial_shape == (8, 8)
    assert_same_real_logits(hf, ours, 13, masked=True, causal=True)


def test_more_hashes_at_eval_time_match_hf():
    hf = tiny_hf(layers=("lsh", "local"), n_hashes=2)
    ours = ReformerLM.from_hf(hf).eval()
    ours.set_lsh_eval(n_hashes=4)
    ids, _ = batch(24, False, True)
    with torch.no_grad():
        expected = hf(ids, num_hashes=4).logits
    expected = expected if hf.lm_head.decoder.bias is not None else expected + hf.lm_head.bias
    assert (expected - our_logits(ours, ids)).abs().max() < TOLERANCE


@pytest.mark.parametrize("layers", [("local", "lsh"), ("local",)])
def test_greedy_generation_matches_hf(layers):
    """50 greedy tokens, each from a full forward pass over the prefix in both libraries."""
    hf = tiny_hf(layers=layers, n_hashes=2)
    ours = ReformerLM.from_hf(hf).eval()
    if hf.lm_head.decoder.bias is None:  # transformers 5.x ignores lm_head.bias: give both models none
        hf.lm_head.bias.data.zero_()
        ours.head.bias.data.zero_()
    prompt = torch.randint(1, 30, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=50, do_sample=False, use_cache=False, pad_token_id=0)
    mine = list(generate(ours, prompt[0], 50, temperature=0.0, use_cache=False))
    assert theirs[0, 5:].tolist() == mine
    assert len(set(mine)) > 3  # a real sequence, not one token repeated
    if "lsh" not in layers:  # local attention caches exactly in both; HF's LSH cache approximates its own way
        with torch.no_grad():
            theirs = hf.generate(prompt, max_new_tokens=50, do_sample=False, use_cache=True, pad_token_id=0)
        assert theirs[0, 5:].tolist() == list(generate(ours, prompt[0], 50, temperature=0.0, use_cache=True))


@pytest.mark.parametrize("length, chunk, max_positions", [
    (16, 4, 64), (100, 8, 4096), (1024, 64, 4096), (3000, 4, 4096), (65536, 256, 65536), (524288, 64, 524288),
])
def test_bucket_rule_is_hfs(length, chunk, max_positions):
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    from reformer.attention.lsh import n_buckets_hf_rule

    layer = LSHSelfAttention(HFConfig(lsh_attn_chunk_length=chunk, max_position_embeddings=max_positions,
                                      num_buckets=None))
    layer._set_num_buckets(length)
    expected = tuple(layer.num_buckets) if isinstance(layer.num_buckets, list) else layer.num_buckets
    assert n_buckets_hf_rule(length, chunk, max_positions) == expected


def test_hash_seed_rotations_leave_the_global_rng_alone():
    hf = tiny_hf(layers=("lsh",), n_hashes=2)
    ours = ReformerLM.from_hf(hf).train()
    state = torch.get_rng_state()
    ids, _ = batch(24, False, True)
    ours(ids, labels=ids).loss.backward()
    assert torch.equal(torch.get_rng_state(), state)


# --- files and round trips -------------------------------------------------------------------------

def test_from_hf_directory_safetensors_and_pytorch_bin(tmp_path):
    hf = tiny_hf(layers=("lsh", "local"), n_hashes=2, buckets=[2, 4])
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference = ReformerLM.from_hf(hf).state_dict()
    for directory in ("st", "bin"):
        loaded = ReformerLM.from_hf(tmp_path / directory).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.parametrize("causal", [True, False])
def test_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, causal):
    """The head bias is not zero here: where transformers drops it (5.x), to_hf folds it (see the next test)."""
    ours = ReformerLM.from_hf(tiny_hf(causal, ("local", "lsh", "local"), n_hashes=2, buckets=[2, 4])).eval()
    ours.to_hf(tmp_path / "hf")
    cls = ReformerModelWithLMHead if causal else ReformerForMaskedLM
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    ids, mask = batch(13, True, causal)
    real = mask.bool()
    with torch.no_grad():  # HF's own logits, as that transformers version computes them
        assert (hf(ids, attention_mask=mask).logits - our_logits(ours, ids, mask))[real].abs().max() < TOLERANCE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.x: "ignores lm_head.bias"
        ours.to_hf(tmp_path / "literal", fold_bias=False)  # the weights exactly as they are
    back = ReformerLM.from_hf(tmp_path / "literal")
    assert back.config == ours.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


CRIME_AND_PUNISHMENT = dict(  # google/reformer-crime-and-punishment's config.json (reference-spec §7.3)
    vocab_size=320, attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"], hidden_size=256,
    num_attention_heads=2, attention_head_size=64, feed_forward_size=512, hidden_act="relu", is_decoder=True,
    num_hashes=1, num_buckets=[64, 128], lsh_attn_chunk_length=64, local_attn_chunk_length=64,
    lsh_num_chunks_before=1, lsh_num_chunks_after=0, local_num_chunks_before=1, local_num_chunks_after=0,
    hidden_dropout_prob=0.05, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.05,
    max_position_embeddings=524288, axial_pos_embds=True, axial_pos_shape=[512, 1024],
    axial_pos_embds_dim=[64, 192], axial_norm_std=1.0, chunk_size_lm_head=0, chunk_size_feed_forward=0,
    pad_token_id=0, tie_word_embeddings=False, hash_seed=None,
)


def test_crime_and_punishment_configuration_converts_both_ways(tmp_path):
    """The exact configuration of google/reformer-crime-and-punishment, random weights built here."""
    torch.manual_seed(0)
    hf = ReformerModelWithLMHead(HFConfig(**{**CRIME_AND_PUNISHMENT, "hash_seed": 5})).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = ReformerLM.from_hf(tmp_path / "hf").eval()
    assert ours.config.n_buckets == (64, 128) and ours.config.max_seq_len == 524288
    ids = torch.randint(0, 320, (1, 300), generator=torch.Generator().manual_seed(0))  # 300: HF pads to 320
    assert (hf_logits(hf, ids) - our_logits(ours, ids)).abs().max() < TOLERANCE

    ours.to_hf(tmp_path / "back")
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in CRIME_AND_PUNISHMENT.items():
        if key != "hash_seed":
            assert saved[key] == value, key
    again = ReformerLM.from_hf(tmp_path / "back")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert (hf_logits(ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval(), ids)
            - our_logits(ours, ids)).abs().max() < TOLERANCE

    config = config_from_hf(CRIME_AND_PUNISHMENT)  # without hash_seed: HF's LSH rotations are random per call
    assert config.hash_seed is None and config.lsh_attn_dropout == 0.0 and config.attn_dropout == 0.05


def test_training_continues_from_a_converted_model():
    hf = tiny_hf(layers=("local", "lsh"), n_hashes=2, vocab=30)
    model = ReformerLM.from_hf(hf)
    ids = torch.randint(1, 30, (2, 16), generator=torch.Generator().manual_seed(0))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert eval_loss() < before


# --- writing our own models, and errors ------------------------------------------------------------

def test_native_model_export_lists_what_hf_would_compute_differently(tmp_path):
    model = ReformerLM(ReformerConfig(vocab_size=30, d_model=16, n_heads=2, d_head=8, d_ff=24, causal=False,
                                      attn_layers=("local", "lsh"), axial_shape=(8, 8), axial_dims=(4, 12),
                                      max_seq_len=64, lsh_chunk_size=4, local_chunk_size=4))
    differences = differences_from_hf(model.config)
    assert any("lsh_wrap" in d for d in differences) and any("local_wrap" in d for d in differences)
    with pytest.raises(ConversionError, match="strict=False"):
        model.to_hf(tmp_path / "strict")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.to_hf(tmp_path / "loose", strict=False)
    assert len([w for w in caught if "to_hf:" in str(w.message)]) == len(differences)
    assert (tmp_path / "loose" / "model.safetensors").is_file()

    full = ReformerLM(ReformerConfig(vocab_size=30, d_model=16, n_heads=2, d_head=8, d_ff=24, attn_layers=("full",),
                                     axial_shape=(8, 8), axial_dims=(4, 12), max_seq_len=64))
    with pytest.raises(ConversionError, match="'full' attention"):
        full.to_hf(tmp_path / "full", strict=False)


def test_head_bias_folds_into_the_final_norm_for_transformers_that_drop_it(tmp_path):
    """A trained head bias is not zero; with fold_bias HF's logits equal ours in every transformers version."""
    ours = ReformerLM.from_hf(tiny_hf(layers=("local",), vocab=30)).eval()
    with torch.no_grad():
        ours.head.bias.copy_(torch.randn(30, generator=torch.Generator().manual_seed(0)))
    ours.to_hf(tmp_path, fold_bias=True)
    hf = ReformerModelWithLMHead.from_pretrained(tmp_path).eval()
    assert float(hf.lm_head.bias.detach().abs().max()) == 0.0
    ids, _ = batch(13, False, True)
    with torch.no_grad():
        assert (hf(ids).logits - our_logits(ours, ids)).abs().max() < 1e-4
    assert hf_applies_head_bias() == (hf.lm_head.decoder.bias is not None)

    wide = ReformerLM.from_hf(tiny_hf(layers=("local",), vocab=40))  # 40 > 2 * 16: no exact fold exists
    with torch.no_grad():
        wide.head.bias.fill_(1.0)
        wide.head.bias[0] = 3.0
    with pytest.raises(ConversionError, match="cannot be folded .* exactly"):
        wide.to_hf(tmp_path / "wide", fold_bias=True)


def test_bad_checkpoints_are_explained(tmp_path):
    hf = tiny_hf(layers=("local", "lsh"))
    hf.save_pretrained(tmp_path / "ok")
    with pytest.raises(ConversionError, match="not a directory"):
        ReformerLM.from_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json not found"):
        ReformerLM.from_hf(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ConversionError, match="no model.safetensors"):
        ReformerLM.from_hf(tmp_path / "noweights")

    state = hf.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["lm_head.decoder.weight"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save(state, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"missing \['lm_head.decoder.weight'\].*unexpected \['extra.weight'\]"):
        ReformerLM.from_hf(tmp_path / "bad")

    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ConversionError, match="lsh_chunks_after = 1 in a causal model"):
        config_from_hf({**config, "lsh_num_chunks_after": 1})
    with pytest.raises(ConversionError, match="hidden_act 'mish'"):
        config_from_hf({**config, "hidden_act": "mish"})
    with pytest.raises(ConversionError, match="cannot convert a ReformerModel"):
        ReformerLM.from_hf(transformers.ReformerModel(hf.config))


# --- the command line ------------------------------------------------------------------------------

def test_convert_train_and_convert_back_on_the_command_line(tmp_path, capsys):
    """HF dir -> ours -> two training steps from those weights -> HF dir that transformers loads, same logits."""
    from reformer.cli import main
    from reformer.train import load_for_eval

    hf = tiny_hf(layers=("local", "lsh"), n_hashes=2, vocab=260)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    converted = load_for_eval(tmp_path / "ours")
    ids, _ = batch(13, False, True, vocab=260)
    assert (hf_logits(hf, ids) - our_logits(converted, ids)).abs().max() < TOLERANCE

    text = tmp_path / "text.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["train", "--data", str(text), "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "ours"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1",
                 "--warmup", "1", "--no-progress"]) == 0
    trained = load_for_eval(tmp_path / "run")
    assert trained.config == converted.config
    assert not torch.equal(trained.head.weight, converted.head.weight)  # it trained on from the converted weights
    assert (trained.token_embedding.weight - converted.token_embedding.weight).abs().max() < 0.1

    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    assert (hf_logits(back, ids) - our_logits(trained, ids)).abs().max() < TOLERANCE  # vocab 260 > 32: not folded

    assert main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --from-hf" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_eos_token_id_survives_the_round_trip():
    """HF's eos_token_id comes in (generate stops there) and goes out again; None stays None."""
    from reformer.hf import config_from_hf, config_to_hf

    hf = tiny_hf(vocab=30)
    for eos in (2, None):
        config = config_from_hf({**hf.config.to_dict(), "eos_token_id": eos})
        assert config.eos_token_id == eos and config_to_hf(config)["eos_token_id"] == eos
