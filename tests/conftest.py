"""Shared test helpers: a tolerance table and an assert that reports where it failed.

Triton's kernels run under its interpreter, on CPU tensors (tests/attention/test_triton.py): TRITON_INTERPRET=1
must be set before Triton is first imported (torch._dynamo imports it), so it is set here, before any test
module loads, unless REFORMER_TRITON_TEST_DEVICE names a GPU.
"""

from __future__ import annotations

import contextlib
import os

if os.environ.get("REFORMER_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    if not worst <= atol:  # also catches NaN
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(f"{name}: max |diff| {worst:.3e} > {atol:.1e} at {where} "
                             f"({(diff > atol).float().mean().item():.1%} of elements)")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_config(**overrides):
    """A small model with every layer kind, odd chunk sizes and every option exercised."""
    from reformer import ReformerConfig

    fields = dict(
        vocab_size=37, d_model=16, n_heads=2, d_head=8, d_ff=24, attn_layers=("lsh", "local", "full", "lsh"),
        causal=True, lsh_chunk_size=4, n_hashes=2, n_buckets=None, local_chunk_size=5, ff_chunk_size=7,
        loss_chunk_size=9, axial_shape=(8, 8), axial_dims=(6, 10), max_seq_len=64, dropout=0.0,
        attn_dropout=0.0, seed=0,
        reversible_keep_attention=False,  # the reversible recompute; tests that keep it say so
    )
    fields.update(overrides)
    return ReformerConfig(**fields)


def random_batch(config, batch=2, length=29, seed=1, pad_from=None):
    gen = seeded(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    return ids, mask


_BLAS_LIBRARY = []


@contextlib.contextmanager
def tile_products(tile: bool):
    """The native kernels with their chunk products in the tile product (True: the library as built here, which
    uses it where the CPU has AVX-512) or in the BLAS (False: the library built with -DREFORMER_BLAS_PRODUCTS, as
    on CPUs without AVX-512), until the block ends. The native kernels must be available."""
    from unittest import mock

    from reformer.attention import native

    if tile:
        yield
        return
    if not _BLAS_LIBRARY:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp(prefix="reformer-blas-")) / "kernels-blas.so"
        native.build(native._compiler(), path, defines=("REFORMER_BLAS_PRODUCTS",))
        _BLAS_LIBRARY.append(native.open_library(path))
    with mock.patch.object(native, "_load", lambda: _BLAS_LIBRARY[0]):
        yield


def one_line_error(capsys, argv: list[str], match: str) -> None:
    """`reformer ARGV` fails with exit status 2 and one line on stderr (warnings aside) that contains `match`."""
    from reformer.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if ": warning: " not in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], errors[0]


@contextlib.contextmanager
def local_http_server(handler, files: dict[str, bytes], **attributes):
    """A threaded HTTP server on 127.0.0.1 serving `files` (path -> bytes) with `handler`; `requests` lists the
    paths asked for, `url` is its address, and `attributes` become attributes of the server (for the handler)."""
    import threading
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.files, httpd.requests = files, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    for name, value in attributes.items():
        setattr(httpd, name, value)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def without_proxies(monkeypatch) -> None:
    """Nothing between urllib and 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
