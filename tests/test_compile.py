"""--compile: the compiled position-wise parts give the eager outputs, and never recompile for new seeds."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from reformer import ReformerLM
from reformer.compile import compile_model, uncompile_model
from tests.conftest import random_batch, tiny_config


def step(model, ids, mask):
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("reversible", [True, False])
def test_compiled_parts_give_the_eager_outputs_and_compile_once(reversible):
    """aot_eager runs the same kernels as eager: differences would be ours. Three steps draw new dropout seeds."""
    torch._dynamo.reset()
    config = tiny_config(dropout=0.2, reversible=reversible, ff_chunk_size=0, loss_chunk_size=4096)
    ids, mask = random_batch(config, length=29, pad_from=23)
    eager, compiled = ReformerLM(config).train(), compile_model(ReformerLM(config).train(), backend="aot_eager")
    graphs = []
    for _ in range(3):
        loss, grads = step(eager, ids, mask)
        loss_c, grads_c = step(compiled, ids, mask)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.allclose(loss_c, loss, rtol=1e-6, atol=0)
        for name, grad in grads.items():
            assert torch.allclose(grads_c[name], grad, rtol=1e-5, atol=1e-7), name
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0]  # new seeds and masks, no new graph


def test_uncompile_restores_the_eager_functions():
    model = compile_model(ReformerLM(tiny_config()), backend="aot_eager")
    assert model.compiled_loss is not None and model.layers[0].feed_forward.compiled_chunk is not None
    uncompile_model(model)
    assert model.compiled_loss is None
    assert all(layer.feed_forward.compiled_chunk is None and layer.attention.compiled_output is None
               for layer in model.layers)


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    torch._dynamo.reset()
    config = tiny_config(dropout=0.1)
    ids, mask = random_batch(config, length=29, pad_from=23)
    loss, grads = step(ReformerLM(config).train(), ids, mask)
    loss_c, grads_c = step(compile_model(ReformerLM(config).train()), ids, mask)
    assert torch.allclose(loss_c, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (grads_c[name] - grad).abs().max() <= 1e-4 * scale, name  # inductor reorders float32 sums


def test_train_with_compile_compiles_the_model(tmp_path, monkeypatch):
    """TrainConfig(compile=True) (`reformer train --compile`) hands the model to compile_model before training."""
    import reformer.compile
    from reformer.train import TrainConfig, train

    seen = []
    monkeypatch.setattr(reformer.compile, "compile_model", lambda model, **options: seen.append(model) or model)
    data = tmp_path / "text.txt"
    data.write_bytes(b"The house was quiet, and the stairs were dark. " * 30)
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(data), steps=1, batch_size=1, seq_len=32, eval_batches=1,
                      progress=False, compile=True, device="cpu")
    train(cfg, tiny_config(vocab_size=256))
    assert len(seen) == 1 and isinstance(seen[0], ReformerLM)
