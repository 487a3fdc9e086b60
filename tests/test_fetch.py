"""reformer.fetch: download, resume, verify, unzip and split, served from a local HTTP server (never the internet)."""

from __future__ import annotations

import hashlib
import io
import random
import re
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from reformer import fetch as fetch_module
from reformer.fetch import DATASETS, Dataset, FetchError, default_cache_dir, fetch, verify
from tests.conftest import local_http_server, without_proxies

NOVEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "crime-and-punishment-2554.txt"
RAW = random.Random(0).randbytes(100)  # incompressible, so the zip is bigger than a few bytes
SPLITS = (90, 5, 5)


def make_zip(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return buffer.getvalue()


ZIP = make_zip("enwik8", RAW)
TEXT = random.Random(1).randbytes(3000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours `Range: bytes=N-` unless `server.ranges` is False;
    when `server.drop_after` is set, the next response stops after that many body bytes."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:
            body, server.drop_after = body[:server.drop_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    with local_http_server(Handler, {"/enwik8.zip": ZIP, "/novel.txt": TEXT}, ranges=True, drop_after=None) as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No proxy between us and 127.0.0.1; the default cache inside tmp_path."""
    without_proxies(monkeypatch)
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny(monkeypatch, server):
    """Replace the registered datasets by small ones served by `server`."""
    monkeypatch.setitem(DATASETS, "enwik8", Dataset(
        name="enwik8", url=server.url + "/enwik8.zip", filename="enwik8.zip", size=len(ZIP), sha256=sha(ZIP),
        unzip="enwik8", splits=SPLITS))
    monkeypatch.setitem(DATASETS, "crime-and-punishment", Dataset(
        name="crime-and-punishment", url=server.url + "/novel.txt", filename="novel.txt", size=len(TEXT),
        sha256=sha(TEXT)))
    return server


def test_registered_datasets_match_the_spec():
    enwik8, novel = DATASETS["enwik8"], DATASETS["crime-and-punishment"]
    assert (enwik8.url, enwik8.size, enwik8.splits, enwik8.unzip) == (
        "http://mattmahoney.net/dc/enwik8.zip", 36_445_475, (90_000_000, 5_000_000, 5_000_000), "enwik8")
    assert enwik8.sha256 == "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
    assert (novel.url, novel.size, novel.splits, novel.unzip) == (
        "https://www.gutenberg.org/files/2554/2554.txt", 1_176_893, None, None)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("REFORMER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "reformer"


def test_verify(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(TEXT)
    assert verify(path, len(TEXT), sha(TEXT))
    assert not verify(path, len(TEXT) - 1, sha(TEXT))
    assert not verify(path, len(TEXT), sha(b"other"))
    assert not verify(tmp_path / "missing", len(TEXT), sha(TEXT))


def test_enwik8_downloads_verifies_and_splits(tiny, tmp_path):
    files = fetch("enwik8", tmp_path, progress=False)
    assert set(files) == {"train", "valid", "test", "raw"}
    assert files["train"].read_bytes() == RAW[:90]
    assert files["valid"].read_bytes() == RAW[90:95]
    assert files["test"].read_bytes() == RAW[95:]
    assert files["raw"].read_bytes() == RAW
    assert all(path.parent == tmp_path / "enwik8" for path in files.values())
    assert (tmp_path / "enwik8" / "enwik8.zip").read_bytes() == ZIP
    assert not list(tmp_path.rglob("*.part"))
    assert tiny.requests == [("/enwik8.zip", None)]
    assert fetch_module.dataset_paths("enwik8", tmp_path) == files


def test_second_call_makes_no_request(tiny, tmp_path):
    first = fetch("enwik8", progress=False)  # the default cache: $REFORMER_CACHE
    assert first["train"].parent == tmp_path / "cache" / "enwik8"
    assert fetch("enwik8", progress=False) == first
    fetch("crime-and-punishment", progress=False)
    fetch("crime-and-punishment", progress=False)
    assert len(tiny.requests) == 2


def test_splits_are_rebuilt_from_the_zip_without_network(tiny, tmp_path):
    files = fetch("enwik8", tmp_path, progress=False)
    files["valid"].unlink()
    files["raw"].write_bytes(b"truncated")
    again = fetch("enwik8", tmp_path, progress=False)
    assert again["valid"].read_bytes() == RAW[90:95] and again["raw"].read_bytes() == RAW
    assert len(tiny.requests) == 1


def test_interrupted_download_resumes_with_a_range_request(tiny, tmp_path):
    half = len(ZIP) // 2
    tiny.drop_after = half
    with pytest.raises(FetchError, match=r"stopped at .* run the same command again to resume"):
        fetch("enwik8", tmp_path, progress=False)
    part = tmp_path / "enwik8" / "enwik8.zip.part"
    assert part.read_bytes() == ZIP[:half]
    assert not (tmp_path / "enwik8" / "enwik8.zip").exists()

    files = fetch("enwik8", tmp_path, progress=False)
    assert tiny.requests[-1] == ("/enwik8.zip", f"bytes={half}-")
    assert verify(tmp_path / "enwik8" / "enwik8.zip", len(ZIP), sha(ZIP))
    assert files["test"].read_bytes() == RAW[95:]
    assert not part.exists()


def test_server_without_range_support_starts_over(tiny, tmp_path):
    tiny.ranges = False
    folder = tmp_path / "crime-and-punishment"
    folder.mkdir()
    (folder / "novel.txt.part").write_bytes(b"x" * 100)  # garbage: appending to it would fail the checksum
    files = fetch("crime-and-punishment", tmp_path, progress=False)
    assert tiny.requests == [("/novel.txt", "bytes=100-")]
    assert files == {"text": folder / "novel.txt"}
    assert files["text"].read_bytes() == TEXT
    assert not (folder / "novel.txt.part").exists()


def test_complete_part_is_verified_and_renamed_without_network(tiny, tmp_path):
    folder = tmp_path / "crime-and-punishment"
    folder.mkdir()
    (folder / "novel.txt.part").write_bytes(TEXT)
    assert fetch("crime-and-punishment", tmp_path, progress=False)["text"].read_bytes() == TEXT
    assert tiny.requests == []


def test_wrong_checksum_deletes_the_download(tiny, monkeypatch, tmp_path):
    wrong = Dataset(name="crime-and-punishment", url=tiny.url + "/novel.txt", filename="novel.txt",
                    size=len(TEXT), sha256="0" * 64)
    monkeypatch.setitem(DATASETS, "crime-and-punishment", wrong)
    with pytest.raises(FetchError, match=f"sha256 {sha(TEXT)}, expected 0{{64}}.*next run starts clean"):
        fetch("crime-and-punishment", tmp_path, progress=False)
    assert list((tmp_path / "crime-and-punishment").iterdir()) == []


def test_wrong_size_is_refused_before_downloading(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(DATASETS, "crime-and-punishment", Dataset(
        name="crime-and-punishment", url=tiny.url + "/novel.txt", filename="novel.txt", size=len(TEXT) + 1,
        sha256=sha(TEXT)))
    with pytest.raises(FetchError, match="is 3,000 bytes, expected 3,001"):
        fetch("crime-and-punishment", tmp_path, progress=False)
    assert list((tmp_path / "crime-and-punishment").iterdir()) == []


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FetchError, match=r"unknown dataset 'enwik9'; known datasets: crime-and-punishment, enwik8"):
        fetch("enwik9")


def test_network_errors_name_the_url_and_what_to_do(tiny, tmp_path):
    url = tiny.url + "/missing.txt"
    with pytest.raises(FetchError, match=re.escape(url) + r" \(HTTP 404 .*--url.*--dir.*by hand to .*novel.txt"):
        fetch("crime-and-punishment", tmp_path, url=url, progress=False)
    tiny.shutdown()
    tiny.server_close()
    with pytest.raises(FetchError, match=r"could not download http://127\.0\.0\.1:\d+/novel.txt \("):
        fetch("crime-and-punishment", tmp_path, progress=False, timeout=2)


def test_file_url(tiny, tmp_path):
    source = tmp_path / "mirror" / "enwik8.zip"
    source.parent.mkdir()
    source.write_bytes(ZIP)
    part = tmp_path / "out" / "enwik8" / "enwik8.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ZIP[:10])  # file:// is never resumed: copied from the start
    files = fetch("enwik8", tmp_path / "out", url=source.as_uri(), progress=False)
    assert files["train"].read_bytes() == RAW[:90]
    assert tiny.requests == []


@pytest.mark.skipif(not NOVEL.is_file(), reason="the shared copy of Crime and Punishment is not on this machine")
def test_real_novel_entry_from_the_shared_copy(tmp_path):
    files = fetch("crime-and-punishment", tmp_path, url=NOVEL.as_uri(), progress=False)
    assert files["text"].read_bytes() == NOVEL.read_bytes()


def test_progress(tiny, tmp_path, capfd):
    fetch("enwik8", tmp_path / "quiet", progress=False)
    assert capfd.readouterr() == ("", "")
    fetch("enwik8", tmp_path / "loud", progress=True)
    assert "enwik8.zip" in capfd.readouterr().err
