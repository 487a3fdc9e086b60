"""Tokenizers: trained here from a small text (SentencePiece and `tokenizers`), stored in the run, used by eval and
generate with no flag, and bits per byte that count the text's bytes whatever the tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reformer.cli import main
from reformer.data import open_tokens
from reformer.evaluate import evaluate_file
from reformer.tokenizer import BYTES, find_tokenizer, load_tokenizer

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")
tokenizers = pytest.importorskip("tokenizers")

LINES = ["Crime and Punishment, by Fyodor Dostoevsky.", "On an exceptionally hot evening early in July",
         "a young man came out of the garret in which he lodged in S. Place", "and walked slowly towards K. bridge.",
         "Raskolnikov — Раскольников, his name. 罪と罰."]
TEXT = ("\n".join(LINES * 40) + "\n").encode("utf-8")
MODEL = ["--d-model", "32", "--d-head", "16", "--d-ff", "64", "--attn-layers", "local,lsh", "--lsh-chunk-size", "16",
         "--local-chunk-size", "16", "--n-hashes", "1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A text file, a SentencePiece model and a tokenizer.json trained on it."""
    root = tmp_path_factory.mktemp("tokenizers")
    (root / "text.txt").write_bytes(TEXT)
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "sp"), vocab_size=330,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT.decode()], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.save(str(root / "bpe.json"))
    return {"root": root, "text": root / "text.txt", "sp": root / "sp.model", "bpe": root / "bpe.json"}


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_byte_ends_cover_the_text(made, kind):
    """ends[i] is where token i's text ends: non-decreasing, to the text's last byte, and each token's bytes
    decode to what the tokenizer decodes it to (where it maps to text one to one)."""
    tokenizer = load_tokenizer(made[kind])
    ids, ends = tokenizer.encode(TEXT)
    assert len(ids) == len(ends) > 0 and (ends[1:] >= ends[:-1]).all()
    assert len(TEXT.rstrip()) <= ends[-1] <= len(TEXT)  # SentencePiece drops the trailing newline
    assert tokenizer.decode(ids).replace(b" ", b"").replace(b"\n", b"") == TEXT.replace(b" ", b"").replace(b"\n", b"")
    ids, ends = BYTES.encode(TEXT)
    assert ids.tolist() == list(TEXT) and ends.tolist() == list(range(1, len(TEXT) + 1))


@pytest.mark.parametrize("kind, stored", [("sp", "tokenizer.model"), ("bpe", "tokenizer.json")])
def test_a_run_keeps_its_tokenizer_for_eval_and_generate(made, tmp_path, capsys, kind, stored):
    run = tmp_path / "run"
    tokenizer = load_tokenizer(made[kind])
    assert main(["train", "--data", str(made["text"]), "--tokenizer", str(made[kind]), "--out", str(run), "--steps",
                 "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--no-progress", *MODEL]) == 0
    assert (run / stored).read_bytes() == made[kind].read_bytes()
    assert json.loads((run / "config.json").read_text())["vocab_size"] == tokenizer.vocab_size
    assert find_tokenizer(run).kind == tokenizer.kind
    assert find_tokenizer(run / "checkpoints" / "step-00000003").kind == tokenizer.kind
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert "bits_per_byte" in evals[-1] and evals[-1]["bits_per_byte"] < evals[-1]["bits_per_token"]
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(run), "--data", str(made["text"]), "--no-progress"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    result = evaluate_file(run, made["text"], seq_len=32, progress=False)
    data = open_tokens(made["text"], tokenizer)
    assert result["tokens"] == len(data) - 1  # every token but the first, once
    assert result["bytes"] == int(data.ends[-1] - data.ends[0])  # the bytes those tokens stand for
    assert math.isclose(result["bits_per_byte"], result["loss"] * result["tokens"] / result["bytes"] / math.log(2))

    assert main(["generate", "--checkpoint", str(run), "--prompt", "He was", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("He was") and "<" not in out[6:]  # decoded text, not token numbers


def test_bits_per_byte_of_a_byte_model_are_its_bits_per_token(made, tmp_path):
    run = tmp_path / "bytes"
    assert main(["train", "--data", str(made["text"]), "--out", str(run), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "2", "--no-progress", *MODEL]) == 0
    result = evaluate_file(run, made["text"], seq_len=32, progress=False)
    assert result["bytes"] == result["tokens"] == len(TEXT) - 1
    assert math.isclose(result["bits_per_byte"], result["bits_per_token"])
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(record["bits_per_byte"], record["bits_per_token"])


def test_a_converted_hf_directory_generates_with_its_spiece_model(made, tmp_path, capsys):
    """As google/reformer-crime-and-punishment holds spiece.model beside its weights: convert brings it along."""
    transformers = pytest.importorskip("transformers")
    vocab = load_tokenizer(made["sp"]).vocab_size
    config = transformers.ReformerConfig(
        vocab_size=vocab, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
        attn_layers=["local", "lsh"], axial_pos_shape=[8, 8], axial_pos_embds_dim=[4, 12],
        max_position_embeddings=64, is_decoder=True, lsh_attn_chunk_length=4, local_attn_chunk_length=4,
        num_buckets=4, hash_seed=7, eos_token_id=2)
    with torch.random.fork_rng():
        transformers.ReformerModelWithLMHead(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "spiece.model").write_bytes(made["sp"].read_bytes())
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    assert find_tokenizer(tmp_path / "ours").kind == "sentencepiece"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "ours"), "--prompt", "Crime", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Crime") and "<" not in out
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == 2
    assert (tmp_path / "back" / "spiece.model").read_bytes() == made["sp"].read_bytes()


def test_binary_data_with_a_tokenizer_is_one_line(made, tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    assert main(["train", "--data", str(blob), "--tokenizer", str(made["sp"]), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--seq-len", "32", "--no-progress", *MODEL]) == 2
    assert "is not UTF-8" in capsys.readouterr().err


def test_generated_text_streams_whole_characters_with_spaces_between_pieces(made):
    """Token by token, the streamed bytes are the prompt-and-continuation's decoding after the prompt: a
    character split over byte pieces waits for its last byte; SentencePiece's leading spaces stay."""
    from reformer.cli import _Continuation

    tokenizer = load_tokenizer(made["sp"])
    prompt = tokenizer.encode(b"He was")[0].tolist()
    continuation = tokenizer.encode(" the \xc3\xa9 fox \xe7\xbd\xaa and".encode("latin-1").decode("utf-8").encode())[0]
    stream = _Continuation(tokenizer, prompt)
    pieces = [stream.add(int(token)) for token in continuation]
    streamed = b"".join(pieces) + stream.rest()
    whole = tokenizer.decode(prompt + continuation.tolist())
    assert streamed == whole[len(tokenizer.decode(prompt)):]
    assert b"\xef\xbf\xbd" not in b"".join(pieces)  # no half character was printed
    assert streamed.startswith(b" ")
