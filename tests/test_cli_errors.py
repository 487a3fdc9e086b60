"""Every user error of the command line is one line on stderr with exit status 2, and says what to change.

One table: the command (with placeholders for the files a fixture makes) and a piece of the expected line.
"""

from __future__ import annotations

import os
import shutil

import pytest

from reformer.cli import main

MODEL = ["--d-model", "32", "--d-head", "16", "--d-ff", "64", "--attn-layers", "local,lsh", "--lsh-chunk-size", "16",
         "--local-chunk-size", "16", "--n-hashes", "1"]
TEXT = ("Crime and Punishment, by Fyodor Dostoevsky. Part I. Chapter I. " * 30).encode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the table's placeholders name: text, a trained run, a foreign directory, ..."""
    root = tmp_path_factory.mktemp("cli_errors")
    paths = {"tmp": root, "text": root / "text.txt", "binary": root / "blob.bin", "empty": root / "empty.txt",
             "short": root / "short.txt", "bad_json": root / "bad.json", "run": root / "run",
             "foreign": root / "foreign", "a_file": root / "a_file.txt", "model": root / "model",
             "damaged": root / "damaged", "empty_dir": root / "empty_dir", "not_options": root / "not_options"}
    paths["text"].write_bytes(TEXT)
    paths["binary"].write_bytes(bytes(range(256)) * 8)
    paths["empty"].write_bytes(b"")
    paths["short"].write_bytes(b"too short")
    paths["bad_json"].write_text("{not json")
    paths["a_file"].write_text("not a directory")
    paths["foreign"].mkdir()
    (paths["foreign"] / "config.json").write_text("{}")  # e.g. what `reformer convert --from-hf` wrote
    (paths["foreign"] / "model.safetensors").write_bytes(b"weights")
    paths["empty_dir"].mkdir()
    assert main(["train", "--data", str(paths["text"]), "--out", str(paths["run"]), "--steps", "4", "--batch-size",
                 "2", "--seq-len", "64", "--eval-every", "2", "--save-every", "2", "--no-progress", *MODEL]) == 0
    shutil.copytree(paths["run"], paths["damaged"])
    shutil.copytree(paths["run"], paths["not_options"])
    (paths["not_options"] / "train.json").write_text("[1, 2]")
    for checkpoint in (paths["damaged"] / "checkpoints").glob("step-*"):
        with open(checkpoint / "model.safetensors", "r+b") as f:
            f.truncate(100)  # every checkpoint truncated: nothing intact to fall back to
    from reformer import ReformerConfig, ReformerLM

    ReformerLM(ReformerConfig(d_model=32, d_head=16, n_heads=2, d_ff=64, max_seq_len=64)).save_pretrained(
        paths["model"])
    return {name: str(path) for name, path in paths.items()}


TRAIN = ["train", "--steps", "1", "--batch-size", "2", "--seq-len", "64", "--no-progress", *MODEL]
NEW = "{tmp}/new_run"
CASES = [
    # train: data
    ([*TRAIN, "--data", "{tmp}/missing.txt", "--out", NEW], "not found"),
    ([*TRAIN, "--data", "{empty}", "--out", NEW], "is empty"),
    ([*TRAIN, "--data", "{short}", "--out", NEW], "--seq-len"),
    ([*TRAIN, "--data", "{run}", "--out", NEW], "is a directory"),
    ([*TRAIN, "--out", NEW], "give exactly one of --data PATH or --task duplication"),
    ([*TRAIN, "--data", "{binary}", "--tokenizer", "{tmp}/none.model", "--out", NEW], "tokenizer file"),
    ([*TRAIN, "--data", "{text}", "--tokenizer", "{text}", "--out", NEW], "a SentencePiece .model or a tokenizers"),
    ([*TRAIN, "--task", "duplication", "--tokenizer", "{text}", "--out", NEW], "--tokenizer reads text"),
    # train: numbers, with the flag named
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--lr", "-1"], "--lr must be a number > 0"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--lr", "nan"], "--lr must be a number > 0"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--steps", "0"], "--steps must be a whole number >= 1"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--warmup", "-5"], "--warmup must be a whole number >= 0"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--grad-clip", "-1"], "--grad-clip must be a number >= 0"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--eval-batches", "0"], "--eval-batches must be a whole number"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # train: the model
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--max-seq-len", "32"], "max_seq_len"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--attn-layers", "lsh,dense"], "unknown kinds"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--d-model", "0"], "d_model must be a positive integer"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--config", "{bad_json}"], "is not valid JSON"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--config", "{tmp}/nothing.json"], "no such file"),
    # train: --out holds what is not ours
    ([*TRAIN, "--data", "{text}", "--out", "{a_file}"], "is a file, not a directory"),
    ([*TRAIN, "--data", "{text}", "--out", "{foreign}"], "holds files that are not a reformer run (config.json, "
                                                          "model.safetensors)"),
    ([*TRAIN, "--data", "{text}", "--out", "{run}"], "already holds a run; add --resume"),
    # train: --resume and --init-from
    (["train", "--out", "{empty_dir}", "--resume"], "is not a run of ours"),
    (["train", "--out", "{run}", "--resume", "--lr", "0.5"], "--lr 0.5 differs from the run's 0.001"),
    (["train", "--out", "{run}", "--resume", "--d-model", "64"], "--d-model 64 differs from the run's 32"),
    (["train", "--out", "{run}", "--resume", "--data", "{binary}"], "--data"),
    (["train", "--out", "{run}", "--resume", "--config", "{bad_json}"], "drop --config"),
    (["train", "--out", "{damaged}", "--resume"], "holds no intact checkpoint"),
    (["train", "--out", "{run}", "--resume", "--steps", "-3"], "--steps must be a whole number >= 1"),
    (["train", "--out", "{run}", "--resume", "--steps", "4"], "the run is at step 4 already (--steps 4)"),
    (["train", "--out", "{not_options}", "--resume"], "is not the options of a `reformer train` run"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--init-from", "{tmp}/nothing"], "does not exist"),
    ([*TRAIN, "--data", "{text}", "--out", NEW, "--init-from", "{run}", "--d-model", "64", "--d-head", "32"],
     "d_model = 64"),
    # eval
    (["eval", "--checkpoint", "{tmp}/nothing", "--data", "{text}"], "does not exist"),
    (["eval", "--checkpoint", "{run}"], "give --data FILE"),
    (["eval", "--checkpoint", "{run}", "--data", "{text}", "--seq-len", "999"], "--seq-len 999 must be in"),
    (["eval", "--checkpoint", "{run}", "--data", "{empty}"], "is empty"),
    (["eval", "--checkpoint", "{run}", "--data", "{text}", "--max-windows", "0"], "--max-windows must be"),
    (["eval", "--checkpoint", "{foreign}", "--data", "{text}"], "is damaged (model.safetensors is 7 bytes"),
    (["eval", "--checkpoint", "{damaged}", "--data", "{text}"], "holds no intact checkpoint"),
    (["eval", "--checkpoint", "{damaged}/checkpoints/step-00000004", "--data", "{text}"], "is damaged"),
    # generate
    (["generate", "--checkpoint", "{run}", "--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "--checkpoint", "{run}", "--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--checkpoint", "{run}", "--prompt", "", "--max-new-tokens", "3"], "the prompt is empty"),
    (["generate", "--checkpoint", "{run}", "--prompt", "x", "--max-new-tokens", "500"],
     "exceed the model's max_seq_len 64; give --max-new-tokens 63 or less"),
    # convert and fetch
    (["convert", "--out", "{tmp}/out"], "give exactly one of --from-hf HF_DIR or --to-hf RUN_DIR"),
    (["convert", "--to-hf", "{run}", "--out", "{foreign}"], "is not empty"),
    (["convert", "--to-hf", "{run}", "--out", "{a_file}"], "is a file"),
    (["convert", "--from-hf", "{tmp}/nothing", "--out", "{tmp}/converted"], "nothing"),
    (["data", "fetch", "crime-and-punishment", "--dir", "{tmp}/cache", "--url", "http://127.0.0.1:9/novel.txt"],
     "http://127.0.0.1:9/novel.txt"),
    (["data", "fetch", "crime-and-punishment", "--dir", "{a_file}/cache"], "--dir"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:1] + [m[:40]]) for a, m in CASES])
def test_user_errors_are_one_line(files, capsys, argv, message):
    capsys.readouterr()
    code = main([arg.format(**files) for arg in argv])
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if ": warning: " not in line]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message.format(**files) in lines[0], lines[0]
    assert not os.path.exists(files["tmp"] + "/new_run"), "a failed run left its directory behind"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_out_is_one_line(files, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([*TRAIN, "--data", files["text"], "--out", str(locked / "run")]) == 2
        assert "not writable" in capsys.readouterr().err
        assert main([*TRAIN, "--data", files["text"], "--out", str(locked)]) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_debug_shows_the_traceback(files, monkeypatch):
    monkeypatch.setenv("REFORMER_DEBUG", "1")
    with pytest.raises(ValueError, match="--lr must be a number > 0"):
        main([*TRAIN, "--data", files["text"], "--out", files["tmp"] + "/debug", "--lr", "-1"])


def test_an_unknown_reformer_backend_is_one_line(files, monkeypatch, capsys):
    monkeypatch.setenv("REFORMER_BACKEND", "cuda")
    assert main([*TRAIN, "--data", files["text"], "--out", files["tmp"] + "/backend"]) == 2
    err = capsys.readouterr().err
    assert "REFORMER_BACKEND: unknown backend 'cuda'; choose one of reference, torch, native" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
