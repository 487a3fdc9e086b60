"""Download the datasets the examples train on, check them, and prepare them.

`fetch("enwik8")` downloads `enwik8.zip` into the cache directory (`$REFORMER_CACHE`,
else `~/.cache/reformer`), checks its size and sha256, unzips `enwik8` and splits it
into the standard 90M / 5M / 5M bytes of train / valid / test. `fetch("crime-and-punishment")`
downloads Project Gutenberg #2554 as plain text. Each dataset lives in its own folder,
`<cache>/<name>/`; `fetch` returns the paths of the files it produced.

How a download behaves:
- it goes to `<file>.part` and is renamed to `<file>` only after its size and sha256 check out,
  so a file under its final name is always a verified one;
- an interrupted download leaves the `.part`; the next call resumes it with an HTTP
  `Range: bytes=N-` request, and starts over if the server does not support ranges;
- a finished download with the wrong sha256 is deleted, so the next call starts clean;
- when the final files are already there, `fetch` touches no network.

Only the standard library talks to the network (urllib), so `file://` URLs work too
(they are copied from the start each time, never resumed).

Image sets: `fetch("mnist")`, `fetch("fashion-mnist")` and `fetch("cifar10")` download their official
files (each checked by size and sha256 like the text sets), then write uint8 arrays with `np.save`:
`train.npy` and `test.npy` (N, 28, 28) for the MNISTs and (N, 32, 32, 3) for CIFAR-10 (channels last,
R, G, B), with `train-labels.npy` and `test-labels.npy` (N,). When Debian's package `dataset-fashion-mnist`
is installed, Fashion-MNIST is read from its copy (`SYSTEM_FASHION_MNIST`) with no network; those files are
recompressed, so their decompressed contents are the ones checked. CIFAR-10's tar.gz is read in memory,
never extracted, and never unpickled (it is the binary version).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import re
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_TIMEOUT = 30.0  # seconds to connect, and between two reads of a download
CHUNK = 1 << 20  # bytes per read / write / hash update
USER_AGENT = "reformer-fetch (Python urllib)"


class FetchError(Exception):
    """A dataset could not be fetched; the message is one line that says what to do."""


def _check_digest(what: str, size: int, sha256: str) -> None:
    if size < 1:
        raise ValueError(f"{what}: size must be positive, got {size}")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"{what}: sha256 must be 64 lowercase hex digits, got {sha256!r}")


@dataclass(frozen=True)
class Dataset:
    name: str  # the name `fetch` and the CLI accept
    url: str  # default download location (http, https or file)
    filename: str  # name of the downloaded file inside `<cache>/<name>/`
    size: int  # bytes of the downloaded file
    sha256: str  # hex digest of the downloaded file
    unzip: str | None = None  # post-processing: extract this member of the downloaded zip archive
    splits: tuple[int, int, int] | None = None  # post-processing: train/valid/test bytes, in order

    def __post_init__(self) -> None:
        _check_digest(f"Dataset {self.name!r}", self.size, self.sha256)
        if self.splits is not None and (len(self.splits) != len(SPLIT_NAMES) or min(self.splits) < 1):
            raise ValueError(f"Dataset {self.name!r}: splits must be three positive byte counts, got {self.splits}")


DATASETS: dict[str, Dataset] = {
    "enwik8": Dataset(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        filename="enwik8.zip",
        size=36_445_475,
        sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        unzip="enwik8",
        splits=(90_000_000, 5_000_000, 5_000_000),
    ),
    "crime-and-punishment": Dataset(
        name="crime-and-punishment",
        url="https://www.gutenberg.org/files/2554/2554.txt",
        filename="crime-and-punishment-2554.txt",
        size=1_176_893,
        sha256="678b3d46a1f1dbef9d702744611362c8b3a8d5413b3b410605730b9ea5f75a95",
    ),
}


@dataclass(frozen=True)
class FileDigest:
    """A file's name with the size and sha256 it must have."""

    filename: str
    size: int  # bytes
    sha256: str  # hex digest

    def __post_init__(self) -> None:
        _check_digest(repr(self.filename), self.size, self.sha256)


IMAGE_LAYOUTS = ("idx", "cifar")
ARRAY_KEYS = ("train", "test", "train-labels", "test-labels")  # the arrays of an image set, each `<key>.npy`
IDX_FILES = {  # for the "idx" layout: the gzipped IDX file each array comes from
    "train": "train-images-idx3-ubyte.gz",
    "test": "t10k-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class ImageDataset:
    name: str  # the name `fetch` and the CLI accept
    base_url: str  # the folder the files are downloaded from: each file name is appended to it
    files: tuple[FileDigest, ...]  # the downloads, kept in `<cache>/<name>/`
    layout: str  # "idx": the four IDX_FILES (MNIST's format); "cifar": one tar.gz of CIFAR-10 binary batches

    def __post_init__(self) -> None:
        names = sorted(file.filename for file in self.files)
        if self.layout not in IMAGE_LAYOUTS:
            raise ValueError(f"ImageDataset {self.name!r}: layout must be one of {IMAGE_LAYOUTS}, got {self.layout!r}")
        if self.layout == "idx" and names != sorted(IDX_FILES.values()):
            raise ValueError(f"ImageDataset {self.name!r}: the idx layout needs the files {sorted(IDX_FILES.values())}")
        if self.layout == "cifar" and len(names) != 1:
            raise ValueError(f"ImageDataset {self.name!r}: the cifar layout needs one tar.gz file, got {names}")


IMAGE_DATASETS: dict[str, ImageDataset] = {
    "mnist": ImageDataset(
        name="mnist",
        # the mirror TensorFlow uses: yann.lecun.com no longer serves the files
        base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        files=(
            FileDigest("train-images-idx3-ubyte.gz", 9_912_422,
                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            FileDigest("train-labels-idx1-ubyte.gz", 28_881,
                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            FileDigest("t10k-images-idx3-ubyte.gz", 1_648_877,
                       "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            FileDigest("t10k-labels-idx1-ubyte.gz", 4_542,
                       "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
        layout="idx",
    ),
    "fashion-mnist": ImageDataset(
        name="fashion-mnist",
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's official address
        files=(
            FileDigest("train-images-idx3-ubyte.gz", 26_421_880,
                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            FileDigest("train-labels-idx1-ubyte.gz", 29_515,
                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            FileDigest("t10k-images-idx3-ubyte.gz", 4_422_102,
                       "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            FileDigest("t10k-labels-idx1-ubyte.gz", 5_148,
                       "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ),
        layout="idx",
    ),
    "cifar10": ImageDataset(
        name="cifar10",
        base_url="https://www.cs.toronto.edu/~kriz/",  # Alex Krizhevsky's page; the binary version, not pickles
        files=(
            FileDigest("cifar-10-binary.tar.gz", 170_052_171,
                       "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
        ),
        layout="cifar",
    ),
}
IMAGE_SETS = tuple(IMAGE_DATASETS)  # ("mnist", "fashion-mnist", "cifar10")
NAMES = (*sorted(DATASETS), *IMAGE_SETS)  # every name `fetch` (and `reformer data fetch`) accepts

# Debian's package dataset-fashion-mnist installs Fashion-MNIST here, recompressed: the .gz bytes differ from
# the official ones, so what is checked is each decompressed file (IDX, same name without .gz).
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SYSTEM_FASHION_MNIST_CONTENTS = (
    FileDigest("train-images-idx3-ubyte.gz", 47_040_016,
               "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    FileDigest("train-labels-idx1-ubyte.gz", 60_008,
               "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    FileDigest("t10k-images-idx3-ubyte.gz", 7_840_016,
               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    FileDigest("t10k-labels-idx1-ubyte.gz", 10_008,
               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
)


def default_cache_dir() -> Path:
    """`$REFORMER_CACHE` if set, else `~/.cache/reformer`."""
    override = os.environ.get("REFORMER_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "reformer"


def get_dataset(name: str) -> Dataset | ImageDataset:
    """The registered dataset called `name`; FetchError listing the known names otherwise."""
    if name in IMAGE_DATASETS:
        return IMAGE_DATASETS[name]
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMES)}")
    return DATASETS[name]


def dataset_paths(name: str, directory: str | Path | None = None) -> dict[str, Path]:
    """Where `fetch(name, directory)` puts its files (whether or not they exist yet)."""
    dataset = get_dataset(name)
    if isinstance(dataset, ImageDataset):
        return _array_paths(_folder(dataset, directory))
    return {key: path for key, (path, _) in _outputs(dataset, _folder(dataset, directory)).items()}


def fetch(
    name: str,
    directory: str | Path | None = None,
    *,
    url: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Path]:
    """Download, verify and prepare dataset `name`; return its files.

    enwik8 gives {"train", "valid", "test", "raw"} (raw: the unzipped 100M bytes);
    crime-and-punishment gives {"text"}; the image sets (IMAGE_SETS) give the .npy files
    {"train", "test", "train-labels", "test-labels"}. Files go to `<directory>/<name>/`, `directory`
    defaulting to `default_cache_dir()`. `url` replaces the dataset's download URL. For an image set it
    is a base URL instead, a folder (http, https or file://) to which each of the set's file names is
    appended: `url="https://mirror/mnist"` downloads `https://mirror/mnist/train-images-idx3-ubyte.gz`
    and the three others; cifar10's one file is `cifar-10-binary.tar.gz`. A `url` also means Debian's copy
    of Fashion-MNIST is not used. Does nothing (and needs no network) when the files are already there.
    """
    dataset = get_dataset(name)
    if isinstance(dataset, ImageDataset):
        return _fetch_image_set(dataset, directory, url, progress, timeout)
    folder = _folder(dataset, directory)
    outputs = _outputs(dataset, folder)
    if _ready(dataset, folder):
        return {key: path for key, (path, _) in outputs.items()}
    _make_folder(folder)
    download = folder / dataset.filename
    if not verify(download, dataset.size, dataset.sha256):
        download_verified(url or dataset.url, download, dataset.size, dataset.sha256,
                          progress=progress, timeout=timeout)
    if dataset.unzip is not None or dataset.splits is not None:
        _prepare(dataset, download, outputs, progress)
    return {key: path for key, (path, _) in outputs.items()}


def verify(path: str | Path, size: int, sha256: str) -> bool:
    """True if `path` is a file of `size` bytes whose sha256 is `sha256` (hashed in chunks)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size != size:
        return False
    return sha256_of(path) == sha256.lower()


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks of CHUNK bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_verified(
    url: str, dest: Path, size: int, sha256: str, *, progress: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Download `url` to `dest` through `dest.part` (resumed if present); rename only once verified."""
    part = _part(dest)
    have = part.stat().st_size if part.is_file() else 0
    if have > size or (have and not _resumable(url)):
        part.unlink()
        have = 0
    if have < size:
        _transfer(url, part, have, size, dest, progress, timeout)
    if not verify(part, size, sha256):
        got = sha256_of(part)
        part.unlink()
        raise FetchError(
            f"{url} gave a file with sha256 {got}, expected {sha256}; deleted it, so the next run starts clean "
            f"(if this repeats, the server serves a different file: pass --url to another copy)"
        )
    part.replace(dest)


# --- downloading ---

def _transfer(url: str, part: Path, have: int, size: int, dest: Path, progress: bool, timeout: float) -> None:
    """Fetch bytes `have..size` of `url` into `part`, or all of them if the server cannot resume."""
    response = _open(url, have, dest, timeout)
    if response is None:  # the server refused the range: start over
        part.unlink(missing_ok=True)
        return _transfer(url, part, 0, size, dest, progress, timeout)
    with response:
        start = _start_of(response, have)
        if start is None:  # a range we did not ask for
            response.close()
            part.unlink(missing_ok=True)
            return _transfer(url, part, 0, size, dest, progress, timeout)
        _check_announced_size(response, start, size, url, part)
        received = _copy_response(response, part, start, size, url, progress)
    if received < size:
        raise FetchError(
            f"download of {url} stopped at {received:,} of {size:,} bytes; run the same command again to resume"
        )


def _open(url: str, have: int, dest: Path, timeout: float):
    """The urlopen response, asking for `bytes=have-` when resuming; None if the server answered 416."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            return None
        raise _network_error(url, dest, f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        raise _network_error(url, dest, str(getattr(err, "reason", err))) from err


def _start_of(response, have: int) -> int | None:
    """Offset the response body starts at: `have` for a matching 206, 0 for a full answer, None otherwise."""
    if getattr(response, "status", None) != 206:
        return 0  # 200 (no range support) or a file:// URL: the whole file
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return have if match and int(match.group(1)) == have else None


def _check_announced_size(response, start: int, size: int, url: str, part: Path) -> None:
    """Refuse before downloading when the server announces a file of another size."""
    total = None
    content_range = re.search(r"/(\d+)$", response.headers.get("Content-Range", "").strip())
    if start and content_range:
        total = int(content_range.group(1))
    elif response.headers.get("Content-Length", "").isdigit():
        total = start + int(response.headers["Content-Length"])
    if total is not None and total != size:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{url} is {total:,} bytes, expected {size:,}: it is not the expected file; pass --url to another copy"
        )


def _copy_response(response: BinaryIO, part: Path, start: int, size: int, url: str, progress: bool) -> int:
    """Append the body to `part` (truncated first when `start` is 0); return the bytes `part` now holds."""
    received = start
    bar = tqdm(total=size, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name.removesuffix(".part"), disable=not progress)
    with bar, part.open("ab" if start else "wb") as out:
        try:
            while block := response.read(CHUNK):
                if received + len(block) > size:
                    out.close()
                    part.unlink()
                    raise FetchError(f"{url} sent more than the expected {size:,} bytes; pass --url to another copy")
                out.write(block)
                received += len(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(
                f"download of {url} broke off at {received:,} of {size:,} bytes ({err}); "
                f"run the same command again to resume"
            ) from err
    return received


def _network_error(url: str, dest: Path, reason: str) -> FetchError:
    return FetchError(
        f"could not download {url} ({reason}); check the connection, pass --url to another copy or --dir "
        f"to another cache, or download the file by hand to {dest} and run again"
    )


def _resumable(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("http", "https")


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


# --- the files a dataset produces, and post-processing ---

def _folder(dataset: Dataset | ImageDataset, directory: str | Path | None) -> Path:
    return (Path(directory).expanduser() if directory is not None else default_cache_dir()) / dataset.name


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(f"cannot create {folder} ({err.strerror}); pass --dir to a writable directory") from err


def _outputs(dataset: Dataset, folder: Path) -> dict[str, tuple[Path, int]]:
    """name -> (path, size) of the files `fetch` returns."""
    source = folder / dataset.unzip if dataset.unzip is not None else folder / dataset.filename
    if dataset.splits is None:
        if dataset.unzip is None:
            return {"text": (source, dataset.size)}
        return {"text": (source, -1)}  # size unknown until extracted
    outputs = {name: (folder / f"{name}.bin", n) for name, n in zip(SPLIT_NAMES, dataset.splits)}
    outputs["raw"] = (source, sum(dataset.splits))
    return outputs


def _ready(dataset: Dataset, folder: Path) -> bool:
    """The download verifies (no post-processing) or every produced file has its expected size."""
    if dataset.unzip is None and dataset.splits is None:
        return verify(folder / dataset.filename, dataset.size, dataset.sha256)
    return all(path.is_file() and (size < 0 or path.stat().st_size == size)
               for path, size in _outputs(dataset, folder).values())


def _prepare(dataset: Dataset, download: Path, outputs: dict[str, tuple[Path, int]], progress: bool) -> None:
    """Unzip and/or split the verified download; every file is written to `.part`, then renamed."""
    source = download
    if dataset.unzip is not None:
        source, expected = outputs["raw" if dataset.splits is not None else "text"]
        _extract(download, dataset.unzip, source, expected, progress)
    if dataset.splits is not None:
        _split(source, [outputs[name][0] for name in SPLIT_NAMES], dataset.splits, progress)


def _extract(archive: Path, member: str, dest: Path, size: int, progress: bool) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            info = zipped.getinfo(member)
            if size >= 0 and info.file_size != size:
                raise FetchError(f"{archive} holds {member} of {info.file_size:,} bytes, expected {size:,}; "
                                 f"delete {archive} and run again")
            with zipped.open(info) as source:
                _write_atomically(source, dest, info.file_size, f"unzip {member}", progress)
    except (zipfile.BadZipFile, KeyError) as err:
        raise FetchError(f"cannot extract {member} from {archive} ({err}); delete it and run again") from err


def _split(source: Path, dests: list[Path], sizes: tuple[int, ...], progress: bool) -> None:
    if source.stat().st_size != sum(sizes):
        raise FetchError(f"{source} is {source.stat().st_size:,} bytes, but the splits need {sum(sizes):,}; "
                         f"delete it and run again")
    with source.open("rb") as file:
        for dest, size in zip(dests, sizes):
            _write_atomically(file, dest, size, f"split {dest.name}", progress)


def _write_atomically(source: BinaryIO, dest: Path, size: int, desc: str, progress: bool) -> None:
    """Copy the next `size` bytes of `source` to `dest.part`, then rename it to `dest`."""
    part = _part(dest)
    with part.open("wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=desc, disable=not progress) as bar:
        left = size
        while left and (block := source.read(min(CHUNK, left))):
            out.write(block)
            left -= len(block)
            bar.update(len(block))
    if left:
        part.unlink()
        raise FetchError(f"{dest.name}: the source ended {left:,} bytes early; delete the download and run again")
    part.replace(dest)


# --- image sets: download, then arrays ---

IDX_IMAGES_MAGIC = 2051  # an IDX file of unsigned bytes in 3 dimensions
IDX_LABELS_MAGIC = 2049  # an IDX file of unsigned bytes in 1 dimension
MNIST_SIDE = 28  # pixels
CIFAR_SIDE = 32  # pixels
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # bytes: a label, then the R, G and B planes, each row-major
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))  # in this order
CIFAR_TEST_BATCH = "test_batch.bin"
NUM_CLASSES = 10  # labels are 0..9 in all three sets


def _fetch_image_set(
    image_set: ImageDataset, directory: str | Path | None, url: str | None, progress: bool, timeout: float
) -> dict[str, Path]:
    """Download and verify the set's files (or find Debian's Fashion-MNIST), then write its four arrays."""
    folder = _folder(image_set, directory)
    outputs = _array_paths(folder)
    if _arrays_ready(outputs):
        return outputs
    _make_folder(folder)
    system_copy = _system_copy(image_set) if url is None else None
    if system_copy is not None:
        arrays = _idx_arrays(system_copy, expected_contents=SYSTEM_FASHION_MNIST_CONTENTS)
    else:
        for file in image_set.files:
            download = folder / file.filename
            if not verify(download, file.size, file.sha256):
                download_verified(_file_url(url or image_set.base_url, file.filename), download, file.size,
                                  file.sha256, progress=progress, timeout=timeout)
        if image_set.layout == "cifar":
            arrays = _cifar_arrays(folder / image_set.files[0].filename)
        else:
            arrays = _idx_arrays(folder)
    for key, array in arrays.items():
        _save_atomically(array, outputs[key])
    return outputs


def _array_paths(folder: Path) -> dict[str, Path]:
    return {key: folder / f"{key}.npy" for key in ARRAY_KEYS}


def _arrays_ready(outputs: dict[str, Path]) -> bool:
    """Every .npy file holds a whole uint8 array, and each image array has as many images as its labels."""
    shapes = {key: _npy_shape(path) for key, path in outputs.items()}
    if None in shapes.values():
        return False
    return all(shapes[split][:1] == shapes[f"{split}-labels"] for split in ("train", "test"))


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of the uint8 array saved at `path`; None when it is missing, truncated or not uint8."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")  # reads the header only; refuses a file shorter than its data
    except (OSError, ValueError, EOFError):
        return None
    return array.shape if array.dtype == np.uint8 else None


def _system_copy(image_set: ImageDataset) -> Path | None:
    """SYSTEM_FASHION_MNIST when this is Fashion-MNIST and Debian's copy of its four files is installed."""
    if image_set.name != "fashion-mnist":
        return None
    folder = SYSTEM_FASHION_MNIST
    return folder if all((folder / filename).is_file() for filename in IDX_FILES.values()) else None


def _file_url(base_url: str, filename: str) -> str:
    return base_url.rstrip("/") + "/" + filename


def _save_atomically(array: np.ndarray, dest: Path) -> None:
    part = _part(dest)
    with part.open("wb") as out:
        np.save(out, np.ascontiguousarray(array))
    part.replace(dest)


def _idx_arrays(folder: Path, expected_contents: tuple[FileDigest, ...] = ()) -> dict[str, np.ndarray]:
    """The four arrays from the gzipped IDX_FILES in `folder`; a file named in `expected_contents` must
    decompress to that size and sha256 first."""
    expected = {digest.filename: digest for digest in expected_contents}
    arrays = {}
    for key, filename in IDX_FILES.items():
        path = folder / filename
        data = _gunzip(path)
        if filename in expected:
            _check_contents(path, data, expected[filename])
        arrays[key] = _parse_idx(data, path, labels=key.endswith("-labels"))
    for split in ("train", "test"):
        images, labels = arrays[split], arrays[f"{split}-labels"]
        if len(images) != len(labels):
            raise FetchError(f"{folder / IDX_FILES[split]} holds {len(images):,} images but "
                             f"{IDX_FILES[split + '-labels']} {len(labels):,} labels; delete both and run again")
    return arrays


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as err:
        raise FetchError(f"cannot decompress {path} ({err}); delete it and run again") from err


def _check_contents(path: Path, data: bytes, expected: FileDigest) -> None:
    """Debian's recompressed Fashion-MNIST: the decompressed bytes must be the official ones."""
    got = hashlib.sha256(data).hexdigest()
    if len(data) != expected.size or got != expected.sha256:
        official = IMAGE_DATASETS["fashion-mnist"].base_url
        raise FetchError(
            f"{path} decompresses to {len(data):,} bytes with sha256 {got}, expected {expected.size:,} bytes "
            f"with sha256 {expected.sha256}; reinstall the package dataset-fashion-mnist, or pass "
            f"--url {official} to download the official files"
        )


def _parse_idx(data: bytes, path: Path, *, labels: bool) -> np.ndarray:
    """An IDX file of unsigned bytes: labels (N,) or MNIST-sized images (N, 28, 28)."""
    magic, dimensions, kind = (IDX_LABELS_MAGIC, 1, "label") if labels else (IDX_IMAGES_MAGIC, 3, "image")
    header = 4 + 4 * dimensions  # the magic number, then each dimension, big-endian uint32s
    found = int.from_bytes(data[:4], "big")
    if len(data) < header or found != magic:
        raise FetchError(f"{path} is not an IDX {kind} file (magic number {found}, expected {magic}); "
                         f"delete it and run again")
    shape = struct.unpack(f">{dimensions}I", data[4:header])
    if not labels and shape[1:] != (MNIST_SIDE, MNIST_SIDE):
        raise FetchError(f"{path} holds {shape[1]}x{shape[2]} images, expected {MNIST_SIDE}x{MNIST_SIDE}; "
                         f"delete it and run again")
    if len(data) - header != math.prod(shape):
        raise FetchError(f"{path} holds {len(data) - header:,} bytes after its header, which announces "
                         f"{math.prod(shape):,}; delete it and run again")
    array = np.frombuffer(data, np.uint8, offset=header).reshape(shape)  # (N,) or (N, 28, 28)
    if labels:
        _check_labels(array, str(path))
    return array


def _cifar_arrays(archive: Path) -> dict[str, np.ndarray]:
    """The four arrays from CIFAR-10's binary tar.gz: images (N, 32, 32, 3), channels R, G, B last."""
    batches = _read_members(archive, (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH))
    train = [_parse_cifar_batch(batches[name], f"{archive}:{name}") for name in CIFAR_TRAIN_BATCHES]
    test_images, test_labels = _parse_cifar_batch(batches[CIFAR_TEST_BATCH], f"{archive}:{CIFAR_TEST_BATCH}")
    return {
        "train": np.concatenate([images for images, _ in train]),  # (50000, 32, 32, 3)
        "test": test_images,  # (10000, 32, 32, 3)
        "train-labels": np.concatenate([labels for _, labels in train]),  # (50000,)
        "test-labels": test_labels,  # (10000,)
    }


def _read_members(archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the regular files called `names` (in any folder) of a tar.gz, in one pass, in memory."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                basename = member.name.rsplit("/", 1)[-1]
                if member.isfile() and basename in names and basename not in found:
                    found[basename] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise FetchError(f"cannot read {archive} ({err}); delete it and run again") from err
    missing = [name for name in names if name not in found]
    if missing:
        raise FetchError(f"{archive} lacks {', '.join(missing)}, so it is not CIFAR-10's binary version; "
                         f"delete it and run again")
    return found


def _parse_cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch of CIFAR-10 binary records as images (N, 32, 32, 3) and labels (N,)."""
    if not data or len(data) % CIFAR_RECORD:
        raise FetchError(f"{where} is {len(data):,} bytes, not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
                         f"records; delete the archive and run again")
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)  # (N, 1 + 3 * 32 * 32)
    labels = records[:, 0]  # (N,)
    planes = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)  # (N, channel R/G/B, row, column)
    images = np.ascontiguousarray(planes.transpose(0, 2, 3, 1))  # (N, row, column, channel)
    _check_labels(labels, where)
    return images, labels


def _check_labels(labels: np.ndarray, where: str) -> None:
    if np.any(labels >= NUM_CLASSES):
        raise FetchError(f"{where} has labels above {NUM_CLASSES - 1} (up to {int(labels.max())}), so it is "
                         f"not the expected file; delete it and run again")
