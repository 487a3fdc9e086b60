"""benchmarks/hf_parity.py's bucket recorder sees every LSH call of both models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("hf_parity", ROOT / "benchmarks" / "hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_bucket_recorder_pairs_every_lsh_call_of_hf_and_ours():
    from reformer import ReformerLM

    script = load_script()
    hf = script.random_hf_model(True, ("lsh", "local", "lsh"), 1, 4)
    ours = ReformerLM.from_hf(hf).eval()
    recorder = script.BucketRecorder(hf, ours)
    ids = torch.randint(0, 30, (1, 24), generator=torch.Generator().manual_seed(0))
    hf(ids)
    ours(ids)
    flipped, total = recorder.differing(4)
    assert total == 2 * 2 * 24, "two LSH layers x two heads x 24 positions, one round"
    assert flipped == 0
