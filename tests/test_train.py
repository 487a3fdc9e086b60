"""train(): files of a run, the schedule, resume (in-process and after SIGKILL), and its errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reformer import ReformerConfig
from reformer.checkpoint import CheckpointError, latest_checkpoint
from reformer.train import TrainConfig, lr_factor, train

TEXT = ("It was a warm evening in early July when a young man came out of his garret. " * 40).encode()


def small_model(**overrides) -> ReformerConfig:
    fields = dict(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, attn_layers=("local", "lsh"),
                  lsh_chunk_size=16, local_chunk_size=16, n_hashes=2, axial_shape=(8, 16), axial_dims=(8, 24),
                  max_seq_len=128, dropout=0.1, seed=0)
    fields.update(overrides)
    return ReformerConfig(**fields)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


def run_config(out, data, **overrides) -> TrainConfig:
    fields = dict(out=str(out), data=str(data), steps=6, batch_size=2, seq_len=64, eval_every=3, eval_batches=2,
                  save_every=2, warmup=2, progress=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def train_losses(history) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history if r["split"] == "train"}


def test_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_run_writes_its_files_and_learns(tmp_path, text_file):
    history = train(run_config(tmp_path / "run", text_file, steps=30, eval_every=10, lr=3e-3), small_model())
    run = tmp_path / "run"
    expected = {"config.json", "train.json", "metrics.jsonl", "curves.png", "checkpoints"}
    assert expected <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == history
    evals = [r["loss"] for r in history if r["split"] == "eval"]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert latest_checkpoint(run).name == "step-00000030"
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # older ones pruned


def test_resume_reproduces_the_uninterrupted_run(tmp_path, text_file):
    full = train(run_config(tmp_path / "full", text_file), small_model())
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    (crashed / "checkpoints" / "latest").write_text("step-00000004\n")  # as if killed after step 4
    resumed = train(run_config(crashed, text_file, resume=True), small_model())
    assert train_losses(resumed) == train_losses(full)
    assert [r for r in resumed if r["split"] == "eval"] == [r for r in full if r["split"] == "eval"]


def test_bf16_autocast_trains(tmp_path, text_file):
    history = train(run_config(tmp_path / "bf16", text_file, precision="bf16", steps=3), small_model())
    assert all(r["loss"] == r["loss"] for r in history)  # finite, not NaN


def test_duplication_task_trains(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "dup"), task="duplication", steps=3, batch_size=2, seq_len=32,
                      eval_batches=1, progress=False)
    history = train(cfg, small_model(vocab_size=12, attn_layers=("lsh",), lsh_chunk_size=8))
    assert history[-1]["split"] == "eval"


def test_mistakes_are_explained(tmp_path, text_file):
    train(run_config(tmp_path / "run", text_file, steps=2), small_model())
    with pytest.raises(ValueError, match="--resume"):
        train(run_config(tmp_path / "run", text_file, steps=2), small_model())
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(run_config(tmp_path / "empty", text_file, resume=True), small_model())
    with pytest.raises(CheckpointError, match="d_model"):
        train(run_config(tmp_path / "run", text_file, steps=4, resume=True),
              small_model(d_model=64, axial_dims=(8, 56)))
    with pytest.raises(ValueError, match="max_seq_len"):
        train(run_config(tmp_path / "long", text_file, seq_len=256), small_model())
    with pytest.raises(ValueError, match="exactly one"):
        train(TrainConfig(out=str(tmp_path / "x"), progress=False), small_model())


CLI_TRAIN = ["--seq-len", "128", "--batch-size", "4", "--d-model", "64", "--d-head", "32", "--d-ff", "128",
             "--attn-layers", "local,lsh,local,lsh", "--lsh-chunk-size", "16", "--local-chunk-size", "16",
             "--eval-every", "0", "--save-every", "3", "--no-progress", "--dropout", "0.1"]


def run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "reformer", "train", *args], env=env, **kwargs)


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, text_file):
    """kill -9, then `reformer train --out RUN --resume` alone (data, model with dropout 0.1, options from the run):
    the same losses, step for step."""
    common = ["--data", str(text_file), "--steps", "30", *CLI_TRAIN]
    assert run_cli([*common, "--out", str(tmp_path / "full")]).wait(timeout=600) == 0

    victim = run_cli([*common, "--out", str(tmp_path / "killed")])
    deadline = time.monotonic() + 300
    while (latest_checkpoint(tmp_path / "killed") is None
           or latest_checkpoint(tmp_path / "killed").name < "step-00000009"):
        assert victim.poll() is None, "the run ended before it could be killed; make it longer"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 30

    assert run_cli(["--out", str(tmp_path / "killed"), "--resume"]).wait(timeout=600) == 0  # the run's own settings
    losses = [
        {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
         if r["split"] == "train"}
        for name in ("full", "killed")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 30


def test_top_level_functions():
    import reformer

    assert callable(reformer.train) and callable(reformer.generate) and callable(reformer.evaluate_file)
    assert reformer.TrainConfig is TrainConfig


def test_batches_reach_the_device_through_pinned_memory_on_cuda_only(monkeypatch):
    """`to_device`: on the CPU the batch itself; on CUDA a pinned copy sent without blocking the host."""
    import torch

    from reformer.train import to_device

    batch = torch.arange(6).view(2, 3)
    assert to_device(batch, torch.device("cpu")) is batch
    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((device, non_blocking))
            return "on the device"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned())
    assert to_device(batch, torch.device("cuda")) == "on the device"
    assert calls == [(torch.device("cuda"), True)]
