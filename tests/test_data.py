"""Byte data: memory-mapped files, splits, random windows (seeded, resumable, sharded), eval windows, errors."""

from __future__ import annotations

import os
import pathlib
import tracemalloc

import numpy as np
import pytest
import torch

from reformer.data import ByteData, DataError, WindowSampler, decode, encode, eval_windows, load_splits, split
from tests.conftest import seeded


def write(tmp_path, content: bytes, name: str = "data.txt") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def ramp(n: int) -> bytes:
    """Byte i is i % 256: any contiguous slice shorter than 256 steps by +1 (mod 256)."""
    return bytes(i % 256 for i in range(n))


def assert_contiguous(ids: torch.Tensor) -> None:
    steps = (ids[:, 1:] - ids[:, :-1]) % 256
    assert bool((steps == 1).all()), "every window must be a contiguous slice of the ramp"


# --- files and memory mapping --------------------------------------------


def test_open_memory_maps_and_split_views_do_not_copy(tmp_path):
    data = ByteData.open(write(tmp_path, ramp(1000)))
    assert isinstance(data.array, np.memmap) and len(data) == 1000
    train, valid = data.split(0.1)
    for part in (train, valid):
        assert isinstance(part.array, np.memmap), "a slice of a memmap stays a memmap view"
        assert np.shares_memory(part.array, data.array)
    assert (len(train), len(valid)) == (900, 100)
    assert bytes(valid.array) == ramp(1000)[900:]


def test_a_large_file_costs_no_python_memory(tmp_path):
    path = tmp_path / "big.bin"
    with path.open("wb") as f:
        f.truncate(100 << 20)  # 100 MiB, sparse: instant to make
    tracemalloc.start()
    try:
        train, valid = ByteData.open(path).split()
        ids, _ = WindowSampler(train, 512, 4, seeded(0)).next_batch()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids.shape == (4, 512)
    assert peak < 1 << 20, f"opening and sampling a 100 MiB file allocated {peak:,} bytes"


def test_binary_non_utf8_file_is_fine(tmp_path):
    content = bytes(range(256)) * 4 + b"\xff\xfe\xc3"
    data = ByteData.open(write(tmp_path, content, "blob.bin"))
    ids, labels = WindowSampler(data, 64, 3, seeded(0)).next_batch()
    assert ids.dtype == torch.int64 and int(ids.max()) < 256 and torch.equal(ids, labels)
    assert isinstance(decode(ids[0]), str)
    windows = list(eval_windows(data, 100))
    assert bytes(torch.cat([windows[0][0]] + [w[0, 1:] for w in windows[1:]]).tolist()) == content


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found.*reformer data fetch crime-and-punishment"):
        ByteData.open(tmp_path / "nope.txt")


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        ByteData.open(tmp_path)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        ByteData.open(write(tmp_path, b""))


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, b"secret")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "open", denied)
    with pytest.raises(DataError, match="permission denied"):
        ByteData.open(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path):
    path = write(tmp_path, b"secret")
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        ByteData.open(path)


def test_file_too_short_for_the_window(tmp_path):
    data = ByteData.open(write(tmp_path, b"x" * 100))
    with pytest.raises(DataError, match=r"has 100 bytes but a window needs seq_len = 128.*--seq-len"):
        WindowSampler(data, 128, 2, seeded(0))
    WindowSampler(data, 100, 2, seeded(0)).next_batch()  # exactly one window fits


def test_messages_are_one_line(tmp_path):
    for make in (lambda: ByteData.open(tmp_path / "nope"), lambda: ByteData.open(tmp_path),
                 lambda: ByteData.open(write(tmp_path, b"")),
                 lambda: WindowSampler(ByteData.from_bytes(b"ab"), 8, 1, seeded(0))):
        with pytest.raises(DataError) as info:
            make()
        assert "\n" not in str(info.value)


# --- splits ---------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, n_valid", [(1000, 0.05, 50), (1000, 0.5, 500), (10, 0.01, 1), (3, 0.99, 2)])
def test_split_sizes(n, fraction, n_valid):
    train, valid = split(ByteData.from_bytes(ramp(n)), fraction)
    assert (len(train), len(valid)) == (n - n_valid, n_valid)
    assert bytes(train.array) + bytes(valid.array) == ramp(n)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(DataError, match="valid_fraction"):
        split(ByteData.from_bytes(ramp(10)), fraction)


def test_load_splits_from_one_or_two_files(tmp_path):
    train, valid = load_splits(write(tmp_path, ramp(200)), valid_fraction=0.25)
    assert (len(train), len(valid)) == (150, 50)
    train, valid = load_splits(write(tmp_path, ramp(200), "train"), write(tmp_path, b"v" * 30, "valid"))
    assert (len(train), len(valid)) == (200, 30) and isinstance(valid.array, np.memmap)
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "train", tmp_path / "missing")


# --- random windows -------------------------------------------------------


def test_windows_lie_inside_the_data_and_reach_both_ends():
    data = ByteData.from_bytes(ramp(42))
    sampler = WindowSampler(data, 40, 8, seeded(0))
    seen = set()
    for _ in range(10):
        ids, labels = sampler.next_batch()
        assert ids.shape == (8, 40) and ids.dtype == torch.int64 and torch.equal(ids, labels)
        assert_contiguous(ids)
        seen.update(ids[:, 0].tolist())
    assert seen == {0, 1, 2}, "starts are uniform over [0, len - seq_len], both ends included"


def test_same_seed_same_windows():
    data = ByteData.from_bytes(ramp(5000))
    a, b = WindowSampler(data, 64, 4, seeded(7)), WindowSampler(data, 64, 4, seeded(7))
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    assert not torch.equal(a()[0], WindowSampler(data, 64, 4, seeded(8))()[0])


def test_saved_state_replays_the_next_batches():
    data = ByteData.from_bytes(ramp(5000))
    sampler = WindowSampler(data, 64, 4, seeded(3))
    sampler.next_batch(), sampler.next_batch()
    state = sampler.state_dict()
    assert isinstance(state, torch.Tensor) and state.dtype == torch.uint8
    expected = [next(sampler)[0] for _ in range(3)]
    resumed = WindowSampler(data, 64, 4, seeded(999))
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()[0], want)


def test_rank_shards_are_slices_of_the_global_batch():
    data = ByteData.from_bytes(ramp(5000))
    whole = WindowSampler(data, 32, 6, seeded(5))
    ranks = [WindowSampler(data, 32, 3, seeded(5), rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        global_ids, _ = whole.next_batch()
        shards = [r.next_batch()[0] for r in ranks]
        assert torch.equal(shards[0], global_ids[:3]) and torch.equal(shards[1], global_ids[3:])
    assert torch.equal(ranks[0].state_dict(), ranks[1].state_dict()), "the ranks' generators stay in step"


def test_sampler_argument_checks():
    data = ByteData.from_bytes(ramp(100))
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(data, 8, 2, seeded(0), rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        WindowSampler(data, 8, 0, seeded(0))
    with pytest.raises(TypeError, match="torch.Generator"):
        WindowSampler(data, 8, 2, 0)
    with pytest.raises(DataError, match="seq_len"):
        WindowSampler(data, 1, 2, seeded(0))
    with pytest.raises(TypeError, match="state_dict"):
        WindowSampler(data, 8, 2, seeded(0)).load_state_dict({"generator": 1})


# --- evaluation windows ---------------------------------------------------


@pytest.mark.parametrize("n, seq_len, lengths", [(10, 5, [5, 5, 2]), (11, 4, [4, 4, 4, 2]), (10, 3, [3, 3, 3, 3, 2]),
                                                 (7, 100, [7])])
def test_eval_windows_predict_every_byte_but_the_first_once(n, seq_len, lengths):
    """Each window starts at the last byte of the one before: its first byte is context, the rest predicted."""
    data = ByteData.from_bytes(ramp(n))
    windows = list(eval_windows(data, seq_len))
    assert [w.shape for w in windows] == [(1, k) for k in lengths]
    for before, after in zip(windows, windows[1:]):
        assert before[0, -1] == after[0, 0]
    predicted = torch.cat([w[0, 1:] for w in windows])
    assert bytes(predicted.tolist()) == ramp(n)[1:]
    assert sum(data.byte_counts([0], k) for k in lengths) == n - 1


def test_eval_windows_max_windows():
    windows = list(eval_windows(ByteData.from_bytes(ramp(100)), 8, max_windows=3))
    assert len(windows) == 3 and bytes(windows[2][0].tolist()) == ramp(100)[14:22]


def test_eval_windows_reads_a_memmap(tmp_path):
    data = ByteData.open(write(tmp_path, ramp(300)))
    _, valid = data.split(0.5)
    windows = list(eval_windows(valid, 64))
    assert bytes(torch.cat([windows[0][0]] + [w[0, 1:] for w in windows[1:]]).tolist()) == ramp(300)[150:]
    with pytest.raises(DataError, match="nothing to evaluate"):
        eval_windows(ByteData.from_bytes(b"a"), 8)


# --- encode and decode ----------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello", "Raskolnikov — Раскольников, 罪と罰 🪓"])
def test_encode_decode_round_trip(text):
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text.encode()),)
    assert decode(ids) == text
    assert torch.equal(encode(text.encode()), ids)


def test_decode_replaces_invalid_utf8_and_rejects_non_bytes():
    assert decode([104, 0xFF, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        decode(torch.tensor([1, 300]))
