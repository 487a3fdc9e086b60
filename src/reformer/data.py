"""Byte-level data: any file is a sequence of byte tokens (vocab 256), memory-mapped.

    data = ByteData.open("novel.txt")                 # numpy.memmap: nothing is read yet
    train, valid = data.split(valid_fraction=0.05)    # views of the same map, no copy
    sampler = WindowSampler(train, seq_len=1024, batch_size=8, generator=torch.Generator().manual_seed(0))
    ids, labels = sampler.next_batch()                # (8, 1024) int64 each
    loss = model(ids, labels=labels).loss
    for ids in eval_windows(valid, seq_len=1024): ...  # contiguous windows for bits per byte

The sampler interface, shared by `WindowSampler` (here) and `reformer.duplication.DuplicationSampler`:

    sampler.next_batch() -> (ids, labels)    also `sampler()` and `next(sampler)`
        ids, labels: (batch_size, length) int64. Pass both to the model as
        `model(ids, labels=labels)`; the model predicts labels[:, 1:] from
        logits[:, :-1] and ignores -100. Windows of text have labels = ids;
        the duplication task masks every position but the second copy.
    sampler.state_dict() -> torch.Tensor     the generator state (a uint8 tensor)
    sampler.load_state_dict(state)           restore it: the next batches repeat exactly

Randomness comes only from the `torch.Generator` given to the sampler, which the
sampler advances and never reseeds; the global RNG is never used. Distributed
data: every rank builds its sampler with an identically seeded generator and
its own `rank`. Each step, every rank draws the same global plan for
batch_size * world_size rows and keeps rows [rank * batch_size, (rank + 1) *
batch_size): the ranks read disjoint shards of one global batch, the
generators stay in step (so rank 0's state is everyone's), and the data order
equals that of one rank with batch_size * world_size.

Errors about files and lengths are `DataError` (a `ValueError`), one line each,
saying what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256  # one token per byte value
FETCH_HINT = "fetch one with `reformer data fetch crime-and-punishment`"


class DataError(ValueError):
    """A data file or a data setting that cannot work; the message says what to change."""


# --- bytes as tokens ------------------------------------------------------


def encode(text: str | bytes) -> torch.Tensor:
    """Byte ids of `text` (str is UTF-8 encoded): a (n,) int64 tensor with values in [0, 256)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray, memoryview)):
        raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
    if len(text) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()  # (n,)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Text of byte ids (any shape, read in order); invalid UTF-8 becomes U+FFFD."""
    values = torch.as_tensor(ids).flatten().tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    bad = [v for v in values if not 0 <= v < VOCAB_SIZE]
    if bad:
        raise ValueError(f"byte ids must lie in [0, 256), got {bad[:5]}; decode only the output of a byte-level model")
    return bytes(values).decode("utf-8", errors="replace")


# --- the data -------------------------------------------------------------


class ByteData:
    """A read-only 1-D uint8 array (a numpy.memmap of a file, or a view of one) and a name for messages."""

    def __init__(self, array: np.ndarray, name: str = "<bytes>"):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
            raise TypeError("ByteData wraps a 1-D numpy uint8 array; use ByteData.open(path) for a file")
        self.array = array  # (n,) uint8
        self.name = name

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ByteData":
        """Memory-map `path` read-only. Raises DataError for a missing, unreadable or empty file."""
        path = Path(path)
        _check_file(path)
        return cls(np.memmap(path, dtype=np.uint8, mode="r"), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "ByteData":
        """In-memory data (no file), e.g. for tests or a short prompt."""
        return cls(np.frombuffer(bytes(data), dtype=np.uint8), name)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __repr__(self) -> str:
        return f"ByteData({self.name!r}, {len(self):,} bytes)"

    def windows(self, starts: torch.Tensor | Sequence[int], length: int) -> torch.Tensor:
        """Rows data[s : s + length] for each start s: a (len(starts), length) int64 tensor (a copy)."""
        starts = [int(s) for s in (starts.tolist() if isinstance(starts, torch.Tensor) else starts)]
        if any(s < 0 or s + length > len(self) for s in starts):
            raise IndexError(f"a window of {length} bytes from starts {starts} leaves {self.name} ({len(self)} bytes)")
        rows = np.stack([self.array[s:s + length] for s in starts]) if starts else np.zeros((0, length), np.uint8)
        return torch.from_numpy(rows).long()  # (b, length)

    def split(self, valid_fraction: float = 0.05) -> tuple["ByteData", "ByteData"]:
        """(train, valid) views of this data, no copy: the last `valid_fraction` of the bytes is validation."""
        return split(self, valid_fraction)

    def byte_counts(self, starts: torch.Tensor | Sequence[int], length: int) -> int:
        """The bytes of text that the predicted tokens (all but the first) of these windows stand for."""
        return len(starts) * (length - 1)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} not found; give an existing file, or {FETCH_HINT}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a file inside it (e.g. its train file)")
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied; fix its permissions (chmod +r) or copy it") from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}; give a readable file") from None
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); give a file with text in it, or {FETCH_HINT}")


class TokenData(ByteData):
    """Token ids of a text (a 1-D int64 array) with the byte offset where each token's text ends (`ends`)."""

    def __init__(self, ids: np.ndarray, ends: np.ndarray, name: str = "<tokens>"):
        if ids.ndim != 1 or ends.shape != ids.shape:
            raise TypeError("TokenData takes 1-D token ids and their byte ends, of one length")
        self.array, self.ends, self.name = ids, ends, name

    def __repr__(self) -> str:
        return f"TokenData({self.name!r}, {len(self):,} tokens)"

    @classmethod
    def open(cls, path):
        raise TypeError("TokenData comes from open_tokens(path, tokenizer); ByteData.open maps bytes")

    @classmethod
    def from_bytes(cls, data, name="<bytes>"):
        raise TypeError("TokenData comes from a tokenizer (encode_data); ByteData.from_bytes holds bytes")

    def split(self, valid_fraction: float = 0.05) -> tuple["TokenData", "TokenData"]:
        """(train, valid): the first 1 - valid_fraction of the tokens and the rest (load_splits cuts bytes)."""
        if not 0.0 < valid_fraction < 1.0 or len(self) < 2:
            raise DataError(f"valid_fraction must be in (0, 1) and {self.name} hold 2 tokens or more")
        cut = len(self) - min(max(round(len(self) * valid_fraction), 1), len(self) - 1)
        return (TokenData(self.array[:cut], self.ends[:cut], f"{self.name} (train split)"),
                TokenData(self.array[cut:], self.ends[cut:], f"{self.name} (validation split)"))

    def byte_counts(self, starts: torch.Tensor | Sequence[int], length: int) -> int:
        starts = np.asarray([int(s) for s in (starts.tolist() if isinstance(starts, torch.Tensor) else starts)])
        return int((self.ends[starts + length - 1] - self.ends[starts]).sum()) if len(starts) else 0


def as_byte_data(data: ByteData | np.ndarray | bytes) -> ByteData:
    """Accept ByteData (or TokenData), a 1-D uint8 numpy array, or bytes."""
    if isinstance(data, ByteData):
        return data
    if isinstance(data, (bytes, bytearray)):
        return ByteData.from_bytes(data)
    return ByteData(data)


def open_tokens(path: str | os.PathLike, tokenizer=None) -> ByteData:
    """A file as tokens: its bytes memory-mapped (no tokenizer, or bytes), else encoded by `tokenizer`."""
    data = ByteData.open(path)
    if tokenizer is None or tokenizer.kind == "bytes":
        return data
    return encode_data(data.array, tokenizer, data.name)


def encode_data(array: np.ndarray, tokenizer, name: str) -> TokenData:
    ids, ends = tokenizer.encode(array.tobytes())
    if len(ids) == 0:
        raise DataError(f"{name} encodes to no tokens; give a file with text in it")
    return TokenData(ids, ends, f"{name} ({tokenizer.kind} tokens)")


def split(data: ByteData | np.ndarray | bytes, valid_fraction: float = 0.05) -> tuple[ByteData, ByteData]:
    """(train, valid): the first 1 - valid_fraction of the bytes and the rest, as views (no copy).

    The validation part has round(len * valid_fraction) bytes, at least 1, and
    leaves at least 1 byte for training.
    """
    data = as_byte_data(data)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}; e.g. 0.05 holds out the last 5%")
    n = len(data)
    if n < 2:
        raise DataError(f"{data.name} has {n} byte(s), too few to split into train and validation; give a longer file")
    n_valid = min(max(round(n * valid_fraction), 1), n - 1)
    cut = n - n_valid
    return (ByteData(data.array[:cut], f"{data.name} (train split)"),
            ByteData(data.array[cut:], f"{data.name} (validation split)"))


def load_splits(
    train_path: str | os.PathLike, valid_path: str | os.PathLike | None = None, valid_fraction: float = 0.05,
    tokenizer=None,
) -> tuple[ByteData, ByteData]:
    """(train, valid): two files (e.g. enwik8's train and valid), or one file split by `valid_fraction` (of its
    bytes); with a tokenizer, each part encoded on its own."""
    if valid_path is not None:
        return open_tokens(train_path, tokenizer), open_tokens(valid_path, tokenizer)
    train, valid = ByteData.open(train_path).split(valid_fraction)
    if tokenizer is None or tokenizer.kind == "bytes":
        return train, valid
    cut = len(train)
    while cut < len(train) + len(valid) - 1 and (int(valid.array[cut - len(train)]) & 0xC0) == 0x80:
        cut += 1  # not inside a UTF-8 character
    whole = np.concatenate([train.array, valid.array]) if cut != len(train) else None
    train_part, valid_part = (train.array, valid.array) if whole is None else (whole[:cut], whole[cut:])
    return (encode_data(train_part, tokenizer, train.name), encode_data(valid_part, tokenizer, valid.name))


# --- sampling -------------------------------------------------------------


class ShardedSampler:
    """Base of the samplers: one global plan per step, this rank's rows of it, a savable generator.

    Subclasses define `_draw_plan(rows)` (the random part, `rows` first, drawn
    from `self.generator`) and `_build(plan)` (the batch from this rank's rows).
    """

    shift_labels = True  # the model shifts labels by one (False: labels are aligned with the logits, as images')

    def __init__(self, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0), "
                            f"got {type(generator).__name__}")
        _check_positive("batch_size", batch_size)
        _check_positive("world_size", world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank!r}")
        self.batch_size = batch_size
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each (batch_size, length) int64: this rank's shard of the next global batch."""
        return self._build(self._my_rows())

    def next_batch_with_bytes(self) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(ids, labels, bytes): `next_batch` and the bytes of text its predicted tokens stand for (None when
        its tokens are not text)."""
        rows = self._my_rows()
        return (*self._build(rows), self._bytes(rows))

    def _my_rows(self) -> torch.Tensor:
        plan = self._draw_plan(self.batch_size * self.world_size)  # (batch_size * world_size, ...)
        return plan[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _bytes(self, plan: torch.Tensor) -> int | None:
        return None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> torch.Tensor:
        """The generator state (uint8 tensor, a copy); identical on every rank."""
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        """Restore a state from `state_dict()`: the following batches repeat those that followed it."""
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise TypeError("load_state_dict takes the uint8 tensor that state_dict() returned, "
                            f"got {type(state).__name__}")
        self.generator.set_state(state.cpu())

    def _draw_plan(self, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def _build(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class WindowSampler(ShardedSampler):
    """Random windows of `seq_len` bytes; labels = ids (the model shifts them itself).

    Starts are uniform over [0, len(data) - seq_len], drawn with torch.randint on
    `generator`; windows may overlap each other and across steps.
    """

    def __init__(
        self,
        data: ByteData | np.ndarray | bytes,
        seq_len: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(batch_size, generator, rank, world_size)
        self.data = as_byte_data(data)
        self.seq_len = seq_len
        check_window_fits(self.data, seq_len)

    def _draw_plan(self, rows: int) -> torch.Tensor:
        high = len(self.data) - self.seq_len + 1
        starts = torch.randint(0, high, (rows,), generator=self.generator, device=self.generator.device)
        return starts.cpu()  # (rows,)

    def _build(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.data.windows(plan, self.seq_len)  # (batch_size, seq_len)
        return ids, ids

    def _bytes(self, plan: torch.Tensor) -> int:
        return self.data.byte_counts(plan, self.seq_len)


def check_window_fits(data: ByteData, seq_len: int) -> None:
    """DataError unless `data` holds at least one full window of `seq_len` (>= 2) bytes."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2 (a window needs a byte to predict), got {seq_len!r}")
    if len(data) < seq_len:
        raise DataError(f"{data.name} has {len(data):,} bytes but a window needs seq_len = {seq_len:,}; "
                        f"give a smaller --seq-len (at most {len(data):,}) or more data")


def eval_windows(
    data: ByteData | np.ndarray | bytes, seq_len: int, max_windows: int | None = None
) -> Iterator[torch.Tensor]:
    """Contiguous (1, <= seq_len) int64 windows from the start of `data`, each starting at the last token of the
    one before: with `model(w, labels=w)` on each, every token but the first of `data` is predicted exactly
    once (a window's first token is its context). Weight the losses by `n_tokens`; the bytes those tokens
    stand for are `data.byte_counts([start], len(window))`. `max_windows` stops after that many windows.
    """
    data = as_byte_data(data)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2 (a window needs a byte to predict), got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise DataError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}")
    if len(data) < 2:
        raise DataError(f"{data.name} has {len(data)} byte(s): nothing to evaluate; give more validation data")
    return _eval_windows(data, seq_len, max_windows)


def _eval_windows(data: ByteData, seq_len: int, max_windows: int | None) -> Iterator[torch.Tensor]:
    for start in eval_window_starts(len(data), seq_len, max_windows):
        end = min(start + seq_len, len(data))
        yield torch.from_numpy(np.array(data.array[start:end])).long()[None]  # (1, end - start)


def eval_window_starts(n: int, seq_len: int, max_windows: int | None = None) -> list[int]:
    """The starts of `eval_windows` over n tokens: every seq_len - 1 tokens."""
    starts = list(range(0, n - 1, seq_len - 1))
    return starts if max_windows is None else starts[:max_windows]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
