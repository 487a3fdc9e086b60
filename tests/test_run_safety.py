"""What a run does with the user's files: --out protection, damaged checkpoints, self-contained resume, SIGINT."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from reformer import train as train_module
from reformer.checkpoint import latest_checkpoint
from reformer.cli import main

MODEL = ["--d-model", "32", "--d-head", "16", "--d-ff", "64", "--attn-layers", "local,lsh", "--lsh-chunk-size", "16",
         "--local-chunk-size", "16", "--n-hashes", "1", "--dropout", "0.1"]
TEXT = ("Crime and Punishment, by Fyodor Dostoevsky. Part I. Chapter I. On an exceptionally hot evening. " * 40).encode()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


def train_cli(*args: str) -> int:
    return main(["train", "--batch-size", "2", "--seq-len", "64", "--eval-every", "2", "--no-progress", *args])


def train_losses(run) -> dict[int, float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_out_holding_a_converted_model_is_refused_and_left_as_it_was(tmp_path, text_file, capsys):
    """`reformer train --out DIR` where DIR holds a model (here `reformer convert`'s kind of output) changes nothing."""
    from reformer import ReformerConfig, ReformerLM

    converted = tmp_path / "converted"
    ReformerLM(ReformerConfig(d_model=32, d_head=16, n_heads=2, d_ff=64, max_seq_len=64)).save_pretrained(converted)
    before = snapshot(converted)
    assert train_cli("--data", str(text_file), "--out", str(converted), "--steps", "1", *MODEL) == 2
    assert "holds files that are not a reformer run (config.json, model.safetensors)" in capsys.readouterr().err
    assert snapshot(converted) == before
    assert main(["eval", "--checkpoint", str(converted), "--data", str(text_file), "--no-progress"]) == 0


def test_a_truncated_newest_checkpoint_falls_back_to_the_intact_one_and_is_kept(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "4", "--save-every", "2", *MODEL) == 0
    newest = run / "checkpoints" / "step-00000004"
    weights = newest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # a kill during a copy, a full disk
    damaged = weights.read_bytes()
    capsys.readouterr()
    for argv in (["eval", "--checkpoint", str(run), "--data", str(text_file), "--no-progress"],
                 ["generate", "--checkpoint", str(run), "--prompt", "Crime", "--max-new-tokens", "4"]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "step-00000004 is damaged (model.safetensors is" in err and "using" in err and "step-00000002" in err
    assert latest_checkpoint(run).name == "step-00000002"
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress"]) == 0
    kept = run / "checkpoints" / "step-00000004.damaged" / "model.safetensors"
    assert kept.read_bytes() == damaged, "the damaged checkpoint was not kept aside"
    assert latest_checkpoint(run).name == "step-00000006"


def test_resume_reads_the_run_and_repeats_the_uninterrupted_losses_with_dropout(tmp_path, text_file, capsys):
    """`--resume` with no other flag takes the data, model (dropout 0.1) and options from the run; a flag given
    again that may change is reported in one line."""
    options = ["--data", str(text_file), "--save-every", "3", "--lr", "0.003", "--warmup", "2", *MODEL]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_cli("--out", str(full), "--steps", "6", *options) == 0
    assert train_cli("--out", str(cut), "--steps", "6", *options) == 0
    shutil.rmtree(cut / "checkpoints" / "step-00000006")  # as if killed after the step-3 checkpoint
    (cut / "checkpoints" / "latest").write_text("step-00000003\n")
    capsys.readouterr()
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    assert train_losses(cut) == train_losses(full) and len(train_losses(full)) == 6
    assert json.loads((cut / "config.json").read_text())["dropout"] == 0.1
    capsys.readouterr()
    assert main(["train", "--out", str(cut), "--resume", "--steps", "7", "--no-progress"]) == 0
    assert "reformer train: resuming" in capsys.readouterr().err
    assert sorted(train_losses(cut)) == list(range(1, 8))


def test_resume_refuses_changed_data(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "2", *MODEL) == 0
    text_file.write_bytes(TEXT[::-1])
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 2
    assert "changed since the run started" in capsys.readouterr().err


def interrupting_step(after: int, signals: int):
    """_train_step that sends itself `signals` SIGINTs during step `after` (counted from 1)."""
    real = train_module._train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return step


def test_sigint_saves_the_current_step_and_exits_130(tmp_path, text_file, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "_train_step", interrupting_step(after=3, signals=1))
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "8", "--save-every", "100", *MODEL) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "interrupted at step 3; saved" in err and "step-00000003" in err and "--resume` continues" in err
    assert latest_checkpoint(run).name == "step-00000003"
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert sorted(train_losses(run)) == list(range(1, 9))


def test_a_second_sigint_stops_at_once_without_saving(tmp_path, text_file, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "_train_step", interrupting_step(after=2, signals=2))
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "8", "--save-every", "100", *MODEL) == 130
    err = capsys.readouterr().err.strip()
    assert err == "reformer train: interrupted; no checkpoint was saved"
    assert latest_checkpoint(run) is None


def test_sigint_before_the_first_step_saves_nothing_and_says_so(tmp_path, text_file, capsys, monkeypatch):
    real = train_module.make_samplers

    def interrupted_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_samplers", interrupted_while_loading)
    assert train_cli("--data", str(text_file), "--out", str(tmp_path / "run"), "--steps", "8", *MODEL) == 130
    assert capsys.readouterr().err.strip() == \
        "reformer train: interrupted before the first step ended; nothing was saved"


def test_library_train_raises_interrupted_with_the_checkpoint(tmp_path, text_file, monkeypatch):
    from reformer import ReformerConfig, TrainConfig

    monkeypatch.setattr(train_module, "_train_step", interrupting_step(after=2, signals=1))
    cfg = TrainConfig(out=str(tmp_path / "lib"), data=str(text_file), steps=5, batch_size=2, seq_len=64,
                      eval_every=0, save_every=0, progress=False)
    with pytest.raises(train_module.Interrupted) as caught:
        train_module.train(cfg, ReformerConfig(d_model=32, d_head=16, n_heads=2, d_ff=64, max_seq_len=64,
                                               attn_layers=("local",), local_chunk_size=16))
    assert caught.value.step == 2 and caught.value.checkpoint.name == "step-00000002"
    assert torch.load(caught.value.checkpoint / "state.pt", weights_only=False)["step"] == 2


def test_a_new_run_never_deletes_checkpoints_of_the_directory(tmp_path, text_file, capsys):
    """An unreadable `latest` does not make a run look empty; pruning keeps the checkpoint just saved, the one
    before it and every damaged one."""
    from reformer.checkpoint import damage

    run = tmp_path / "run"
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "3", "--save-every", "1", *MODEL) == 0
    (run / "checkpoints" / "latest").write_text("garbage\n")
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "1", *MODEL) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    with open(run / "checkpoints" / "step-00000002" / "state.pt", "r+b") as f:
        f.truncate(10)
    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--no-progress"]) == 0
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000004", "step-00000005"]  # the damaged step 2 stays
    assert damage(run / "checkpoints" / "step-00000002") is not None


def test_the_tokenizer_of_an_earlier_attempt_goes_and_a_moved_run_resumes(tmp_path, text_file):
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    lines = tmp_path / "lines.txt"
    lines.write_text(TEXT.decode().replace(". ", ".\n"))
    sentencepiece.SentencePieceTrainer.train(input=str(lines), model_prefix=str(tmp_path / "sp"), vocab_size=295,
                                             byte_fallback=True, minloglevel=2)
    run = tmp_path / "run"
    assert train_cli("--data", str(lines), "--tokenizer", str(tmp_path / "sp.model"), "--out", str(run), "--steps",
                     "2", *MODEL) == 0
    moved = tmp_path / "moved"
    run.rename(moved)
    assert main(["train", "--out", str(moved), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert main(["train", "--out", str(moved), "--resume", "--steps", "4", "--no-progress", "--tokenizer",
                 str(tmp_path / "sp.model"), "--data", os.path.relpath(lines)]) == 0  # the same files, other paths
    shutil.rmtree(moved / "checkpoints")  # an attempt that saved nothing: the directory starts over, in bytes
    assert train_cli("--data", str(text_file), "--out", str(moved), "--steps", "1", *MODEL) == 0
    assert not (moved / "tokenizer.model").exists()
    assert json.loads((moved / "config.json").read_text())["vocab_size"] == 256


def test_a_run_from_before_absolute_paths_resumes_with_its_data_given(tmp_path, text_file, capsys, monkeypatch):
    run = tmp_path / "old"
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "2", *MODEL) == 0
    options = json.loads((run / "train.json").read_text())
    del options["data_files"]
    options["data"] = "text.txt"  # relative to where it was started
    (run / "train.json").write_text(json.dumps(options))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # the record names of older runs
        record["bpc"] = record.pop("bits_per_token")
        record.pop("bits_per_byte", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.chdir(tmp_path / "old")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 2
    assert "give --data with its path" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress", "--data",
                 str(text_file)]) == 0


def test_a_second_sigint_while_saving_waits_for_the_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = train_module._save

    def save_with_another_interrupt(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_step", interrupting_step(after=2, signals=1))
    monkeypatch.setattr(train_module, "_save", save_with_another_interrupt)
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "8", "--save-every", "100", *MODEL) == 130
    assert "--resume` continues from" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-00000002"


def test_damage_reads_any_manifest_and_state_without_a_traceback(tmp_path, text_file, capsys):
    from reformer.checkpoint import damage

    run = tmp_path / "run"
    assert train_cli("--data", str(text_file), "--out", str(run), "--steps", "2", *MODEL) == 0
    checkpoint = run / "checkpoints" / "step-00000002"
    (checkpoint / "manifest.json").write_text('{"files": []}')
    assert damage(checkpoint) == "manifest.json is not a manifest"
    (checkpoint / "manifest.json").unlink()  # as written before manifests: its state.pt decides
    torch.save({"step": 2}, checkpoint / "state.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 2
    assert "lacks optimizer, scheduler, model_generator, sampler: not a checkpoint" in capsys.readouterr().err
