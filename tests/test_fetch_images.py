"""reformer.fetch's image sets (MNIST, Fashion-MNIST, CIFAR-10): tiny fake sets served from a local HTTP server
(never the internet), or from a stand-in for Debian's Fashion-MNIST folder."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from reformer import fetch as fetch_module
from reformer.fetch import IMAGE_DATASETS, FetchError, FileDigest, ImageDataset, dataset_paths, fetch
from tests.conftest import local_http_server, without_proxies

DEBIAN_FASHION_MNIST = fetch_module.SYSTEM_FASHION_MNIST  # the real one, before any test patches it
KEYS = ("train", "test", "train-labels", "test-labels")  # what fetch returns for an image set, in order
rng = np.random.default_rng(0)

# --- tiny MNIST-style sets: 3 train and 2 test images of 28x28 ---

MNIST_ARRAYS = {
    "train": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    "test": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
    "train-labels": np.array([7, 0, 9], dtype=np.uint8),
    "test-labels": np.array([3, 1], dtype=np.uint8),
}
FASHION_ARRAYS = {key: (255 - array if key in ("train", "test") else 9 - array) for key, array in MNIST_ARRAYS.items()}
IDX_NAMES = fetch_module.IDX_FILES  # key -> file name


def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, *images.shape) + images.tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.tobytes()


def idx_bytes(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """file name -> the uncompressed IDX file"""
    return {IDX_NAMES[key]: (idx_labels if key.endswith("labels") else idx_images)(array)
            for key, array in arrays.items()}


def gz(data: bytes, level: int = 9) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


MNIST_FILES = {name: gz(data) for name, data in idx_bytes(MNIST_ARRAYS).items()}
FASHION_FILES = {name: gz(data) for name, data in idx_bytes(FASHION_ARRAYS).items()}

# --- a tiny CIFAR-10 binary archive: batches of 1, 2, 1, 1, 1 train images and 2 test images ---

CIFAR_BATCH_SIZES = {**{f"data_batch_{i}.bin": n for i, n in enumerate((1, 2, 1, 1, 1), 1)}, "test_batch.bin": 2}
CIFAR_PLANES = {name: rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for name, n in CIFAR_BATCH_SIZES.items()}
CIFAR_LABELS = {name: rng.integers(0, 10, n, dtype=np.uint8) for name, n in CIFAR_BATCH_SIZES.items()}


def cifar_batch(name: str) -> bytes:
    """Records of a label byte, then the R, G and B planes (1024 bytes each, row-major)."""
    return b"".join(bytes([label]) + planes.tobytes()
                    for label, planes in zip(CIFAR_LABELS[name], CIFAR_PLANES[name]))


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CIFAR_MEMBERS = {"cifar-10-batches-bin/batches.meta.txt": b"airplane\nautomobile\n",
                 **{f"cifar-10-batches-bin/{name}": cifar_batch(name) for name in CIFAR_BATCH_SIZES}}
CIFAR_ARCHIVE = tar_gz(CIFAR_MEMBERS)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digests(files: dict[str, bytes]) -> tuple[FileDigest, ...]:
    return tuple(FileDigest(name, len(data), sha(data)) for name, data in files.items())


# --- the server, and the registry pointed at it ---

class Handler(BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes) and records every path asked for."""

    def do_GET(self) -> None:  # http.server's naming
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    files = {**{f"/mnist/{name}": data for name, data in MNIST_FILES.items()},
             **{f"/fashion/{name}": data for name, data in FASHION_FILES.items()},
             "/cifar/cifar-10-binary.tar.gz": CIFAR_ARCHIVE}
    with local_http_server(Handler, files) as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No proxy between us and 127.0.0.1; the default cache inside tmp_path; no Debian copy of Fashion-MNIST."""
    without_proxies(monkeypatch)
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch_module, "SYSTEM_FASHION_MNIST", tmp_path / "no-debian-copy")


@pytest.fixture
def tiny(monkeypatch, server):
    """The three image sets replaced by the tiny ones `server` serves."""
    monkeypatch.setitem(IMAGE_DATASETS, "mnist", ImageDataset(
        name="mnist", base_url=server.url + "/mnist/", files=digests(MNIST_FILES), layout="idx"))
    monkeypatch.setitem(IMAGE_DATASETS, "fashion-mnist", ImageDataset(
        name="fashion-mnist", base_url=server.url + "/fashion/", files=digests(FASHION_FILES), layout="idx"))
    monkeypatch.setitem(IMAGE_DATASETS, "cifar10", ImageDataset(
        name="cifar10", base_url=server.url + "/cifar/",
        files=digests({"cifar-10-binary.tar.gz": CIFAR_ARCHIVE}), layout="cifar"))
    return server


@pytest.fixture
def debian_copy(monkeypatch, tmp_path):
    """A stand-in for Debian's folder: the fake Fashion-MNIST recompressed (other .gz bytes, same contents)."""
    folder = tmp_path / "usr-share-datasets-fashion-mnist"
    folder.mkdir()
    contents = idx_bytes(FASHION_ARRAYS)
    for name, data in contents.items():
        (folder / name).write_bytes(gz(data, level=1))
        assert (folder / name).read_bytes() != FASHION_FILES[name]  # as Debian's: not the served bytes
    monkeypatch.setattr(fetch_module, "SYSTEM_FASHION_MNIST", folder)
    monkeypatch.setattr(fetch_module, "SYSTEM_FASHION_MNIST_CONTENTS", digests(contents))
    return folder


def load(files: dict[str, Path]) -> dict[str, np.ndarray]:
    return {key: np.load(path) for key, path in files.items()}


def assert_arrays(files: dict[str, Path], expected: dict[str, np.ndarray]) -> None:
    assert tuple(files) == KEYS
    arrays = load(files)
    for key in KEYS:
        assert arrays[key].dtype == np.uint8, key
        assert arrays[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)


def cifar_expected() -> dict[str, np.ndarray]:
    train = [name for name in CIFAR_BATCH_SIZES if name.startswith("data_batch")]
    return {
        "train": np.concatenate([CIFAR_PLANES[name] for name in train]).transpose(0, 2, 3, 1),
        "test": CIFAR_PLANES["test_batch.bin"].transpose(0, 2, 3, 1),
        "train-labels": np.concatenate([CIFAR_LABELS[name] for name in train]),
        "test-labels": CIFAR_LABELS["test_batch.bin"],
    }


# --- the tests ---

def test_registered_image_sets_are_the_official_files():
    mnist, fashion, cifar = (IMAGE_DATASETS[name] for name in ("mnist", "fashion-mnist", "cifar10"))
    assert mnist.base_url == "https://storage.googleapis.com/cvdf-datasets/mnist/"
    assert mnist.files == (
        FileDigest("train-images-idx3-ubyte.gz", 9912422,
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        FileDigest("train-labels-idx1-ubyte.gz", 28881,
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        FileDigest("t10k-images-idx3-ubyte.gz", 1648877,
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        FileDigest("t10k-labels-idx1-ubyte.gz", 4542,
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )
    assert fashion.base_url == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert fashion.files == (
        FileDigest("train-images-idx3-ubyte.gz", 26421880,
                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        FileDigest("train-labels-idx1-ubyte.gz", 29515,
                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        FileDigest("t10k-images-idx3-ubyte.gz", 4422102,
                   "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        FileDigest("t10k-labels-idx1-ubyte.gz", 5148,
                   "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    )
    assert cifar.base_url + cifar.files[0].filename == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert cifar.files == (FileDigest("cifar-10-binary.tar.gz", 170052171,
                                      "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),)
    assert (mnist.layout, fashion.layout, cifar.layout) == ("idx", "idx", "cifar")
    assert DEBIAN_FASHION_MNIST == Path("/usr/share/datasets/fashion-mnist")
    assert {(d.filename, d.size, d.sha256) for d in fetch_module.SYSTEM_FASHION_MNIST_CONTENTS} == {
        ("t10k-images-idx3-ubyte.gz", 7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        ("t10k-labels-idx1-ubyte.gz", 10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        ("train-images-idx3-ubyte.gz", 47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        ("train-labels-idx1-ubyte.gz", 60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    }


def test_names():
    assert fetch_module.IMAGE_SETS == ("mnist", "fashion-mnist", "cifar10")
    assert fetch_module.ARRAY_KEYS == KEYS
    assert fetch_module.NAMES == ("crime-and-punishment", "enwik8", "mnist", "fashion-mnist", "cifar10")
    with pytest.raises(FetchError, match="unknown dataset 'svhn'; known datasets: .*, mnist, fashion-mnist, cifar10$"):
        fetch("svhn")


def test_image_set_entries_are_checked():
    with pytest.raises(ValueError, match="idx layout needs the files"):
        ImageDataset(name="x", base_url="http://h/", files=digests({"a.gz": b"a"}), layout="idx")
    with pytest.raises(ValueError, match="layout must be one of"):
        ImageDataset(name="x", base_url="http://h/", files=digests({"a.gz": b"a"}), layout="png")
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        FileDigest("a.gz", 1, "ABC")


def test_mnist_downloads_verifies_and_writes_arrays(tiny, tmp_path):
    files = fetch("mnist", tmp_path, progress=False)
    folder = tmp_path / "mnist"
    assert files == {key: folder / f"{key}.npy" for key in KEYS}
    assert_arrays(files, MNIST_ARRAYS)
    assert sorted(tiny.requests) == sorted(f"/mnist/{name}" for name in MNIST_FILES)
    assert all((folder / name).read_bytes() == data for name, data in MNIST_FILES.items())  # downloads kept
    assert not list(tmp_path.rglob("*.part"))
    assert dataset_paths("mnist", tmp_path) == files


def test_fashion_mnist_downloads_without_a_debian_copy(tiny, tmp_path):
    assert_arrays(fetch("fashion-mnist", tmp_path, progress=False), FASHION_ARRAYS)
    assert sorted(tiny.requests) == sorted(f"/fashion/{name}" for name in FASHION_FILES)


def test_cifar10_reads_the_binary_batches_channels_last(tiny, tmp_path):
    files = fetch("cifar10", tmp_path, progress=False)
    assert files == dataset_paths("cifar10", tmp_path) == {key: tmp_path / "cifar10" / f"{key}.npy" for key in KEYS}
    assert_arrays(files, cifar_expected())
    train = np.load(files["train"])
    assert train.shape == (6, 32, 32, 3)
    # a pixel's R, G, B come from the three planes of its record: label byte, then 1024 bytes per plane
    record = cifar_batch("data_batch_2.bin")[fetch_module.CIFAR_RECORD:]  # the batch's second image: train[2]
    for row, column in ((0, 0), (0, 31), (5, 17), (31, 0), (31, 31)):
        offset = 1 + row * 32 + column
        assert tuple(train[2, row, column]) == (record[offset], record[offset + 1024], record[offset + 2048])
    assert np.load(files["train-labels"])[2] == record[0]
    assert tiny.requests == ["/cifar/cifar-10-binary.tar.gz"]


def test_second_call_uses_no_network(tiny, tmp_path):
    first = {name: fetch(name, progress=False) for name in ("mnist", "fashion-mnist", "cifar10")}
    assert first["mnist"]["train"].parent == tmp_path / "cache" / "mnist"
    asked = len(tiny.requests)
    assert asked == 9
    tiny.shutdown()
    tiny.server_close()
    assert {name: fetch(name, progress=False) for name in first} == first
    assert len(tiny.requests) == asked


def test_an_incomplete_array_is_rebuilt_from_the_downloads_without_network(tiny, tmp_path):
    files = fetch("cifar10", tmp_path, progress=False)
    files["train"].write_bytes(files["train"].read_bytes()[:-1])  # truncated
    files["test-labels"].unlink()
    assert_arrays(fetch("cifar10", tmp_path, progress=False), cifar_expected())
    assert len(tiny.requests) == 1


def test_a_corrupted_download_is_refused_and_leaves_no_arrays(tiny, tmp_path):
    good = tiny.files["/mnist/t10k-images-idx3-ubyte.gz"]
    tiny.files["/mnist/t10k-images-idx3-ubyte.gz"] = good[:-9] + bytes([good[-9] ^ 1]) + good[-8:]  # same size
    with pytest.raises(FetchError, match=r"t10k-images-idx3-ubyte.gz gave a file with sha256 \w+, expected "):
        fetch("mnist", tmp_path, progress=False)
    folder = tmp_path / "mnist"
    assert not list(folder.glob("*.npy*")) and not (folder / "t10k-images-idx3-ubyte.gz").exists()

    tiny.files["/mnist/t10k-images-idx3-ubyte.gz"] = good  # the next run fetches only what it lacks
    lacking = [f"/mnist/{name}" for name in MNIST_FILES if not (folder / name).exists()]
    assert "/mnist/t10k-images-idx3-ubyte.gz" in lacking and "/mnist/train-images-idx3-ubyte.gz" not in lacking
    tiny.requests.clear()
    assert_arrays(fetch("mnist", tmp_path, progress=False), MNIST_ARRAYS)
    assert tiny.requests == lacking


@pytest.mark.parametrize("bad_file, message", [
    (gz(idx_labels(MNIST_ARRAYS["train-labels"])), r"not an IDX image file \(magic number 2049, expected 2051\)"),
    (gz(idx_images(np.zeros((3, 32, 32), np.uint8))), "holds 32x32 images, expected 28x28"),
    (gz(idx_images(MNIST_ARRAYS["train"])[:-1]), "holds 2,351 bytes after its header, which announces 2,352"),
    (gz(idx_images(MNIST_ARRAYS["train"][:2])), "holds 2 images but train-labels-idx1-ubyte.gz 3 labels"),
    (b"not gzip", "cannot decompress .*train-images-idx3-ubyte.gz"),
])
def test_a_bad_idx_file_is_one_error_and_no_arrays(tiny, monkeypatch, tmp_path, bad_file, message):
    files = {**MNIST_FILES, "train-images-idx3-ubyte.gz": bad_file}  # verified: the registry has its digest
    tiny.files["/mnist/train-images-idx3-ubyte.gz"] = bad_file
    monkeypatch.setitem(IMAGE_DATASETS, "mnist", ImageDataset(
        name="mnist", base_url=tiny.url + "/mnist/", files=digests(files), layout="idx"))
    with pytest.raises(FetchError, match=message + ".*delete .* run again") as caught:
        fetch("mnist", tmp_path, progress=False)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "mnist").glob("*.npy*"))


@pytest.mark.parametrize("members, message", [
    ({name: data for name, data in CIFAR_MEMBERS.items() if not name.endswith("test_batch.bin")},
     "lacks test_batch.bin, so it is not CIFAR-10's binary version"),
    ({**CIFAR_MEMBERS, "cifar-10-batches-bin/data_batch_3.bin": b"\x00" * 3074}, "not a whole number of 3073-byte"),
    ({**CIFAR_MEMBERS, "cifar-10-batches-bin/test_batch.bin": b"\x0a" * 3073}, "has labels above 9"),
])
def test_a_bad_cifar_archive_is_one_error_and_no_arrays(tiny, monkeypatch, tmp_path, members, message):
    archive = tar_gz(members)
    tiny.files["/cifar/cifar-10-binary.tar.gz"] = archive
    monkeypatch.setitem(IMAGE_DATASETS, "cifar10", ImageDataset(
        name="cifar10", base_url=tiny.url + "/cifar/", files=digests({"cifar-10-binary.tar.gz": archive}),
        layout="cifar"))
    with pytest.raises(FetchError, match=message + ".*delete .* run again"):
        fetch("cifar10", tmp_path, progress=False)
    assert not list((tmp_path / "cifar10").glob("*.npy*"))


def test_the_debian_copy_is_used_without_network(tiny, debian_copy, tmp_path):
    files = fetch("fashion-mnist", tmp_path, progress=False)
    assert_arrays(files, FASHION_ARRAYS)
    assert tiny.requests == []
    assert sorted(path.name for path in (tmp_path / "fashion-mnist").iterdir()) == sorted(
        f"{key}.npy" for key in KEYS)  # nothing downloaded
    assert fetch("mnist", tmp_path, progress=False)  # only Fashion-MNIST has a Debian copy
    assert len(tiny.requests) == 4


def test_a_debian_copy_with_other_contents_is_refused(tiny, debian_copy, tmp_path):
    (debian_copy / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_labels(np.array([3, 2], np.uint8))))
    with pytest.raises(FetchError, match=r"t10k-labels-idx1-ubyte.gz decompresses to 10 bytes with sha256 \w+, "
                                         r"expected 10 bytes with sha256 \w+; reinstall the package "
                                         r"dataset-fashion-mnist, or pass --url "):
        fetch("fashion-mnist", tmp_path, progress=False)
    assert not list((tmp_path / "fashion-mnist").glob("*.npy*"))
    assert tiny.requests == []


def test_an_incomplete_debian_copy_is_ignored(tiny, debian_copy, tmp_path):
    (debian_copy / "train-images-idx3-ubyte.gz").unlink()
    assert_arrays(fetch("fashion-mnist", tmp_path, progress=False), FASHION_ARRAYS)
    assert len(tiny.requests) == 4


def test_url_is_a_base_url_to_which_each_file_name_is_appended(tiny, debian_copy, tmp_path):
    tiny.files.update({f"/mirror/{name}": data for name, data in FASHION_FILES.items()})
    files = fetch("fashion-mnist", tmp_path, url=tiny.url + "/mirror", progress=False)  # skips the Debian copy
    assert_arrays(files, FASHION_ARRAYS)
    assert sorted(tiny.requests) == sorted(f"/mirror/{name}" for name in FASHION_FILES)

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-binary.tar.gz").write_bytes(CIFAR_ARCHIVE)
    assert_arrays(fetch("cifar10", tmp_path, url=mirror.as_uri() + "/", progress=False), cifar_expected())
    assert len(tiny.requests) == 4


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_debian_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch_module, "SYSTEM_FASHION_MNIST", DEBIAN_FASHION_MNIST)
    arrays = load(fetch("fashion-mnist", tmp_path, progress=False))
    assert {key: array.shape for key, array in arrays.items()} == {
        "train": (60000, 28, 28), "test": (10000, 28, 28), "train-labels": (60000,), "test-labels": (10000,)}
    assert arrays["train-labels"][:3].tolist() == [9, 0, 0] and arrays["test-labels"][:3].tolist() == [9, 2, 1]


def test_the_command_line_fetches_a_set_and_trains_and_scores_on_it_by_name(tiny, capsys, tmp_path):
    from reformer.cli import main

    assert main(["data", "fetch", "cifar10"]) == 0  # into $REFORMER_CACHE
    assert "train:" in capsys.readouterr().out
    model = ["--d-model", "32", "--d-head", "16", "--d-ff", "32", "--attn-layers", "local", "--local-chunk-size",
             "256", "--n-hashes", "1"]
    run = tmp_path / "run"
    assert main(["train", "--task", "images", "--data", "cifar10", "--out", str(run), "--steps", "1",
                 "--batch-size", "2", "--no-progress", *model]) == 0
    assert '"data": "cifar10"' in (run / "train.json").read_text()  # the name, found wherever the run goes
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", "cifar10", "--no-progress"]) == 0
    assert "cifar10: 2 images (6,144 sub-pixels)" in capsys.readouterr().out  # the test split
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 0
