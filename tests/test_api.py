"""The Python API as the README shows it: module-or-function names, lazy submodules, derived sizes."""

from __future__ import annotations

import subprocess
import sys

import torch


def test_generate_and_train_are_functions_and_modules():
    import reformer
    from reformer import ReformerConfig, ReformerLM

    model = ReformerLM(ReformerConfig(d_model=32, d_head=16, n_heads=2, d_ff=64, max_seq_len=64)).eval()
    prompt = torch.tensor([1, 2, 3])
    called = list(reformer.generate(model, prompt, 4, temperature=0.0))
    assert called == list(reformer.generate.generate(model, prompt, 4, temperature=0.0)) and len(called) == 4
    assert callable(reformer.train) and reformer.train.TrainConfig is reformer.TrainConfig
    assert reformer.generate.filter_logits is not None


def test_submodules_load_on_first_use():
    code = "import reformer; print(reformer.fetch.fetch.__name__, reformer.data.encode('a').tolist())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["fetch", "[97]"], done.stderr


def test_axial_sizes_follow_d_model_and_max_seq_len():
    from reformer import ReformerConfig

    assert ReformerConfig().axial_shape == (64, 64) and ReformerConfig().axial_dims == (64, 192)
    config = ReformerConfig(d_model=128)
    assert config.axial_dims == (32, 96) and sum(config.axial_dims) == 128
    config = ReformerConfig(max_seq_len=16384, d_model=64)
    assert config.axial_shape == (128, 128) and config.axial_dims == (16, 48)
    assert ReformerConfig(axial_shape=None).axial_dims is None  # learned absolute positions
    assert ReformerConfig(axial_shape=(8, 8, 4), max_seq_len=256).axial_dims == (85, 85, 86)
    assert ReformerConfig.from_json(config.to_json()) == config
