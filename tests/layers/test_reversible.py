"""Reversible execution: same loss and gradients as the plain residual, no stored activations."""

from __future__ import annotations

import pytest
import torch

import reformer.attention.lsh as lsh_module
from reformer import ReformerConfig, ReformerLM
from tests.conftest import assert_close, random_batch, tiny_config


def loss_and_grads(config, ids, mask):
    model = ReformerLM(config).double().train()
    with torch.no_grad():  # away from the initial values (LayerNorms at 1 and 0, zero biases), the same for both
        generator = torch.Generator().manual_seed(7)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype), alpha=0.1)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=False, lsh_dedup=True, n_hashes=3),
    dict(lsh_wrap=True, lsh_same_bucket_only=True, ff_chunk_size=0),
    dict(attn_layers=("lsh", "lsh"), n_buckets=(2, 4), axial_shape=None, axial_dims=None),
    dict(causal=False, lsh_wrap=True, local_wrap=True, lsh_bucket_rule="hf", hash_seed=3, lsh_normalize="hf",
         pad_to_multiple=20, ff_activation="gelu_new", lsh_attn_dropout=0.2),
    dict(lsh_chunk_size=32),
    dict(causal=False, lsh_chunks_before=2, lsh_chunks_after=1, local_chunks_before=0, local_chunks_after=2),
], ids=["mixed", "bidirectional-dedup", "wrap-same-bucket", "factorised-absolute", "hf-layout", "lsh-in-one-chunk",
        "windows"])
@pytest.mark.parametrize("keep", [False, "auto"])
def test_reversible_equals_plain_in_float64_with_dropout(options, keep):
    config = tiny_config(dropout=0.1, attn_dropout=0.1, reversible_keep_attention=keep, **options)
    ids, mask = random_batch(config, length=29, pad_from=23)
    loss_rev, grads_rev = loss_and_grads(config, ids, mask)
    config.reversible = False
    loss_plain, grads_plain = loss_and_grads(config, ids, mask)
    assert_close(loss_rev, loss_plain, 1e-8, "loss")
    assert grads_rev.keys() == grads_plain.keys()
    for name in grads_rev:
        assert grads_rev[name] is not None, f"{name} got no gradient"
        assert_close(grads_rev[name], grads_plain[name], 1e-8, name)
    assert any(g.abs().sum() > 0 for g in grads_rev.values())


def bfloat16_loss_and_grads(config, ids, mask):
    model = ReformerLM(config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("options", [dict(), dict(causal=False, n_hashes=3)],
                         ids=["causal", "bidirectional"])
def test_reversible_equals_plain_under_bfloat16_autocast(options):
    """The backward recomputes under the forward's autocast: the inverse then rounds as the forward did.

    Recomputed in float32 instead, the rebuilt inputs are off by bfloat16's
    rounding of every branch, and this test fails; what remains with the
    forward's autocast is the two executions' different rounding order, well
    under the bound of 2^-6 of each gradient's norm.
    """
    config = tiny_config(d_model=64, axial_dims=(16, 48), d_ff=256, d_head=32, n_heads=2, max_seq_len=256,
                         axial_shape=(16, 16), lsh_chunk_size=16, local_chunk_size=16,
                         attn_layers=("local", "lsh", "lsh", "local"), **options)
    ids, mask = random_batch(config, length=200, pad_from=180)
    loss_rev, grads_rev = bfloat16_loss_and_grads(config, ids, mask)
    config.reversible = False
    loss_plain, grads_plain = bfloat16_loss_and_grads(config, ids, mask)
    assert torch.equal(loss_rev, loss_plain)  # the forwards are the same computation
    for name, grad in grads_rev.items():
        assert grad.dtype == torch.float32, name
        error = ((grad - grads_plain[name]).norm() / grads_plain[name].norm()).item()
        assert error <= 2.0 ** -6, f"{name}: {error:.2e} of its norm"


def saved_bytes_of_activations(config):
    model = ReformerLM(config).train()
    params = {p.data_ptr() for p in model.parameters()}
    ids, mask = random_batch(config, length=40)
    total = []

    def pack(t):
        if t.data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return sum(total)


def test_stored_activations_do_not_grow_with_depth():
    shallow = saved_bytes_of_activations(tiny_config(attn_layers=("lsh", "local")))
    deep = saved_bytes_of_activations(tiny_config(attn_layers=("lsh", "local") * 4))
    assert deep == shallow
    plain_shallow = saved_bytes_of_activations(tiny_config(attn_layers=("lsh", "local"), reversible=False))
    plain_deep = saved_bytes_of_activations(tiny_config(attn_layers=("lsh", "local") * 4, reversible=False))
    assert plain_deep > 3 * plain_shallow > 3 * shallow


def test_backward_reuses_the_forward_buckets(monkeypatch):
    calls = []
    original = lsh_module.hash_vectors
    monkeypatch.setattr(lsh_module, "hash_vectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = tiny_config(attn_layers=("lsh", "local", "lsh"))
    model = ReformerLM(config).train()
    ids, mask = random_batch(config)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert len(calls) == 2  # once per LSH layer, in the forward only


def test_same_seed_same_result_and_global_rng_untouched():
    state = torch.get_rng_state()
    config = tiny_config(dropout=0.1, attn_dropout=0.1)
    ids, mask = random_batch(config)
    losses = []
    for _ in range(2):
        model = ReformerLM(config).train()
        for _step in range(2):
            out = model(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
        losses.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))
    assert torch.equal(state, torch.get_rng_state()), "the global RNG was used"
    other = ReformerLM(tiny_config(dropout=0.1, attn_dropout=0.1, seed=1)).train()
    assert not torch.equal(other(ids, attention_mask=mask, labels=ids).loss.detach(), losses[0][0])


def test_reversible_gradients_through_the_hidden_states_equal_plain_and_leave_them_intact():
    """Without labels the stack hands out its output: the backward must not change it, and grads equal plain."""
    config = tiny_config(dropout=0.1, attn_dropout=0.1)
    ids, mask = random_batch(config, length=29, pad_from=23)
    grads, hidden_values = [], []
    for reversible in (True, False):
        config.reversible = reversible
        model = ReformerLM(config).double().train()
        hidden = model.hidden_states(ids, mask)
        before = hidden.detach().clone()
        weights = torch.linspace(-1, 1, config.vocab_size, dtype=torch.float64)
        (model.logits_from_hidden(hidden) * weights).sum().backward()
        assert torch.equal(hidden.detach(), before), "the backward changed the returned hidden states"
        grads.append({name: p.grad for name, p in model.named_parameters()})
        hidden_values.append(before)
    assert_close(hidden_values[0], hidden_values[1], 1e-10, "hidden states")
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], 1e-8, name)


def test_attention_branch_runs_position_wise_parts_in_chunks():
    """LayerNorm, projections and output projection see at most ff_chunk_size positions in the reversible stack."""
    config = tiny_config(ff_chunk_size=8, attn_layers=("lsh", "local"))
    model = ReformerLM(config).train()
    widths = {"projection": [], "output": []}
    for layer in model.layers:
        layer.attention.attention.v.register_forward_hook(lambda m, i, o: widths["projection"].append(o.shape[1]))
        layer.attention.out.register_forward_hook(lambda m, i, o: widths["output"].append(o.shape[1]))
    ids, mask = random_batch(config, length=29)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert max(widths["projection"]) == max(widths["output"]) == 8
    assert len(widths["projection"]) == len(widths["output"]) == 2 * 2 * 4  # 2 layers, forward and backward recompute,
    # 4 chunks of 29 positions each; the projections are not recomputed for their own gradients


_STEP_PEAK = """
import json, sys, torch
from reformer.memory import current_rss_mib, peak_rss_mib, process_status_mib, release_freed_memory_eagerly
release_freed_memory_eagerly(8 << 20)  # blocks of 8 MiB and more leave at once: the peak counts live tensors
from reformer import ReformerConfig, ReformerLM
n, layers, keep = int(sys.argv[1]), tuple(sys.argv[2].split(",")), json.loads(sys.argv[3])
config = ReformerConfig(vocab_size=256, d_model=256, n_heads=2, d_head=64, d_ff=512, attn_layers=layers,
                        lsh_chunk_size=64, local_chunk_size=64, n_hashes=1, axial_shape=(256, 256),
                        max_seq_len=n, ff_chunk_size=8192, loss_chunk_size=8192, reversible_keep_attention=keep)
model = ReformerLM(config).train()
ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))

parts = ("RssAnon", "RssFile")  # anonymous and file-backed: which one grew, should the step hold too much
before = process_status_mib(*parts)
baseline = current_rss_mib()
model(ids, labels=ids).loss.backward()
kept_mib = sum(model.kept_attention_bytes + model.kept_output_bytes) / 2**20
print(json.dumps({"step_mib": peak_rss_mib() - baseline, "kept_mib": kept_mib, "before": before,
                  "after": process_status_mib(*parts)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layers, keep", [("local,lsh", False), ("lsh,local,lsh,local,lsh,local", False),
                                          ("lsh,local,lsh,local,lsh,local", "auto")])
def test_a_training_step_holds_about_nine_activations_whatever_the_depth(layers, keep):
    """Forward and backward of the million-token architecture at 65,536 tokens, in a fresh process.

    One activation is n * d_model float32 (64 MiB here). The in-place reversible
    state and gradient state are four; one layer's attention work adds about
    five (measured 9.1 for LSH layers, 9.8 for local ones, 9.9 for the mix).
    Before the in-place stack it was about fifteen. That is the stack alone, with
    no layer keeping its attention for the backward (reversible_keep_attention
    False); the default "auto" holds what it keeps on top, at most its budget
    (a constant whatever the length; `test_the_keep_budget_...` below).
    The mmap threshold is 8 MiB, below this model's 16 MiB feed-forward chunks,
    so that freed blocks leave the process and the peak counts what the stack
    holds. With the library's default 32 MiB the heap keeps the freed chunks for
    reuse, fragmented: the peak was 11.6 activations, of which 8.7 live and the
    rest free heap (`benchmarks/heap_peak.py`, in git history before d7d0b1b).
    """
    import json
    import subprocess
    import sys

    n = 65536
    done = subprocess.run([sys.executable, "-c", _STEP_PEAK, str(n), layers, json.dumps(keep)], check=True,
                          capture_output=True, text=True, timeout=600)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    activation_mib = n * 256 * 4 / 2**20
    assert (measured["kept_mib"] > 0) == (keep == "auto")
    assert measured["kept_mib"] <= ReformerConfig.reversible_keep_attention_mib
    activations = (measured["step_mib"] - measured["kept_mib"]) / activation_mib
    assert activations < 11.5, (f"the step held {activations:.1f} activations of (n, d_model) beside what it kept; "
                                f"resident MiB before the step {measured['before']}, after it {measured['after']}")


def test_a_second_backward_through_the_reversible_loss_is_explained():
    config = tiny_config()
    model = ReformerLM(config).train()
    ids, mask = random_batch(config)
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        loss.backward()


@pytest.mark.parametrize("kinds", [("lsh", "local", "full", "lsh"), ("sliding", "lsh")])
def test_keeping_the_attention_for_the_backward_changes_no_gradient(kinds):
    """reversible_keep_attention: the backward reads the forward's kernel output and plan, and its feed-forward
    output (which spares the second product), instead of recomputing them from the rebuilt inputs; loss and
    gradients equal the plain model's (1e-10), with dropout, as the recomputing stack's do, whether every layer
    keeps them (True), none (False), or the latest that fit in the budget ("auto")."""
    from reformer import ReformerConfig, ReformerLM
    from tests.conftest import random_batch, tiny_config

    config = tiny_config(attn_layers=kinds, dropout=0.1, reversible_keep_attention=True)
    largest = max(kept_bytes(config))
    changes = ({}, {"reversible_keep_attention": False}, {"reversible": False},
               {"reversible_keep_attention": "auto", "reversible_keep_attention_mib": (largest + 1) / (1 << 20)},
               {"reversible_keep_feed_forward": False})
    models = [ReformerLM(ReformerConfig.from_dict({**config.to_dict(), **change})).double() for change in changes]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    ids, mask = random_batch(config, length=29, pad_from=20)
    results, kept, outputs = [], [], []
    for model in models:
        model.train()
        model.manual_seed(4)
        loss = model(ids, mask, labels=ids).loss
        kept.append(len(model.kept_attention_bytes))
        outputs.append(len(model.kept_output_bytes))
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)  # unused: global projections
        results.append((loss, [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]))
    fused = sum(kind != "full" for kind in kinds)  # layers that run the fused kernel
    assert kept == [fused, 0, 0, 1, fused]
    assert outputs[:3] == [len(kinds), 0, 0] and outputs[4] == 0  # keep=True: every feed-forward output too
    (kept_loss, kept_grads), (recomputed, recomputed_grads), (plain, plain_grads), (partial, partial_grads), \
        (attention_only, attention_only_grads) = results
    assert torch.equal(kept_loss, recomputed) and torch.equal(partial, recomputed)  # the same forward
    assert torch.equal(attention_only, recomputed)
    for (name, _), *grads, pg in zip(models[0].named_parameters(), kept_grads, recomputed_grads, partial_grads,
                                     attention_only_grads, plain_grads):
        for g in grads:
            assert_close(g, pg, 1e-10, name)


def kept_bytes(config) -> list[int]:
    """The bytes each fused layer of `config` keeps for the backward (float64, the test batch)."""
    from reformer import ReformerLM

    model = ReformerLM(config).double().train()
    ids, mask = random_batch(config, length=29, pad_from=20)
    model(ids, mask, labels=ids)
    return model.kept_attention_bytes


def latest_that_fit(sizes: list[int], budget: int) -> list[int]:
    """The reference: in layer order, keep each layer that fits in the whole budget, dropping the earliest
    kept ones until it fits in what is left."""
    kept = []
    for size in sizes:
        if size <= budget:
            kept.append(size)
            while sum(kept) > budget:
                kept.pop(0)
    return kept


def test_the_keep_budget_keeps_the_latest_layers_that_fit_and_never_more():
    """"auto" keeps the latest layers whose attention fits in reversible_keep_attention_mib (the backward reaches
    them first): a layer evicts the earliest kept ones to make room, a layer larger than the budget keeps
    nothing. Eval and reversible=False keep nothing."""
    config = tiny_config(attn_layers=("lsh", "local", "lsh"), reversible_keep_attention=True)
    model = ReformerLM(config).train()
    ids, mask = random_batch(config, length=29, pad_from=20)
    model(ids, mask, labels=ids)
    sizes = model.kept_attention_bytes  # lsh, local, lsh
    assert len(sizes) == 3 and sizes[0] == sizes[2] and all(size > 0 for size in sizes)
    assert sizes[1] < sizes[0]  # so a budget below an LSH layer's still keeps the local layer
    for budget in (sizes[1] - 1, sizes[0] - 1, sizes[0], sizes[0] + sizes[1] - 1, sizes[0] + sizes[1],
                   sum(sizes) - 1, sum(sizes)):
        config.reversible_keep_attention, config.reversible_keep_attention_mib = "auto", budget / (1 << 20)
        model(ids, mask, labels=ids)
        assert model.kept_attention.kept == latest_that_fit(sizes, budget), budget
        assert sum(model.kept_attention.kept) <= budget
    config.reversible_keep_attention_mib = 0
    model(ids, mask, labels=ids)
    assert model.kept_attention is None
    with torch.no_grad():
        model(ids, mask, labels=ids)
    assert model.kept_attention is None
    config.reversible = False
    model(ids, mask, labels=ids)
    assert model.kept_attention is None


