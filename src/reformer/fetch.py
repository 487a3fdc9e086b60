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
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_TIMEOUT = 30.0  # seconds to connect, and between two reads of a download
CHUNK = 1 << 20  # bytes per read / write / hash update
USER_AGENT = "reformer-fetch (Python urllib)"


class FetchError(Exception):
    """A dataset could not be fetched; the message is one line that says what to do."""


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
        if self.size < 1:
            raise ValueError(f"Dataset {self.name!r}: size must be positive, got {self.size}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"Dataset {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
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


def default_cache_dir() -> Path:
    """`$REFORMER_CACHE` if set, else `~/.cache/reformer`."""
    override = os.environ.get("REFORMER_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "reformer"


def get_dataset(name: str) -> Dataset:
    """The registered dataset called `name`; FetchError listing the known names otherwise."""
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def dataset_paths(name: str, directory: str | Path | None = None) -> dict[str, Path]:
    """Where `fetch(name, directory)` puts its files (whether or not they exist yet)."""
    dataset = get_dataset(name)
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
    crime-and-punishment gives {"text"}. Files go to `<directory>/<name>/`, `directory`
    defaulting to `default_cache_dir()`. `url` replaces the dataset's download URL.
    Does nothing (and needs no network) when the files are already there.
    """
    dataset = get_dataset(name)
    folder = _folder(dataset, directory)
    outputs = _outputs(dataset, folder)
    if _ready(dataset, folder):
        return {key: path for key, (path, _) in outputs.items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(f"cannot create {folder} ({err.strerror}); pass --dir to a writable directory") from err
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

def _folder(dataset: Dataset, directory: str | Path | None) -> Path:
    return (Path(directory).expanduser() if directory is not None else default_cache_dir()) / dataset.name


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
