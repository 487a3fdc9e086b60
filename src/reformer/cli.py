"""The `reformer` command line: it parses arguments and calls library functions, nothing else.

    reformer train --data FILE | --task duplication --out RUN_DIR [options] [model flags]
    torchrun --nproc_per_node N -m reformer train ...     (data-parallel: one process per rank)
    reformer eval --checkpoint RUN_DIR --data FILE | --task duplication
    reformer generate --checkpoint RUN_DIR --prompt TEXT [--temperature T --top-k K --top-p P --seed S]
    reformer data fetch enwik8|crime-and-punishment [--dir DIR]
    reformer convert --from-hf HF_DIR --out MODEL_DIR
    reformer convert --to-hf RUN_DIR --out HF_DIR [--allow-differences] [--fold-bias auto|yes|no]

Every model flag (`--d-model`, `--attn-layers lsh,local`, ...) overrides one field of
`ReformerConfig`; its help is the field's comment in `reformer/config.py`.
Errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
import warnings
from pathlib import Path

from .config import ReformerConfig, default_axial_dims, default_axial_shape, saved_fields

TRAIN_MODEL_DEFAULTS = dict(vocab_size=256, d_model=128, n_heads=2, d_head=64, d_ff=256,
                            attn_layers=("local", "lsh", "local", "lsh"), lsh_chunk_size=64, local_chunk_size=64,
                            n_hashes=2, ff_chunk_size=1024)


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


# --- model flags from the config dataclass ------------------------------------

def _field_comments() -> dict[str, str]:
    source = inspect.getsource(ReformerConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


def _parse_field(kind: str):
    def parse(text: str):
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
        group.add_argument(flag, dest=f"model_{field.name}", type=_parse_field(kind), default=None,
                           metavar=_metavar(kind), help=comments.get(field.name, ""))


def _metavar(kind: str) -> str:
    if "tuple" in kind:
        return "A,B,..."
    return kind.split("|")[0].split("[")[0].strip().upper()


def model_config_from_args(args: argparse.Namespace, seq_len: int | None = None) -> ReformerConfig:
    """--config JSON, then the training defaults for what it lacks, then every explicit flag."""
    data = dict(TRAIN_MODEL_DEFAULTS)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path} is not valid JSON ({e}); write it with ReformerConfig.to_json") from e
        data.update(saved_fields(loaded) if getattr(args, "init_from", None) else loaded)  # a saved model's
    explicit = {k[len("model_"):]: v for k, v in vars(args).items() if k.startswith("model_") and v is not None}
    data.update(explicit)
    if seq_len is not None and "max_seq_len" not in explicit and "max_seq_len" not in data:
        data["max_seq_len"] = seq_len
    data.setdefault("max_seq_len", seq_len or 4096)
    if "axial_shape" not in data:
        data["axial_shape"] = default_axial_shape(data["max_seq_len"])
    if "axial_dims" not in data and data["axial_shape"] is not None:
        data["axial_dims"] = default_axial_dims(data.get("d_model", 256), len(data["axial_shape"]))
    try:
        return ReformerConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}") from e


# --- subcommands ------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    if args.init_from:
        if args.config:
            raise UserError("give --init-from or --config, not both: --init-from brings its own config")
        from .checkpoint import resolve_checkpoint

        args.config = str(resolve_checkpoint(args.init_from) / "config.json")
    model_config = model_config_from_args(args, seq_len=args.seq_len)
    cfg = TrainConfig(
        out=args.out, data=args.data, task=args.task, valid_data=args.valid_data, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        precision=args.precision, seed=args.seed, resume=args.resume, progress=not args.no_progress,
        init_from=args.init_from, device=args.device, static_graph=args.ddp_static_graph, compile=args.compile,
    )
    history = train(cfg, model_config)
    last_eval = [r for r in history if r["split"] == "eval"][-1:]
    if last_eval:
        print(f"done: step {last_eval[0]['step']}, eval loss {last_eval[0]['loss']:.4f} "
              f"({last_eval[0]['bpc']:.4f} bits per token); run directory {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file

    if args.task == "duplication":
        return _eval_duplication(args)
    if args.data is None:
        raise UserError("give --data FILE to score, or --task duplication")
    result = evaluate_file(args.checkpoint, args.data, seq_len=args.seq_len, max_windows=args.max_windows,
                           progress=not args.no_progress)
    print(f"{result['tokens']:,} tokens: loss {result['loss']:.4f} nats, {result['bpc']:.4f} bits per byte")
    return 0


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
    from .data import encode
    from .generate import check_sampling_args, generate
    from .train import load_for_eval

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    model = load_for_eval(args.checkpoint)
    prompt = encode(args.prompt)
    if model.config.vocab_size < 256 and len(prompt) and int(prompt.max()) >= model.config.vocab_size:
        raise UserError(f"the prompt has bytes >= {model.config.vocab_size}, outside this model's vocabulary; "
                        "use characters the model was trained on")
    stream = _Utf8Stream(sys.stdout)
    stream.write(bytes(prompt.tolist()))
    for token in generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed):
        stream.write(bytes([token]) if token < 256 else f"<{token}>".encode())
    stream.close()
    return 0


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


def cmd_convert(args: argparse.Namespace) -> int:
    from .hf import from_hf, to_hf
    from .train import load_for_eval

    if (args.from_hf is None) == (args.to_hf is None):
        raise UserError("give exactly one of --from-hf HF_DIR or --to-hf RUN_DIR")
    out = Path(args.out)
    if args.from_hf is not None:
        model = from_hf(args.from_hf)
        model.save_pretrained(out)
        print(f"wrote {out} ({model.config.n_layers} layers {','.join(model.config.attn_layers)}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters); "
              f"use it with --checkpoint {out}, or train on with --init-from {out}")
        return 0
    model = load_for_eval(args.to_hf)
    fold = {"auto": None, "yes": True, "no": False}[args.fold_bias]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_hf(model, out, strict=not args.allow_differences, fold_bias=fold)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
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
    parser = argparse.ArgumentParser(prog="reformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model on a text file or the duplication task")
    what = tr.add_argument_group("data")
    what.add_argument("--data", help="a file of any bytes (UTF-8 or not); bytes are tokens")
    what.add_argument("--valid-data", help="a separate validation file (default: the last 5%% of --data)")
    what.add_argument("--task", choices=["duplication"], help="the paper's synthetic task: 0 w 0 w")
    what.add_argument("--out", required=True, help="run directory: config, metrics.jsonl, checkpoints, curves.png")
    opt = tr.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    opt.add_argument("--batch-size", type=int, default=8,
                     help="sequences per micro-batch, over all processes together (default 8)")
    opt.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    opt.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    opt.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                     help="bf16: torch.autocast(bfloat16); softmax statistics, loss, weights and AdamW stay float32")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile the position-wise parts (feed-forward, projections, loss); see README")
    opt.add_argument("--seed", type=int, default=0, help="seed of the data order (the model has --model-seed)")
    par = tr.add_argument_group("devices (under `torchrun --nproc_per_node N`, one process per rank)")
    par.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: CUDA when there is one (each rank on cuda:LOCAL_RANK), else the CPU")
    par.add_argument("--ddp-static-graph", action="store_true", help="DistributedDataParallel(static_graph=True)")
    run = tr.add_argument_group("evaluation and checkpoints")
    run.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (0: at the end)")
    run.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    run.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: at the end)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    run.add_argument("--init-from", metavar="MODEL_DIR", default=None,
                     help="start from these weights and their config (a run, a checkpoint, or "
                          "`reformer convert --from-hf` output); model flags may change execution fields")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    ge = sub.add_parser("generate", help="sample text from a trained model, streamed as it is produced")
    ge.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    ge.add_argument("--prompt", required=True, help="the text to continue")
    ge.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    ge.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    ge.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes only")
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
    fe.add_argument("name", choices=["enwik8", "crime-and-punishment"], help="which dataset")
    fe.add_argument("--dir", default=None, help="cache directory (default: $REFORMER_CACHE or ~/.cache/reformer)")
    fe.add_argument("--url", default=None, help="download from this URL (a mirror, or file://) instead")
    fe.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; `--resume` continues from the latest checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line
        if _is_user_error(e):
            print(f"reformer {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    from .checkpoint import CheckpointError

    names = {type(c).__name__ for c in type(e).__mro__}
    return isinstance(e, (UserError, CheckpointError, ValueError, FileNotFoundError)) or bool(
        names & {"DataError", "FetchError"})


if __name__ == "__main__":
    sys.exit(main())
