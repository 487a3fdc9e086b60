"""Images as sequences (`reformer.images`), completion (`reformer.complete`), and the image command lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig, ReformerLM
from reformer.cli import main
from reformer.complete import complete_images, completion_grid
from reformer.images import (
    START,
    ImageError,
    histogram_bits_per_dim,
    images_to_tokens,
    load_images,
    shift_right,
    tokens_to_images,
)
from reformer.train import load_for_eval
from tests.conftest import one_line_error

Image = pytest.importorskip("PIL.Image")

MODEL = ["--d-model", "32", "--d-head", "16", "--d-ff", "64", "--lsh-chunk-size", "8", "--local-chunk-size", "8",
         "--n-hashes", "1"]


def _random_images(shape, n=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7, 3), (3, 1, 1), (9, 4, 1), (1, 11, 3)])
def test_tokens_are_raster_order_with_channels_interleaved_and_invert_exactly(shape):
    images = _random_images(shape, n=2)
    tokens = images_to_tokens(images)  # (2, H * W * C)
    height, width, channels = shape
    assert tokens.shape == (2, math.prod(shape)) and tokens.dtype == torch.long
    for r, c, ch in [(0, 0, 0), (height - 1, width - 1, channels - 1), (height // 2, width // 3, channels // 2)]:
        assert int(tokens[1, (r * width + c) * channels + ch]) == images[1, r, c, ch]
    assert np.array_equal(tokens_to_images(tokens, shape), images)
    assert np.array_equal(tokens_to_images(tokens[0], shape), images[0])
    if shape[2] == 1:  # one gray image as (H, W)
        assert torch.equal(images_to_tokens(images[0, :, :, 0]), tokens[0])
        assert np.array_equal(tokens_to_images(tokens[0], shape[:2]), images[0, :, :, 0])


@pytest.mark.parametrize("mode, shape", [("L", (5, 7, 1)), ("RGB", (6, 3, 3))])
def test_png_files_round_trip_through_a_directory_exactly(tmp_path, mode, shape):
    images = _random_images(shape, n=3)
    for i, image in enumerate(images):
        Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(tmp_path / f"{i}.png")
    loaded = load_images(tmp_path)
    assert loaded.shape == shape and len(loaded) == 3
    assert np.array_equal(loaded.array, images)
    assert np.array_equal(tokens_to_images(images_to_tokens(loaded.array), shape), images)


def test_arrays_load_from_npy_and_npz(tmp_path):
    gray, rgb = _random_images((4, 5), n=3), _random_images((4, 5, 3), n=2)
    np.save(tmp_path / "gray.npy", gray)
    np.savez(tmp_path / "set.npz", x_train=rgb, y_train=np.arange(2), x_test=rgb[:1])
    assert np.array_equal(load_images(tmp_path / "gray.npy").array, gray[..., None])
    assert np.array_equal(load_images(tmp_path / "set.npz").array, rgb)
    assert np.array_equal(load_images(tmp_path / "set.npz", split="test").array, rgb[:1])  # eval, complete
    np.save(tmp_path / "float.npy", gray.astype(np.float32) / 255)
    with pytest.raises(ImageError, match="uint8"):
        load_images(tmp_path / "float.npy")
    np.save(tmp_path / "first.npy", rgb.transpose(0, 3, 1, 2))
    with pytest.raises(ImageError, match="channels first"):
        load_images(tmp_path / "first.npy")


def test_image_size_resizes_and_channels_convert(tmp_path):
    Image.fromarray(_random_images((6, 6, 3))[0]).save(tmp_path / "a.png")
    Image.fromarray(_random_images((8, 5, 3))[0]).save(tmp_path / "b.png")
    with pytest.raises(ImageError, match="--image-size 6x6"):
        load_images(tmp_path)
    assert load_images(tmp_path, image_size=(4, 4)).shape == (4, 4, 3)
    assert load_images(tmp_path, image_size=(4, 4), channels=1).shape == (4, 4, 1)


def test_histogram_baseline_is_per_position_with_add_one_smoothing():
    train = np.array([[[[0]], [[1]]], [[[0]], [[2]]]], np.uint8)  # (2, 2, 1, 1): two images of 2 pixels
    valid = np.array([[[[0]], [[2]]]], np.uint8)
    p_first, p_second = (2 + 1) / (2 + 256), (1 + 1) / (2 + 256)
    assert histogram_bits_per_dim(train, valid) == pytest.approx(-(math.log2(p_first) + math.log2(p_second)) / 2)


# --- the model's view: every sub-pixel predicted ---------------------------------------


def _image_model(shape, layers=("local", "full"), dtype=torch.float64, **extra):
    config = ReformerConfig(d_model=32, n_heads=2, d_head=16, d_ff=64, attn_layers=layers, local_chunk_size=8,
                            lsh_chunk_size=8, image_shape=shape, max_seq_len=math.prod(shape), **extra)
    return ReformerLM(config).to(dtype)


def test_an_image_model_predicts_every_sub_pixel_from_those_before_it():
    shape = (3, 5, 3)
    model = _image_model(shape)
    assert model.config.axial_shape == shape
    tokens = images_to_tokens(_random_images(shape, n=2))
    inputs = shift_right(tokens)
    assert (inputs[:, 0] == START).all() and torch.equal(inputs[:, 1:], tokens[:, :-1])
    logits = model(inputs).logits  # (2, n, vocab)
    expected = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    out = model(inputs, labels=tokens, shift_labels=False)
    assert out.n_tokens == tokens.numel()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    model.train()  # the reversible path closes the stack with the loss: the same value and gradients
    loss = model(inputs, labels=tokens, shift_labels=False).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = F.cross_entropy(model(inputs, return_logits=True).logits.flatten(0, 1), tokens.flatten())
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=0)
    for got, want in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# --- completion -----------------------------------------------------------------------


@pytest.mark.parametrize("keep_rows", [0, 2, 4])
def test_completion_keeps_the_given_rows_and_the_cache_changes_nothing(keep_rows):
    shape = (4, 3, 3)
    model = _image_model(shape, layers=("local", "full"))  # the cache is exact for these layers
    given = _random_images(shape, n=2, seed=1)
    cached = complete_images(model, given, keep_rows=keep_rows, samples=3, temperature=1.0, seed=5)
    uncached = complete_images(model, given, keep_rows=keep_rows, samples=3, temperature=1.0, seed=5,
                               use_cache=False)
    assert cached.samples.shape == (2, 3, *shape)
    assert np.array_equal(cached.samples, uncached.samples)
    assert np.array_equal(cached.samples[:, :, :keep_rows], np.broadcast_to(given[:, None, :keep_rows],
                                                                              (2, 3, keep_rows, 3, 3)))
    assert cached.sampled_tokens == 2 * 3 * (4 - keep_rows) * 3 * 3
    again = complete_images(model, given, keep_rows=keep_rows, samples=3, temperature=1.0, seed=5)
    assert np.array_equal(again.samples, cached.samples)  # the same seed, the same images
    if keep_rows < 4:
        other = complete_images(model, given, keep_rows=keep_rows, samples=3, temperature=1.0, seed=6)
        assert not np.array_equal(other.samples, cached.samples)
    grid = completion_grid(cached, given, keep_rows)
    assert grid.ndim == 3 and grid.shape[2] == 3


def test_completion_with_lsh_layers_keeps_the_given_rows():
    shape = (6, 4, 1)
    model = _image_model(shape, layers=("local", "lsh"), dtype=torch.float32)
    given = _random_images(shape, n=1)
    done = complete_images(model, given, keep_rows=3, samples=2, seed=0)
    assert np.array_equal(done.samples[0, :, :3], np.stack([given[0, :3]] * 2))


# --- the command line -------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    folder = root / "pictures"
    folder.mkdir()
    images = _random_images((5, 4, 3), n=6, seed=3)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"pic{i}.png")
    run = root / "run"
    assert main(["train", "--task", "images", "--data", str(folder), "--out", str(run), "--steps", "2",
                 "--batch-size", "2", "--eval-every", "1", "--no-progress", *MODEL]) == 0
    return {"root": root, "folder": folder, "run": run, "images": images}


def test_train_on_a_directory_makes_an_image_model(image_run, capsys):
    config = json.loads((image_run["run"] / "config.json").read_text())
    assert config["image_shape"] == [5, 4, 3] and config["max_seq_len"] == 60 and config["axial_shape"] == [5, 4, 3]
    options = json.loads((image_run["run"] / "train.json").read_text())
    assert options["task"] == "images" and options["seq_len"] == 60
    assert len(options["data_files"]) == 6  # every image file is fingerprinted for --resume
    evals = [json.loads(line) for line in (image_run["run"] / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(r["bits_per_dim"] == pytest.approx(r["loss"] / math.log(2)) for r in evals)


def test_eval_prints_bits_per_dim_over_every_sub_pixel(image_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(image_run["run"]), "--data", str(image_run["folder"]),
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert "6 images (360 sub-pixels)" in line and "bits/dim" in line
    model = load_for_eval(image_run["run"])
    tokens = images_to_tokens(image_run["images"])
    with torch.no_grad():
        logits = model(shift_right(tokens)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item() / math.log(2)
    assert f"{expected:.4f} bits/dim" in line


def test_complete_writes_pngs_that_keep_the_given_rows_and_a_grid(image_run, capsys):
    out = image_run["root"] / "completed"
    capsys.readouterr()
    assert main(["complete", "--checkpoint", str(image_run["run"]), "--image", str(image_run["folder"] / "pic2.png"),
                 "--keep-rows", "2", "--samples", "3", "--temperature", "0.9", "--seed", "4", "--out", str(out)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "pic2-sample-1.png", "pic2-sample-2.png", "pic2-sample-3.png"]
    for k in (1, 2, 3):
        sample = np.asarray(Image.open(out / f"pic2-sample-{k}.png"))
        assert sample.shape == (5, 4, 3)
        assert np.array_equal(sample[:2], image_run["images"][2, :2])
    grid = Image.open(out / "grid.png")
    assert grid.width > grid.height  # one row: fragment, three samples, original
    unconditional = image_run["root"] / "unconditional"
    assert main(["complete", "--checkpoint", str(image_run["run"]), "--keep-rows", "0", "--samples", "2",
                 "--out", str(unconditional)]) == 0
    assert sorted(p.name for p in unconditional.iterdir()) == ["grid.png", "sample-1.png", "sample-2.png"]


def test_complete_names_each_given_image_apart(image_run, capsys):
    np.save(image_run["root"] / "three.npy", image_run["images"][:3])
    out = image_run["root"] / "from-array"
    assert main(["complete", "--checkpoint", str(image_run["run"]), "--image", str(image_run["root"] / "three.npy"),
                 "--keep-rows", "4", "--samples", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "three-0-sample-1.png", "three-1-sample-1.png",
                                                     "three-2-sample-1.png"]
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(out / f"three-{i}-sample-1.png"))[:4], image_run["images"][i, :4])
    from reformer.cli import _output_names

    assert _output_names(["a/x.png", "b/x.png"]) == ["x-1", "x-2"]
    assert _output_names(["mnist-5k:test[7]", "set.npz:x_test[2]"]) == ["test-7", "x_test-2"]


def test_complete_refuses_what_it_cannot_do_in_one_line(image_run, capsys):
    run, folder = str(image_run["run"]), str(image_run["folder"])
    one_line_error(capsys, ["complete", "--checkpoint", run, "--image", folder, "--keep-rows", "9", "--out",
                             str(image_run["root"] / "c1")], "--keep-rows must be a whole number in [0, 5]")
    one_line_error(capsys, ["complete", "--checkpoint", run, "--keep-rows", "2", "--out",
                             str(image_run["root"] / "c2")], "give --image")
    one_line_error(capsys, ["complete", "--checkpoint", run, "--keep-rows", "0", "--out", folder], "is not empty")
    np.save(image_run["root"] / "many.npy", _random_images((5, 4, 3), n=65))
    one_line_error(capsys, ["complete", "--checkpoint", run, "--image", str(image_run["root"] / "many.npy"),
                             "--keep-rows", "2", "--out", str(image_run["root"] / "c3")], "give --max-images N")


def test_resume_of_an_image_run_refuses_changed_images(image_run, tmp_path, capsys):
    import shutil

    folder, run = tmp_path / "pictures", tmp_path / "run"
    shutil.copytree(image_run["folder"], folder)
    assert main(["train", "--task", "images", "--data", str(folder), "--out", str(run), "--steps", "1",
                 "--batch-size", "2", "--no-progress", *MODEL]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"]) == 0
    Image.fromarray(_random_images((5, 4, 3), seed=9)[0]).save(folder / "extra.png")
    one_line_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"],
                    "1 file(s) added, e.g.")
    (folder / "extra.png").unlink()
    Image.fromarray(_random_images((5, 4, 3), seed=9)[0]).save(folder / "pic0.png")
    one_line_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"], "changed")
    (folder / "pic0.png").unlink()
    one_line_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"], "is gone")


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of pixels (H, W, 3) uint16, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0, big-endian samples
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    folders = {name: root / name for name in ("mixed", "text", "deep", "deep_rgb", "empty", "damaged", "kinds")}
    for folder in folders.values():
        folder.mkdir()
    Image.fromarray(_random_images((4, 4, 3))[0]).save(folders["mixed"] / "a.png")
    Image.fromarray(_random_images((5, 4, 3))[0]).save(folders["mixed"] / "b.png")
    Image.fromarray(_random_images((4, 4, 3))[0]).save(folders["text"] / "a.png")
    (folders["text"] / "notes.txt").write_text("not an image")
    Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000).save(folders["deep"] / "deep.png")
    (folders["deep_rgb"] / "deep.png").write_bytes(_png_rgb16(np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000))
    Image.fromarray(_random_images((32, 32, 3))[0]).save(folders["damaged"] / "a.png")
    (folders["damaged"] / "b.png").write_bytes((folders["damaged"] / "a.png").read_bytes()[:400])  # cut short
    Image.fromarray(_random_images((4, 4, 3))[0]).save(folders["kinds"] / "a.png")
    Image.fromarray(_random_images((4, 4, 1))[0, :, :, 0], "L").save(folders["kinds"] / "b.png")
    return {name: str(path) for name, path in folders.items()} | {"root": str(root)}


BAD_CASES = [
    ("mixed", "b.png is 5x4 pixels but"),
    ("text", "notes.txt is not an image"),
    ("deep", "deep.png has 16-bit pixels"),
    ("deep_rgb", "deep.png has 16-bit pixels"),  # Pillow itself reads it as 8-bit RGB
    ("empty", "holds no files"),
    ("damaged", "b.png is a damaged image"),
    ("kinds", "b.png is grayscale but"),
]


@pytest.mark.parametrize("folder, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_image_folders_give_one_line_naming_the_file(bad_folders, capsys, folder, message):
    out = bad_folders["root"] + "/run-" + folder
    one_line_error(capsys, ["train", "--task", "images", "--data", bad_folders[folder], "--out", out, "--steps",
                             "1", "--no-progress", *MODEL], message)
    assert not Path(out).exists()


def test_image_flags_that_do_not_fit_give_one_line(image_run, capsys, tmp_path):
    base = ["train", "--task", "images", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress", *MODEL]
    one_line_error(capsys, [*base], "--task images needs --data")
    one_line_error(capsys, [*base, "--data", str(image_run["folder"]), "--seq-len", "50"], "--seq-len must be 60")
    one_line_error(capsys, [*base, "--data", str(image_run["folder"]), "--image-size", "4by4"],
                    "--image-size must be HEIGHTxWIDTH")
    one_line_error(capsys, [*base, "--data", "mnist", "--image-size", "4x4"], "reformer data fetch mnist")
    one_line_error(capsys, ["eval", "--checkpoint", str(image_run["run"]), "--data", str(image_run["folder"]),
                             "--image-size", "3x3"], "")
