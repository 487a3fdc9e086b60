"""Tokenizers: bytes (the default), a SentencePiece `.model`, or a Hugging Face `tokenizers` `tokenizer.json`.

    tokenizer = load_tokenizer("spiece.model")          # or "tokenizer.json"; BYTES is the byte tokenizer
    ids, ends = tokenizer.encode(b"He was a young man")  # ends[i]: the byte offset where token i's text ends
    text = tokenizer.decode(ids)                         # bytes

`ends` is what makes bits per byte exact whatever the tokenizer: the tokens i + 1 .. j cover the bytes
ends[i] .. ends[j] of the text, so a window's predicted tokens are scored against the bytes they stand for.
Bytes no token stands for (SentencePiece's normaliser drops a file's trailing whitespace) are not counted.

A run keeps its tokenizer file beside its config (`store_tokenizer`: RUN/tokenizer.model or
RUN/tokenizer.json); `find_tokenizer` finds it again from a run, one of its checkpoints, or a model
directory (a directory converted from Hugging Face holds `spiece.model`, as google/reformer-crime-and-punishment
does). Without a file there, tokens are bytes. SentencePiece needs `sentencepiece` and `protobuf` (for the
byte offsets), `tokenizer.json` needs `tokenizers`: `pip install -e '.[tokenizers]'`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

STORED = {"sentencepiece": "tokenizer.model", "tokenizers": "tokenizer.json"}  # kind: name in a run directory
FOUND = ("tokenizer.model", "tokenizer.json", "spiece.model")  # names `find_tokenizer` looks for
CHUNK_BYTES = 1 << 20  # text is encoded a chunk at a time, cut after a newline where there is one


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or text it cannot encode; the message says what to do."""


class ByteTokenizer:
    """Every byte is a token (vocab 256): exact, lossless, and the default."""

    kind, path, vocab_size = "bytes", None, 256

    def encode(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)
        return ids, np.arange(1, len(ids) + 1, dtype=np.int64)

    def decode(self, ids) -> bytes:
        values = [int(i) for i in ids]
        if any(not 0 <= v < 256 for v in values):
            raise TokenizerError("byte ids must lie in [0, 256); this model's tokens are not bytes")
        return bytes(values)


BYTES = ByteTokenizer()


class SentencePieceTokenizer:
    """A SentencePiece model file (`.model`)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(f"{path} is a SentencePiece model: install it with "
                                 "`pip install -e '.[tokenizers]'` (sentencepiece, protobuf)") from None
        self.path = Path(path)
        self.model = sentencepiece.SentencePieceProcessor()
        try:
            self.model.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({str(error).splitlines()[0]})") from None
        self.vocab_size = int(self.model.GetPieceSize())

    def encode(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        ids, ends = [], []
        for start, chunk in _chunks(data):
            try:
                pieces = self.model.Encode(chunk, out_type="proto").pieces
            except ImportError:
                raise TokenizerError("SentencePiece's byte offsets need protobuf: "
                                     "`pip install -e '.[tokenizers]'`") from None
            ids += [piece.id for piece in pieces]
            ends += [start + piece.end for piece in pieces]  # piece.end: a byte offset in the chunk
        return np.asarray(ids, dtype=np.int64), _monotone(ends)

    def decode(self, ids) -> bytes:
        return self.model.Decode([int(i) for i in ids]).encode("utf-8")


class HFTokenizer:
    """A Hugging Face `tokenizers` file (`tokenizer.json`)."""

    kind = "tokenizers"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"{path} is a `tokenizers` file: install it with "
                                 "`pip install -e '.[tokenizers]'`") from None
        self.path = Path(path)
        try:
            self.model = Tokenizer.from_file(str(self.path))
        except Exception as error:  # the library raises its own Exception type for bad files
            raise TokenizerError(f"{self.path} is not a tokenizer.json ({str(error).splitlines()[0]})") from None
        self.vocab_size = int(self.model.get_vocab_size())

    def encode(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        ids, ends = [], []
        for start, chunk in _chunks(data):
            encoding = self.model.encode(chunk, add_special_tokens=False)
            byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in chunk])])  # char -> byte
            ids += encoding.ids
            ends += [start + int(byte_at[end]) for _, end in encoding.offsets]
        return np.asarray(ids, dtype=np.int64), _monotone(ends)

    def decode(self, ids) -> bytes:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")


def _chunks(data: bytes):
    """(byte offset, text) pieces of UTF-8 `data`, about CHUNK_BYTES each, cut after a newline where possible."""
    data = bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenizerError(f"the text is not UTF-8 (byte {error.start:,}); a tokenizer reads text, bytes-as-tokens "
                             "(no --tokenizer) read any file") from None
    start = 0
    while start < len(data):
        end = min(start + CHUNK_BYTES, len(data))
        if end < len(data):
            newline = data.rfind(b"\n", start, end)
            end = newline + 1 if newline > start else end
            while end < len(data) and (data[end] & 0xC0) == 0x80:  # not inside a character
                end += 1
        yield start, data[start:end].decode("utf-8")
        start = end


def _monotone(ends: list[int]) -> np.ndarray:
    """Byte ends as a non-decreasing int64 array (a token that maps to no text ends where the previous one did)."""
    return np.maximum.accumulate(np.asarray(ends, dtype=np.int64)) if ends else np.zeros(0, dtype=np.int64)


def load_tokenizer(path: str | Path | None):
    """The tokenizer in file `path` (`.model`: SentencePiece, `.json`: tokenizers); None: bytes."""
    if path is None:
        return BYTES
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found; give a SentencePiece .model or a tokenizer.json")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise TokenizerError(f"{path}: a tokenizer is a SentencePiece .model or a tokenizers .json file")


def find_tokenizer(directory: str | Path):
    """The tokenizer stored with a model: in `directory` (a run, a checkpoint or a model directory) or, for a
    checkpoint, in its run directory; bytes when there is none."""
    directory = Path(directory)
    places = [directory]
    if directory.parent.name == "checkpoints":
        places.append(directory.parent.parent)
    for place in places:
        for name in FOUND:
            if (place / name).is_file():
                return load_tokenizer(place / name)
    return BYTES


def store_tokenizer(tokenizer, directory: str | Path) -> Path | None:
    """Copy the tokenizer's file into `directory` under its stored name; None for bytes (nothing to store)."""
    if tokenizer.path is None:
        return None
    target = Path(directory) / STORED[tokenizer.kind]
    if target.resolve() != tokenizer.path.resolve():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(tokenizer.path, tmp)
        tmp.replace(target)
    return target
