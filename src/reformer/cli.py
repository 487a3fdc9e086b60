"""The `reformer` command line: it parses arguments and calls library functions, nothing else.

    reformer train --data FILE | --task duplication --out RUN_DIR [--tokenizer FILE] [options] [model flags]
    reformer train --task images --data DIR|ARRAY|NAME --out RUN_DIR [--image-size HxW] [options] [model flags]
    reformer train --out RUN_DIR --resume [--steps N]   (everything else from the run itself)
    torchrun --nproc_per_node N -m reformer train ...     (data-parallel: one process per rank)
    reformer eval --checkpoint RUN_DIR --data FILE | --task duplication   (an image model: --data SRC, bits/dim)
    reformer generate --checkpoint RUN_DIR --prompt TEXT [--temperature T --top-k K --top-p P --seed S]
    reformer complete --checkpoint RUN_DIR --image FILE_OR_DIR --keep-rows K --samples S --out OUT_DIR
    reformer data fetch enwik8|crime-and-punishment|mnist|fashion-mnist|cifar10 [--dir DIR]
    reformer convert --from-hf HF_DIR --out MODEL_DIR
    reformer convert --to-hf RUN_DIR --out HF_DIR [--allow-differences] [--fold-bias auto|yes|no]

Every model flag (`--d-model`, `--attn-layers lsh,local`, ...) overrides one field of
`ReformerConfig`; its help is the field's comment in `reformer/config.py`, with the
command line's default (its default model is smaller than ReformerConfig's own).
Errors the user can fix print one line on stderr and exit with status 2
(REFORMER_DEBUG=1 shows the traceback); warnings print one line each.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
import warnings
from pathlib import Path

from .config import ReformerConfig, saved_fields

# the command line's default model (ReformerConfig's own defaults are HF's larger ones); shown in --help
TRAIN_MODEL_DEFAULTS = dict(vocab_size=256, d_model=128, n_heads=2, d_head=64, d_ff=256,
                            attn_layers=("local", "lsh", "local", "lsh"), lsh_chunk_size=64, local_chunk_size=64,
                            n_hashes=2, ff_chunk_size=1024)
DERIVED_DEFAULTS = {"vocab_size": "256, or the --tokenizer's vocabulary", "max_seq_len": "--seq-len",
                    "axial_shape": "from max_seq_len", "axial_dims": "from d_model"}
# on --resume, these may differ from the run's (reported); every other option must agree with it
RESUME_MAY_CHANGE = {"steps", "eval_every", "eval_batches", "save_every", "progress", "device", "static_graph",
                     "compile"}
MODEL_MAY_CHANGE = {"reversible", "reversible_keep_attention", "reversible_keep_attention_mib",
                    "reversible_keep_feed_forward", "ff_chunk_size", "loss_chunk_size"}  # execution only


MAX_IMAGES_UNASKED = 64  # `reformer complete` completes more given images only when --max-images asks for them


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read more, instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --- model flags from the config dataclass ------------------------------------

def _field_comments() -> dict[str, str]:
    source = inspect.getsource(ReformerConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


def _parse_field(kind: str):
    def parse(text: str):
        if text.lower() == "auto" and "str" in kind:
            return "auto"
        if "tuple" in kind or ("int" in kind and "," in text):
            if text.lower() == "none":
                return None
            parts = tuple(int(p) if p.lstrip("-").isdigit() else p for p in text.split(",") if p)
            if len(parts) == 1 and isinstance(parts[0], int) and kind.startswith("int"):
                return parts[0]  # n_buckets=32, not (32,)
            return parts
        if text.lower() == "none" and "None" in kind:
            return None
        if kind.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("str"):
            return text
        return int(text)
    return parse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (each flag overrides one field of --config)")
    group.add_argument("--config", help="a ReformerConfig JSON file to start from")
    comments = _field_comments()
    hints = typing.get_type_hints(ReformerConfig)
    for field in dataclasses.fields(ReformerConfig):
        hint = hints[field.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        flag = "--" + ("model-seed" if field.name == "seed" else field.name.replace("_", "-"))
        default = DERIVED_DEFAULTS.get(field.name, TRAIN_MODEL_DEFAULTS.get(field.name, field.default))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = comments.get(field.name, "").replace("%", "%%") + f" (default: {shown})"
        group.add_argument(flag, dest=f"model_{field.name}", type=_parse_field(kind), default=None,
                           metavar=_metavar(kind), help=help_text)


def _metavar(kind: str) -> str:
    if "tuple" in kind:
        return "A,B,..."
    return kind.split("|")[0].split("[")[0].strip().upper()


def model_config_from_args(args: argparse.Namespace, seq_len: int | None = None,
                           vocab_size: int | None = None, defaults: dict | None = None) -> ReformerConfig:
    """--config JSON, then the training defaults (and `defaults`) for what it lacks, then every explicit flag."""
    data = {**TRAIN_MODEL_DEFAULTS, **(defaults or {})}
    if vocab_size is not None:
        data["vocab_size"] = vocab_size
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path} is not valid JSON ({e}); write it with ReformerConfig.to_json") from e
        if not isinstance(loaded, dict):
            raise UserError(f"--config {path} holds no JSON object; write it with ReformerConfig.to_json")
        data.update(saved_fields(loaded) if getattr(args, "init_from", None) else loaded)  # a saved model's
    explicit = _model_flags(args)
    data.update(explicit)
    if seq_len is not None and "max_seq_len" not in explicit and "max_seq_len" not in data:
        data["max_seq_len"] = seq_len
    data.setdefault("max_seq_len", seq_len or 4096)
    try:
        return ReformerConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}") from e


def _model_flags(args: argparse.Namespace) -> dict:
    return {k[len("model_"):]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}


# --- subcommands ------------------------------------------------------------------

# train flags: (flag, TrainConfig field); their defaults are TrainConfig's, applied after --resume reads the run
TRAIN_OPTIONS = (("--data", "data"), ("--valid-data", "valid_data"), ("--task", "task"), ("--tokenizer", "tokenizer"),
                 ("--steps", "steps"), ("--batch-size", "batch_size"), ("--seq-len", "seq_len"),
                 ("--grad-accum", "grad_accum"), ("--lr", "lr"), ("--warmup", "warmup"),
                 ("--weight-decay", "weight_decay"), ("--grad-clip", "grad_clip"), ("--precision", "precision"),
                 ("--compile", "compile"), ("--seed", "seed"), ("--device", "device"),
                 ("--ddp-static-graph", "static_graph"), ("--eval-every", "eval_every"),
                 ("--eval-batches", "eval_batches"), ("--save-every", "save_every"), ("--no-progress", "progress"),
                 ("--image-size", "image_size"))
PATH_OPTIONS = {"data", "valid_data", "tokenizer"}


def _given_train_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the command line set explicitly (argparse leaves the others None)."""
    given = {}
    for _, field in TRAIN_OPTIONS:
        value = getattr(args, field)
        if value is None:
            continue
        if field == "progress":
            value = not value  # --no-progress
        if field in PATH_OPTIONS and not (field in ("data", "valid_data") and _is_image_set_name(args, value)):
            value = str(Path(value).absolute())
        given[field] = value
    return given


def _is_image_set_name(args: argparse.Namespace, value: str) -> bool:
    """A named image set (mnist, ...): kept as its name, not made a path."""
    from .images import is_named_set

    return getattr(args, "task", None) == "images" and is_named_set(value)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    if args.resume:
        cfg, model_config = _resume_settings(args)
    else:
        cfg, model_config = _new_run_settings(args, TrainConfig)
    history = train(cfg, model_config)
    last_eval = [r for r in history if r["split"] == "eval"][-1:]
    if last_eval and _is_first_rank():
        from .train import describe_eval

        print(f"done: step {last_eval[0]['step']}, {describe_eval(last_eval[0])}; run directory {args.out}")
    return 0


def _new_run_settings(args: argparse.Namespace, TrainConfig):
    from .tokenizer import load_tokenizer

    given = _given_train_options(args)
    if args.init_from:
        if args.config:
            raise UserError("give --init-from or --config, not both: --init-from brings its own config")
        from .checkpoint import resolve_checkpoint

        args.config = str(resolve_checkpoint(args.init_from) / "config.json")
    cfg = TrainConfig(out=args.out, init_from=args.init_from, **given)
    cfg.validate()  # the options first: a tokenizer is not loaded for a run that cannot start
    if cfg.task == "images":
        return _new_image_run_settings(args, cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model_config = model_config_from_args(args, seq_len=cfg.seq_len,
                                          vocab_size=None if tokenizer.kind == "bytes" else tokenizer.vocab_size)
    return cfg, model_config


def _new_image_run_settings(args: argparse.Namespace, cfg):
    """An image run: the sequence is every sub-pixel of an image; the model's image_shape and axial positions
    follow the images (a model flag given explicitly still wins)."""
    import math

    from .images import image_shape_of, parse_image_size

    shape = image_shape_of(cfg.data, parse_image_size(cfg.image_size))
    if args.seq_len is not None and args.seq_len != math.prod(shape):
        raise UserError(f"the images are {shape[0]}x{shape[1]}x{shape[2]} = {math.prod(shape):,} sub-pixels, so "
                        f"--seq-len must be {math.prod(shape)} (or left out), got {args.seq_len}")
    cfg.seq_len = math.prod(shape)
    model_config = model_config_from_args(args, seq_len=cfg.seq_len, defaults={"image_shape": shape})
    return cfg, model_config


def _resume_settings(args: argparse.Namespace):
    """The run's own options and model config, with the flags given again checked against them."""
    from .images import is_named_set
    from .train import check_data_unchanged, run_settings

    if args.config or args.init_from:
        raise UserError("--resume continues the run with its own config and weights; drop --config / --init-from")
    cfg, model_config = run_settings(args.out)
    changes, model = [], model_config.to_dict()
    for field, value in _given_train_options(args).items():
        saved = getattr(cfg, field)
        if field in PATH_OPTIONS and saved is not None and _same_file(value, saved):
            continue
        if field in PATH_OPTIONS and saved is not None and not Path(saved).is_absolute():
            changes.append(f"{next(f for f, name in TRAIN_OPTIONS if name == field)} {saved} -> {value}")
            setattr(cfg, field, value)  # a run from before absolute paths: its relative path is where this is
            continue
        if value != saved:
            flag = next(f for f, name in TRAIN_OPTIONS if name == field)
            if field not in RESUME_MAY_CHANGE:
                raise UserError(f"{flag} {value} differs from the run's {getattr(cfg, field)}; drop {flag} to resume "
                                "the run as it was started, or start a new run with a new --out")
            changes.append(f"{flag} {getattr(cfg, field)} -> {value}")
            setattr(cfg, field, value)
    for field, value in _model_flags(args).items():
        if value != model[field]:
            flag = "--" + ("model-seed" if field == "seed" else field.replace("_", "-"))
            if field not in MODEL_MAY_CHANGE:
                raise UserError(f"{flag} {value} differs from the run's {model[field]}; drop {flag} to resume the "
                                "run as it was started, or start a new run with a new --out")
            changes.append(f"{flag} {model[field]} -> {value}")
            model[field] = value
    cfg.resume, cfg.out, cfg.init_from = True, args.out, None
    for field in ("data", "valid_data"):
        path = getattr(cfg, field)
        if cfg.task == "images" and path is not None and is_named_set(path):
            continue
        if path is not None and not Path(path).is_absolute() and not Path(path).exists():
            raise UserError(f"the run's {field.replace('_', ' ')} file {path} (a path relative to where it was "
                            f"started) is not found from here; give --{field.replace('_', '-')} with its path")
    cfg.validate()
    check_data_unchanged(args.out, cfg)
    if changes and _is_first_rank():
        print(f"reformer train: resuming {args.out} with {'; '.join(changes)}", file=sys.stderr)
    return cfg, ReformerConfig.from_dict(model)


def _same_file(given: str, saved: str) -> bool:
    """The same file: the same path once resolved, or (a tokenizer copied into the run) the same bytes."""
    given, saved = Path(given), Path(saved)
    if given.exists() and saved.exists():
        return os.path.samefile(given, saved) or (given.is_file() and given.stat().st_size == saved.stat().st_size
                                                  and given.read_bytes() == saved.read_bytes())
    return given.resolve() == saved.resolve()


def _is_first_rank() -> bool:
    """Under torchrun every rank runs this command; rank 0 speaks for them."""
    return os.environ.get("RANK", "0") == "0"


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file

    if args.task == "duplication":
        return _eval_duplication(args)
    if args.data is None:
        raise UserError("give --data FILE to score, or --task duplication")
    if _is_image_model(args.checkpoint):
        return _eval_images(args)
    result = evaluate_file(args.checkpoint, args.data, seq_len=args.seq_len, max_windows=args.max_windows,
                           progress=not args.no_progress)
    print(f"{args.data}: {result['tokens']:,} tokens ({result['bytes']:,} bytes): loss {result['loss']:.4f} nats "
          f"per token, {result['bits_per_byte']:.4f} bits per byte")
    return 0


def _is_image_model(checkpoint: str) -> bool:
    from .checkpoint import load_model_config, resolve_checkpoint

    return load_model_config(resolve_checkpoint(checkpoint)).image_shape is not None


def _eval_images(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_images
    from .images import parse_image_size

    result = evaluate_images(args.checkpoint, args.data, max_images=args.max_images,
                             image_size=parse_image_size(args.image_size), progress=not args.no_progress)
    print(f"{args.data}: {result['images']:,} images ({result['sub_pixels']:,} sub-pixels): "
          f"{result['bits_per_dim']:.4f} bits/dim ({result['loss']:.4f} nats per sub-pixel)")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    from .checkpoint import resolve_checkpoint
    from .complete import complete_images, completion_grid, save_png
    from .images import conform, load_images
    from .train import load_for_eval

    out = Path(args.out)
    _check_new_dir(out, "--out")
    model = load_for_eval(resolve_checkpoint(args.checkpoint))
    shape = model.config.image_shape
    if shape is None:
        raise UserError(f"{args.checkpoint} is not an image model (no image_shape in its config); give the run of "
                        "a `reformer train --task images`")
    if args.image is None and args.keep_rows:
        raise UserError("--keep-rows keeps the top rows of a given image: give --image FILE_OR_DIR (or --keep-rows 0 "
                        "to sample whole images)")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be a whole number >= 1, got {args.max_images}")
    given, names = None, [""]
    if args.image is not None:
        images = load_images(args.image, split="test", channels=shape[2])
        if images.shape[:2] != tuple(shape[:2]):
            warnings.warn(f"the given images are {images.shape[0]}x{images.shape[1]} pixels; resized to the model's "
                          f"{shape[0]}x{shape[1]}")
        if args.max_images is None and len(images) > MAX_IMAGES_UNASKED:
            raise UserError(f"{args.image} holds {len(images):,} images, each completed --samples times; give "
                            f"--max-images N to complete the first N (or all {len(images)})")
        images = images.take(0, min(len(images), args.max_images)) if args.max_images else images
        given = conform(images, tuple(shape[:2])).array
        names = _output_names(images.names)
    completion = complete_images(model, given, keep_rows=args.keep_rows, samples=args.samples,
                                 temperature=args.temperature, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, row in zip(names, completion.samples):
        for k, sample in enumerate(row):
            save_png(sample, out / f"{name + '-' if name else ''}sample-{k + 1}.png")
    save_png(completion_grid(completion, given, args.keep_rows), out / "grid.png")
    print(f"wrote {completion.samples.shape[0] * args.samples} completed images and the grid {out / 'grid.png'}; "
          f"{completion.sampled_tokens:,} sub-pixels sampled at {completion.tokens_per_s:,.0f} tokens/s")
    return 0


def _output_names(names: list[str]) -> list[str]:
    """A file-name stem per given image: "photo" for photo.png, "digits-3" for digits.npy[3], "test-3" for a named
    set's test[3]; numbered when two would be the same (a/x.png and b/x.png)."""
    stems = []
    for name in names:
        base = name.split(":")[-1]  # a named set's or an .npz's "test[3]"
        indexed = re.fullmatch(r"(.*)\[(\d+)\]", base)
        base = f"{Path(indexed.group(1)).stem}-{indexed.group(2)}" if indexed else Path(base).stem
        stems.append(re.sub(r"[^\w.-]+", "_", base) or "image")
    if len(set(stems)) < len(stems):
        stems = [f"{stem}-{i + 1}" for i, stem in enumerate(stems)]
    return stems


def _eval_duplication(args: argparse.Namespace) -> int:
    from .evaluate import duplication_table, format_table2
    from .train import load_for_eval

    model = load_for_eval(args.checkpoint)
    train_json = Path(args.checkpoint) / "train.json"
    length = args.seq_len or (json.loads(train_json.read_text())["seq_len"] if train_json.is_file()
                              else model.config.max_seq_len)
    trained_with = f"LSH-{model.config.n_hashes}" if "lsh" in model.config.attn_layers else "Full Attention"
    table = duplication_table(model, length=length, n_examples=args.max_windows or 32)
    print(format_table2({f"{trained_with} (this model)": table}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import resolve_checkpoint
    from .generate import check_sampling_args, generate
    from .tokenizer import find_tokenizer
    from .train import load_for_eval

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    source = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_for_eval(source), find_tokenizer(source)
    if model.config.image_shape is not None:
        raise UserError(f"{args.checkpoint} is an image model; sample images with `reformer complete`")
    prompt = torch.as_tensor(tokenizer.encode(args.prompt.encode("utf-8"))[0], dtype=torch.long)
    if len(prompt) == 0:
        raise UserError("the prompt is empty; give --prompt some text")
    if int(prompt.max()) >= model.config.vocab_size:
        raise UserError(f"the prompt has tokens >= {model.config.vocab_size}, outside this model's vocabulary; "
                        "use characters the model was trained on")
    room = model.config.max_seq_len - len(prompt)
    if args.max_new_tokens > room:
        raise UserError(f"the prompt ({len(prompt)} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
                        f"model's max_seq_len {model.config.max_seq_len}; give --max-new-tokens {max(room, 0)} or "
                        "less, or a shorter prompt")
    stream = _Utf8Stream(sys.stdout)
    stream.write(args.prompt.encode("utf-8"))
    continuation = _Continuation(tokenizer, prompt.tolist())
    eos = model.config.eos_token_id
    for token in generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed):
        if token == eos:
            break
        stream.write(continuation.add(token))
    stream.write(continuation.rest())
    stream.close()
    return 0


class _Continuation:
    """The bytes that generated tokens add after the prompt, as soon as they are settled.

    Bytes are tokens: each token is its byte. Otherwise the prompt and the tokens are decoded together (a
    piece's text depends on its neighbours: SentencePiece's leading space), and a trailing U+FFFD (a
    character whose bytes have not all come yet) is held back until the next token settles it.
    """

    HELD = "\ufffd".encode()

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.ids, self.written = tokenizer, list(prompt_ids), b""
        self.start = len(tokenizer.decode(prompt_ids)) if tokenizer.kind != "bytes" else 0

    def add(self, token: int) -> bytes:
        if self.tokenizer.kind == "bytes":
            return bytes([token]) if token < 256 else f"<{token}>".encode()
        self.ids.append(token)
        text = self._text()
        settled = text[:-len(self.HELD)] if text.endswith(self.HELD) else text
        return self._take(settled)

    def rest(self) -> bytes:
        return b"" if self.tokenizer.kind == "bytes" else self._take(self._text())

    def _text(self) -> bytes:
        return self.tokenizer.decode(self.ids)[self.start:]

    def _take(self, text: bytes) -> bytes:
        if not text.startswith(self.written):  # an earlier piece read otherwise now: carry on after it
            self.written = text[:len(self.written)]
        new, self.written = text[len(self.written):], max(text, self.written, key=len)
        return new


class _Utf8Stream:
    """Writes bytes to a text stream as soon as they form whole UTF-8 characters."""

    def __init__(self, out):
        import codecs

        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> None:
        self.out.write(self.decoder.decode(data))
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()


def _check_new_dir(path: Path, flag: str) -> None:
    """A directory we may write a model into: absent or empty (nothing of the user's is overwritten)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a new or empty directory")
    if path.is_dir() and any(path.iterdir()):
        shown = ", ".join(sorted(os.listdir(path))[:4])
        raise UserError(f"{flag} {path} is not empty ({shown}); give a new or empty directory: nothing there is "
                        "overwritten")


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    from .checkpoint import resolve_checkpoint
    from .hf import from_hf, to_hf
    from .tokenizer import FOUND, find_tokenizer
    from .train import load_for_eval

    if (args.from_hf is None) == (args.to_hf is None):
        raise UserError("give exactly one of --from-hf HF_DIR or --to-hf RUN_DIR")
    out = Path(args.out)
    _check_new_dir(out, "--out")
    if args.from_hf is not None:
        model = from_hf(args.from_hf)
        model.save_pretrained(out)
        for name in FOUND:  # its tokenizer (spiece.model for google/reformer-crime-and-punishment) comes along
            if (Path(args.from_hf) / name).is_file():
                shutil.copyfile(Path(args.from_hf) / name, out / name)
        print(f"wrote {out} ({model.config.n_layers} layers {','.join(model.config.attn_layers)}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters); "
              f"use it with --checkpoint {out}, or train on with --init-from {out}")
        return 0
    source = resolve_checkpoint(args.to_hf)
    model, tokenizer = load_for_eval(source), find_tokenizer(source)
    fold = {"auto": None, "yes": True, "no": False}[args.fold_bias]
    to_hf(model, out, strict=not args.allow_differences, fold_bias=fold)
    if tokenizer.path is not None:  # HF's ReformerTokenizer reads spiece.model
        shutil.copyfile(tokenizer.path, out / ("spiece.model" if tokenizer.kind == "sentencepiece" else
                                               "tokenizer.json"))
    architecture = "ReformerModelWithLMHead" if model.config.causal else "ReformerForMaskedLM"
    print(f"wrote {out}; load it with transformers.{architecture}.from_pretrained({str(out)!r})")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    files = fetch(args.name, args.dir, url=args.url)
    for role, path in files.items():
        print(f"{role}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .fetch import NAMES
    from .train import TrainConfig

    def default(field: str) -> str:
        return f"(default {getattr(TrainConfig, field)})"

    parser = _Parser(prog="reformer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model on a text file or the duplication task")
    what = tr.add_argument_group("data")
    what.add_argument("--data", help="a file of any bytes (UTF-8 or not); bytes are tokens unless --tokenizer")
    what.add_argument("--valid-data", help="a separate validation file (default: the last 5%% of --data)")
    what.add_argument("--task", choices=["duplication", "images"], help="duplication: the paper's synthetic task "
                      "(0 w 0 w); images: pixels of --data (a directory of images, a .npy/.npz array, or mnist, "
                      "fashion-mnist, cifar10, mnist-5k), sub-pixels in raster order; see docs/images.md")
    what.add_argument("--image-size", metavar="HxW", help="--task images: resize every image to HxW (default: all "
                      "images must share one size)")
    what.add_argument("--tokenizer", metavar="FILE", help="a SentencePiece .model or a tokenizers tokenizer.json, "
                      "stored in the run (eval and generate use it); default: bytes are tokens")
    what.add_argument("--out", required=True, help="run directory: config, metrics.jsonl, checkpoints, curves.png; "
                      "new, empty, or a run of ours (nothing else is overwritten)")
    opt = tr.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, help=f"optimizer steps in total {default('steps')}")
    opt.add_argument("--batch-size", type=int,
                     help=f"sequences per micro-batch, over all processes together {default('batch_size')}")
    opt.add_argument("--seq-len", type=int, help=f"tokens per sequence {default('seq_len')}")
    opt.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step {default('grad_accum')}")
    opt.add_argument("--lr", type=float, help=f"peak AdamW learning rate {default('lr')}")
    opt.add_argument("--warmup", type=int, help=f"linear warm-up steps before the cosine decay {default('warmup')}")
    opt.add_argument("--weight-decay", type=float, help=f"AdamW weight decay {default('weight_decay')}")
    opt.add_argument("--grad-clip", type=float, help=f"max gradient norm; 0 turns clipping off {default('grad_clip')}")
    opt.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: torch.autocast(bfloat16); softmax "
                     f"statistics, loss, weights and AdamW stay float32 {default('precision')}")
    opt.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the position-wise parts (feed-forward, projections, loss); see docs/training.md")
    opt.add_argument("--seed", type=int, help=f"seed of the data order (the model has --model-seed) {default('seed')}")
    par = tr.add_argument_group("devices (under `torchrun --nproc_per_node N`, one process per rank)")
    par.add_argument("--device", choices=["auto", "cpu", "cuda"],
                     help=f"auto: CUDA when there is one (each rank on cuda:LOCAL_RANK), else the CPU {default('device')}")
    par.add_argument("--ddp-static-graph", dest="static_graph", action="store_true", default=None,
                     help="DistributedDataParallel(static_graph=True)")
    run = tr.add_argument_group("evaluation and checkpoints")
    run.add_argument("--eval-every", type=int, help=f"steps between evaluations (0: at the end) {default('eval_every')}")
    run.add_argument("--eval-batches", type=int, help=f"held-out batches per evaluation {default('eval_batches')}")
    run.add_argument("--save-every", type=int,
                     help=f"steps between checkpoints (0: at the end) {default('save_every')}")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest intact "
                     "checkpoint, with the run's own data, model and options (flags given again must agree; "
                     "--steps, --eval-every, --eval-batches, --save-every, devices and execution may change)")
    run.add_argument("--init-from", metavar="MODEL_DIR", default=None,
                     help="start from these weights and their config (a run, a checkpoint, or "
                          "`reformer convert --from-hf` output); model flags may change execution fields")
    run.add_argument("--no-progress", dest="progress", action="store_true", default=None, help="no progress bar")
    add_model_flags(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="bits per byte of a trained model on a file")
    ev.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ev.add_argument("--data", help="the file to score")
    ev.add_argument("--task", choices=["duplication"], help="accuracy table of a duplication-task model "
                    "(full attention and LSH with 8, 4, 2, 1 hashes)")
    ev.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ev.add_argument("--max-windows", type=int, default=None,
                    help="score at most this many windows (duplication: examples, default 32)")
    ev.add_argument("--max-images", type=int, default=None, help="an image model: score at most this many images")
    ev.add_argument("--image-size", metavar="HxW", default=None, help="an image model: resize the images to HxW")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    cm = sub.add_parser("complete", help="complete images from their top rows (or sample whole ones) with an "
                        "image model; writes PNGs and a grid")
    cm.add_argument("--checkpoint", required=True, help="the run (or checkpoint) of `reformer train --task images`")
    cm.add_argument("--image", metavar="FILE_OR_DIR", default=None, help="the image(s) to complete: a file, a "
                    "directory, a .npy/.npz array or a named set's test images (resized to the model's size)")
    cm.add_argument("--keep-rows", type=int, required=True, help="rows of each given image kept as they are; the "
                    "model samples the rest (0: whole images, no --image needed)")
    cm.add_argument("--samples", type=int, default=4, help="completions of each image (default 4)")
    cm.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = the most likely "
                    "value (default 1.0)")
    cm.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    cm.add_argument("--max-images", type=int, default=None, help="complete at most this many of the given images")
    cm.add_argument("--out", required=True, help="a new or empty directory for the PNGs and grid.png")
    cm.set_defaults(func=cmd_complete)

    ge = sub.add_parser("generate", help="sample text from a trained model, streamed as it is produced")
    ge.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    ge.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    ge.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    ge.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much mass")
    ge.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    ge.set_defaults(func=cmd_generate)

    co = sub.add_parser("convert", help="Hugging Face Reformer checkpoints: load theirs, write ours as theirs")
    co.add_argument("--from-hf", metavar="HF_DIR", help="an HF ReformerModelWithLMHead / ReformerForMaskedLM "
                    "directory (config.json with model.safetensors or pytorch_model.bin)")
    co.add_argument("--to-hf", metavar="RUN_DIR", help="a run directory, one of its checkpoints, or a model directory")
    co.add_argument("--out", required=True, help="the directory to write")
    co.add_argument("--allow-differences", action="store_true",
                    help="--to-hf: write even where HF would compute something else (each difference is printed)")
    co.add_argument("--fold-bias", choices=["auto", "yes", "no"], default="auto",
                    help="--to-hf: fold the head bias into the final LayerNorm (auto: when the installed "
                         "transformers ignores lm_head.bias, as 5.0-5.23 do)")
    co.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fe = data_sub.add_parser("fetch", help="download a dataset into the cache and check its sha256")
    fe.add_argument("name", choices=NAMES, help="which dataset")
    fe.add_argument("--dir", default=None, help="cache directory (default: $REFORMER_CACHE or ~/.cache/reformer)")
    fe.add_argument("--url", default=None, help="download from this URL (a mirror, or file://) instead")
    fe.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a one-line usage error (2)
        return stop.code if isinstance(stop.code, int) else 2
    debug = os.environ.get("REFORMER_DEBUG", "") not in ("", "0")
    from .checkpoint import forget_fallback_warnings

    forget_fallback_warnings()
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: print(f"reformer {args.command}: warning: {message}",
                                                                   file=sys.stderr)
        try:
            return args.func(args)
        except KeyboardInterrupt as interrupt:
            print(f"reformer {args.command}: {_interrupted(args, interrupt)}", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - user-facing errors become one line
            if _is_user_error(e) and not debug:
                print(f"reformer {args.command}: error: {_one_line(e)}", file=sys.stderr)
                return 2
            raise


def _interrupted(args: argparse.Namespace, interrupt: KeyboardInterrupt) -> str:
    """What an interrupt left behind, in one line."""
    from .train import Interrupted

    if isinstance(interrupt, Interrupted):
        if interrupt.checkpoint is None:
            return "interrupted before the first step ended; nothing was saved"
        saved = "saved" if interrupt.saved_now else "before a new step ended; its latest checkpoint is"
        return (f"interrupted at step {interrupt.step}; {saved} {interrupt.checkpoint}; "
                f"`reformer train --out {args.out} --resume` continues")
    if args.command != "train":
        return "interrupted"
    from .checkpoint import CheckpointError, latest_checkpoint

    try:
        latest = latest_checkpoint(args.out) if Path(args.out).is_dir() else None
    except CheckpointError:
        latest = None
    if latest is None:
        return "interrupted; no checkpoint was saved"
    return f"interrupted; `reformer train --out {args.out} --resume` continues from {latest}"


def _one_line(error: Exception) -> str:
    message = str(error) if not isinstance(error, OSError) or not error.filename else (
        f"{error.filename}: {error.strerror or error}")
    return " ".join(message.split()) or type(error).__name__


def _is_user_error(e: Exception) -> bool:
    from .checkpoint import CheckpointError
    from .fetch import FetchError

    return isinstance(e, (UserError, CheckpointError, FetchError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
