"""The command line, run in-process: every subcommand, and one-line errors for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reformer.cli import main
from tests.conftest import one_line_error

TEXT = ("Crime and Punishment, by Fyodor Dostoevsky. Part I. Chapter I. " * 30).encode()
MODEL = ["--d-model", "32", "--d-head", "16", "--d-ff", "64", "--attn-layers", "local,lsh", "--lsh-chunk-size", "16",
         "--local-chunk-size", "16", "--n-hashes", "1"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


@pytest.fixture
def trained(tmp_path, text_file):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--steps", "4", "--batch-size", "2",
                 "--seq-len", "64", "--eval-every", "2", "--no-progress", *MODEL]) == 0
    return out


def test_train_eval_generate(trained, text_file, capsys):
    config = json.loads((trained / "config.json").read_text())
    assert config["d_model"] == 32 and config["attn_layers"] == ["local", "lsh"] and config["max_seq_len"] == 64
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained), "--data", str(text_file), "--no-progress"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    args = ["generate", "--checkpoint", str(trained), "--prompt", "Crime", "--max-new-tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("Crime")


def test_model_flags_override_the_config_file(tmp_path, text_file):
    base = tmp_path / "model.json"
    base.write_text(json.dumps({"d_model": 48, "d_head": 16, "n_heads": 3, "attn_layers": ["lsh"]}))
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--config", str(base), "--n-heads", "2",
                 "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--no-progress", "--lsh-chunk-size", "8",
                 "--n-buckets", "4,2", "--lsh-bucket-rule", "hf", "--hash-seed", "3", "--lsh-attn-dropout", "none",
                 "--ff-activation", "gelu", "--local-wrap", "true", "--pad-to-multiple", "16"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["d_model"], saved["n_heads"], saved["attn_layers"], saved["n_buckets"]) == (48, 2, ["lsh"], [4, 2])
    assert (saved["lsh_bucket_rule"], saved["hash_seed"], saved["lsh_attn_dropout"], saved["ff_activation"],
            saved["local_wrap"], saved["pad_to_multiple"]) == ("hf", 3, None, "gelu", True, 16)


def test_sliding_layers_from_the_command_line(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--no-progress", *MODEL[:6], "--attn-layers", "sliding,lsh", "--lsh-chunk-size",
                 "16", "--sliding-window", "8,1", "--sliding-dilation", "1,2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["attn_layers"], saved["sliding_window"], saved["sliding_dilation"]) == (
        ["sliding", "lsh"], [8, 1], [1, 2])
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Crime", "--max-new-tokens", "5"]) == 0
    one_line_error(capsys, ["train", "--data", str(text_file), "--out", str(tmp_path / "bad"), *MODEL[:6],
                            "--attn-layers", "sliding", "--sliding-window", "0"],
                   "sliding_window must be integers >= 1")


def test_runs_saved_before_the_longformer_rule_resume_with_theirs_and_fine_tune_with_either(tmp_path, text_file,
                                                                                         capsys):
    """A sliding run whose config.json lacks sliding_global_rule (saved before it) was trained with "global_kv":
    --resume says how to keep it, and continues with it; --init-from keeps it, or moves to Longformer's rule."""
    model = [*MODEL[:6], "--attn-layers", "sliding,lsh", "--lsh-chunk-size", "16", "--sliding-window", "4"]
    run = tmp_path / "old"
    common = ["--data", str(text_file), "--batch-size", "2", "--seq-len", "64", "--no-progress", *model]
    assert main(["train", "--out", str(run), "--steps", "2", *common]) == 0
    for path in run.rglob("config.json"):  # as runs were saved before the field (and checkpoint manifests) existed
        data = json.loads(path.read_text())
        del data["sliding_global_rule"]
        path.write_text(json.dumps(data))
    for path in run.rglob("manifest.json"):
        path.unlink()
    for rule in ("global_kv", "longformer"):
        out = tmp_path / rule
        flags = [] if rule == "global_kv" else ["--sliding-global-rule", rule]
        capsys.readouterr()
        assert main(["train", "--out", str(out), "--steps", "1", "--init-from", str(run), *common, *flags]) == 0
        assert "warning: this model was saved before" in capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["sliding_global_rule"] == rule
    resume = ["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]
    one_line_error(capsys, [*resume, "--sliding-global-rule", "longformer"],
                   "--sliding-global-rule longformer differs from the run's global_kv")
    assert main(resume) == 0  # the run's own rule, from its config.json
    assert json.loads((run / "config.json").read_text())["sliding_global_rule"] == "global_kv"


def test_bad_inputs_give_one_line(tmp_path, text_file, trained, capsys):
    train = ["train", "--out", str(tmp_path / "new"), "--steps", "1", "--no-progress", "--seq-len", "64", *MODEL]
    one_line_error(capsys, [*train, "--data", str(tmp_path / "missing.txt")], "not found")
    (tmp_path / "empty.txt").write_bytes(b"")
    one_line_error(capsys, [*train, "--data", str(tmp_path / "empty.txt")], "empty")
    (tmp_path / "short.txt").write_bytes(b"too short")
    one_line_error(capsys, [*train, "--data", str(tmp_path / "short.txt")], "--seq-len")
    one_line_error(capsys, [*train, "--data", str(text_file), "--max-seq-len", "32"], "max_seq_len")
    one_line_error(capsys, [*train, "--data", str(text_file), "--attn-layers", "lsh,dense"], "unknown kinds")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(capsys, [*train, "--data", str(text_file), "--config", str(tmp_path / "bad.json")], "JSON")
    resume = ["train", "--data", str(text_file), "--out", str(trained), "--resume", "--steps", "6", "--no-progress",
              "--seq-len", "64", *MODEL, "--d-model", "64", "--d-head", "32"]
    one_line_error(capsys, resume, "--d-model 64 differs")
    one_line_error(capsys, [*train, "--data", str(text_file), "--init-from", str(tmp_path / "nothing")],
                   "does not exist")
    one_line_error(capsys, [*train, "--data", str(text_file), "--init-from", str(trained), "--d-model", "64",
                            "--d-head", "32"], "d_model")
    one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", str(text_file)],
                   "does not exist")
    one_line_error(capsys, ["eval", "--checkpoint", str(trained), "--data", str(text_file), "--seq-len", "999"],
                   "max_seq_len")
    one_line_error(capsys, ["generate", "--checkpoint", str(trained), "--prompt", "x", "--top-p", "2"], "--top-p")


def test_help_explains_every_subcommand(capsys):
    result = subprocess.run([sys.executable, "-m", "reformer", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: reformer" in result.stdout  # the entry point, once
    helps = {}
    for argv in (["train", "--help"], ["eval", "--help"], ["generate", "--help"], ["data", "fetch", "--help"],
                 ["convert", "--help"]):  # the rest in this process: each subprocess imports torch afresh
        assert main(argv) == 0
        helps[argv[0]] = capsys.readouterr().out
        assert "usage: reformer" in helps[argv[0]], argv
    for flag in ("--steps", "--batch-size", "--seq-len", "--lr", "--grad-clip", "--grad-accum", "--eval-every",
                 "--save-every", "--precision", "--seed", "--resume", "--n-hashes", "--attn-layers", "--tokenizer"):
        assert flag in helps["train"]
    train_help = " ".join(helps["train"].split())
    for shown in ("(default 1000)", "(default 0.001)", "(default: 128)", "(default: local,lsh,local,lsh)",
                  "(default: from d_model)", "(default: --seq-len)", "(default: 0.0)"):
        assert shown in train_help, shown


def test_fetch_from_a_file_url(tmp_path, capsys, monkeypatch):
    import hashlib

    from reformer import fetch

    payload = b"a small novel\n" * 10
    source = tmp_path / "novel.txt"
    source.write_bytes(payload)
    small = fetch.Dataset(name="crime-and-punishment", url=source.as_uri(), filename="novel.txt",
                          size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(fetch.DATASETS, "crime-and-punishment", small)
    assert main(["data", "fetch", "crime-and-punishment", "--dir", str(tmp_path / "cache")]) == 0
    assert "novel.txt" in capsys.readouterr().out


def test_duplication_train_and_table(tmp_path, capsys):
    out = tmp_path / "dup"
    assert main(["train", "--task", "duplication", "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--vocab-size", "10", "--attn-layers", "lsh", "--lsh-chunk-size", "8",
                 "--d-model", "32", "--d-head", "16", "--d-ff", "32", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--task", "duplication", "--max-windows", "4"]) == 0
    table = capsys.readouterr().out
    assert "| Train \\ Eval | Full | LSH-8 | LSH-4 | LSH-2 | LSH-1 |" in table and "LSH-2 (this model)" in table
