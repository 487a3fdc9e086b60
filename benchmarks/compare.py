"""Training-step speed and memory, side by side: ours, HF's Reformer, reformer_pytorch, an SDPA Transformer.

Every contender is the same model: a 6-layer causal LM, d_model 256, 4 heads x
64, d_ff 1024, byte vocabulary, batch 1. The Reformers use LSH attention in
every layer (chunks of 64, 4 hashes, buckets from the length) and reversible
layers; the baseline is a plain pre-LayerNorm Transformer whose attention is
PyTorch's `scaled_dot_product_attention(is_causal=True)` (on CUDA limited to the flash kernel, or the
memory-efficient one where flash cannot run, as for float32). Ours runs its
feed-forward and loss in chunks (ff_chunk_size 1024, loss_chunk_size 4096, the
fastest of 1024, 2048 and 4096 here); the peers run with their own defaults.

Each (contender, length) runs in a fresh process: one warm-up step, then up to
--repeats timed steps (forward, backward, AdamW) while they fit in --budget
seconds; the table shows the median step time, tokens/s and the process's peak
memory (RSS from getrusage; on CUDA, torch.cuda.max_memory_allocated). Ours
calls `reformer.memory.release_freed_memory_eagerly()` first (glibc's mmap and
trim thresholds), as docs/training.md recommends; the peers keep glibc's defaults,
which suit them better (with our setting their large temporaries are mapped
and faulted in afresh every time). Cells
run in alternation (every contender at one length before the next length). A
contender is skipped, with the reason in the table, when its previous length
failed or when extrapolating its last two lengths predicts more than
--max-memory-gib or a step longer than --max-step-s.

FLOPs (ours, analytic, multiply-add = 2): per layer and token, the two
projections and the output projection 3 * 2 * d * (h * dh), the feed-forward
2 * 2 * d * d_ff, the attention 4 * w * dh * h * rounds (q.k and p.v over a
window of w = 2 * chunk keys); the head 2 * 2d * vocab. A training step counts
3x the forward (forward + backward). What the step computes again is not
counted in the model FLOPs: the reversible recompute (one more forward of every
layer, less the attention products of the layers that kept their attention),
the loss tail's recompute in chunks, and the q.k products that the attention
backward recomputes from the log-sum-exps; less the feed-forward's second
product in the layers whose feed-forward output was kept. The targets table gives them apart,
as the FLOPs the step executes. The machine's rate is the median of 5 4096^3
matrix products in the same run, in the precision of the run (the environment variable
REFORMER_RATE_SIZE=N makes them N^3: the test suite's smoke runs use 1024 to save time): once at the start
of each round (the header's rate: the median over the rounds), and, for our
cells, once more in the cell's own process right after its timed steps (the
targets table gives the share against both; the machine's speed drifts within
minutes, and a round of every contender lasts up to half an hour).

`ours` is our model as configured by default: `reversible_keep_attention="auto"` keeps the attention
output and plan of the latest layers that fit in 256 MiB for the backward (all 6 layers up to 16,384
tokens, 2 at 65,536), then the feed-forward outputs of the latest layers in what is left of it
(`reversible_keep_feed_forward`: 5 at 16,384); each cell reports `kept_layers`, `kept_mib`,
`kept_outputs` and `kept_outputs_mib`. `ours_keep` is our model with
`reversible_keep_attention=True` (every layer's), in the default run beside `ours`.
`ours_pytorch` is `ours` on the torch backend (REFORMER_BACKEND=torch: PyTorch's flash kernel,
batched products and float passes instead; `--tag native` writes compare_native.md); each of our cells
reports `native`, whether the native kernels were on.
`ours_prefix` is our model with prefix-consistent causal LSH (`lsh_prefix_consistent=True`, 2 * chunk
keys per round); `--tag prefix` writes its table apart (compare_prefix.md), beside `ours`.

--precision bf16 runs every contender's step under `torch.autocast` with
bfloat16 (on CPUs with AMX or AVX512-BF16, matrix products run 4x faster), and
writes compare_bf16.md and its plots; the matmul rate is then bfloat16's.

    python benchmarks/compare.py                    # writes benchmarks/results/compare.md and two plots
    python benchmarks/compare.py --lengths 1024 4096 --contenders ours sdpa --repeats 1
    python benchmarks/compare.py --precision bf16 --lengths 1024 4096 16384 --contenders ours sdpa --rounds 3
    python benchmarks/compare.py --contenders ours ours_prefix --lengths 1024 4096 16384 65536 --tag prefix
    python benchmarks/compare.py --contenders ours ours_pytorch sdpa --lengths 4096 16384 --rounds 3 --tag native
    python benchmarks/compare.py --rounds 2 | tee run.log   # interrupted? the same options and --resume run.log
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RATE_LABEL, command_line, cpu_name, matmul_gflops, run_worker, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("ours", "ours_keep", "hf", "reformer_pytorch", "sdpa", "ours_prefix", "ours_pytorch")
DEFAULT_CONTENDERS = ("ours", "ours_keep", "hf", "reformer_pytorch", "sdpa")  # ours_prefix: see --tag prefix
LABELS = {"ours": "reformer (ours)", "hf": "HF transformers Reformer", "reformer_pytorch": "reformer_pytorch",
          "sdpa": "Transformer + SDPA", "ours_prefix": "ours, prefix-consistent LSH",
          "ours_keep": "ours, reversible_keep_attention=True",
          "ours_pytorch": "ours on the torch backend (REFORMER_BACKEND=torch)"}
PRECISIONS = {"fp32": "float32", "bf16": "torch.autocast(bfloat16) around the forward, parameters and optimizer in "
              "float32"}
D_MODEL, HEADS, D_HEAD, D_FF, LAYERS, CHUNK, HASHES, VOCAB = 256, 4, 64, 1024, 6, 64, 4, 256
FF_CHUNK = 1024  # ours: positions per feed-forward chunk; (1024, d_ff) float32 is 4 MiB, from the heap


def forward_flops(length: int) -> tuple[float, float]:
    """Analytic forward FLOPs of our model for one sequence, and the part of them in the chunk attention's
    q.k and p.v products (see the module docstring)."""
    inner = HEADS * D_HEAD
    attention = 4 * (2 * CHUNK) * D_HEAD * HEADS * HASHES
    per_token_layer = 3 * 2 * D_MODEL * inner + 2 * 2 * D_MODEL * D_FF + attention
    return length * (LAYERS * per_token_layer + 2 * 2 * D_MODEL * VOCAB), length * LAYERS * attention


def model_flops_per_step(length: int) -> float:
    """Model FLOPs of a training step: 3x the forward (forward and backward), no recompute."""
    return 3.0 * forward_flops(length)[0]


def executed_flops_per_step(length: int, kept_layers: int = 0, kept_outputs: int = 0) -> float:
    """The FLOPs the step runs: the model FLOPs, the reversible backward's recompute of the whole forward (the
    tail included: it runs again chunk by chunk), without the chunk attention's products in the `kept_layers`
    layers whose attention was kept (`reversible_keep_attention`) nor the feed-forward's second product in the
    `kept_outputs` layers whose feed-forward output was kept (`reversible_keep_feed_forward`), and every layer's
    attention backward recomputing its q.k products (half of the attention's forward products)."""
    forward, attention = forward_flops(length)
    second_product = length * 2 * D_FF * D_MODEL
    return (model_flops_per_step(length) + forward - attention * kept_layers / LAYERS + attention / 2
            - second_product * kept_outputs)


# --- the contenders (each built inside its own worker process) -------------------------------------

def build_ours(length: int, device, prefix_consistent: bool = False, keep_attention: bool | str = "auto",
               malloc_mib: tuple[int, int] | None = None):
    """Our benchmark model and its loss; `malloc_mib`: glibc's (mmap, trim) thresholds in MiB instead of
    `release_freed_memory_eagerly`'s defaults."""
    from reformer import ReformerConfig, ReformerLM
    from reformer.config import default_axial_shape
    from reformer.memory import release_freed_memory_eagerly

    # as docs/training.md recommends; the peers run with glibc's defaults
    if not release_freed_memory_eagerly(*(mib << 20 for mib in malloc_mib or ())) and malloc_mib:
        raise RuntimeError(f"glibc's mallopt refused the thresholds {malloc_mib} MiB (or this is not glibc)")
    config = ReformerConfig(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, d_head=D_HEAD, d_ff=D_FF,
                            attn_layers=("lsh",) * LAYERS, lsh_chunk_size=CHUNK, n_hashes=HASHES,
                            axial_shape=default_axial_shape(length), axial_dims=(64, 192), max_seq_len=length,
                            ff_chunk_size=FF_CHUNK, loss_chunk_size=4096, reversible=True,
                            lsh_prefix_consistent=prefix_consistent,  # window: 2 * chunk keys per round
                            reversible_keep_attention=keep_attention)
    model = ReformerLM(config).to(device)
    return model, lambda ids: model(ids, labels=ids).loss


def build_hf(length: int, device):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    side = 1 << (length.bit_length() - 1) // 2
    config = transformers.ReformerConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=HEADS, attention_head_size=D_HEAD,
        feed_forward_size=D_FF, attn_layers=["lsh"] * LAYERS, lsh_attn_chunk_length=CHUNK, num_hashes=HASHES,
        num_buckets=None, is_decoder=True, axial_pos_shape=[side, length // side], axial_pos_embds_dim=[64, 192],
        max_position_embeddings=length, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=None)
    model = transformers.ReformerModelWithLMHead(config).to(device)
    return model, lambda ids: model(ids, labels=ids).loss


def build_reformer_pytorch(length: int, device):
    import torch.nn.functional as F
    from reformer_pytorch import ReformerLM as LucidReformerLM

    model = LucidReformerLM(num_tokens=VOCAB, dim=D_MODEL, depth=LAYERS, max_seq_len=length, heads=HEADS,
                            dim_head=D_HEAD, bucket_size=CHUNK, n_hashes=HASHES, causal=True, ff_mult=D_FF // D_MODEL,
                            lsh_dropout=0.0, ff_dropout=0.0, post_attn_dropout=0.0, layer_dropout=0.0).to(device)

    def loss(ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return model, loss


def build_sdpa(length: int, device):
    import contextlib

    import torch.nn.functional as F
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu_kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]  # not cuDNN's: flash where it can

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * HEADS * D_HEAD, bias=False)
            self.out = nn.Linear(HEADS * D_HEAD, D_MODEL, bias=False)
            self.ff = nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.ReLU(), nn.Linear(D_FF, D_MODEL))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, D_HEAD).permute(2, 0, 3, 1, 4)
            with sdpa_kernel(gpu_kernels) if x.is_cuda else contextlib.nullcontext():  # CUDA: flash (fp32: efficient)
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, n, dh)
            x = x + self.out(attended.transpose(1, 2).reshape(b, n, HEADS * D_HEAD))
            return x + self.ff(self.norm2(x))

    class TransformerLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.positions = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(length, D_MODEL)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, VOCAB)

        def forward(self, ids):
            x = self.embed(ids) + self.positions.weight[: ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    model = TransformerLM().to(device)

    def loss(ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return model, loss


BUILDERS = {"ours": build_ours, "hf": build_hf, "reformer_pytorch": build_reformer_pytorch, "sdpa": build_sdpa,
            "ours_prefix": lambda length, device: build_ours(length, device, prefix_consistent=True),
            "ours_keep": lambda length, device: build_ours(length, device, keep_attention=True),
            "ours_pytorch": lambda length, device: build_ours_pytorch(length, device)}


def build_ours_pytorch(length: int, device):
    """Ours with the native CPU kernels off: PyTorch's flash kernel and batched products instead."""

    os.environ["REFORMER_BACKEND"] = "torch"  # this worker process is this contender's alone
    return build_ours(length, device)


def worker(contender: str, length: int, repeats: int, budget_s: float, device_name: str,
           precision: str = "fp32") -> dict:
    import torch

    from reformer.memory import peak_rss_mib

    device = torch.device(device_name)
    torch.manual_seed(0)  # the peers initialise from the global RNG; this process is theirs
    model, loss_fn = BUILDERS[contender](length, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reports_kept = hasattr(model, "kept_attention_bytes")  # ours: what the last forward kept for the backward
    ids = torch.randint(0, VOCAB, (1, length), device=device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = step()
    times = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        times.append(step())
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else peak_rss_mib()
    cell = {"contender": contender, "length": length, "warmup_s": warm, "step_s": statistics.median(times),
            "steps": len(times), "times": times, "peak_mib": peak}
    if reports_kept:
        from reformer.attention import native

        # the rate this process gets right after its steps (after the peak is read: its operands are not ours)
        cell["matmul_after"] = [matmul_gflops(device_name, precision)]

        kept = model.kept_attention_bytes
        cell["kept_layers"], cell["kept_mib"] = len(kept), sum(kept) / 2**20
        outputs = model.kept_output_bytes
        cell["kept_outputs"], cell["kept_outputs_mib"] = len(outputs), sum(outputs) / 2**20
        from reformer.attention.backend import forced_backend

        cell["native"] = device.type == "cpu" and native.library() is not None and forced_backend() in (None, "native")
    return cell


# --- the driver ------------------------------------------------------------------------------------

def merge_runs(first: dict, other: dict) -> dict:
    """One cell measured in several rounds: the median over all their timed steps, the highest peak."""
    times = first["times"] + other["times"]
    merged = {**first, "times": times, "step_s": statistics.median(times), "steps": len(times),
              "peak_mib": max(first["peak_mib"], other["peak_mib"]), "runs": first.get("runs", 1) + 1}
    if "matmul_after" in first or "matmul_after" in other:
        merged["matmul_after"] = first.get("matmul_after", []) + other.get("matmul_after", [])
    return merged


def read_log(path: Path) -> tuple[dict[int, float], dict[tuple[int, str, int], dict]]:
    """What an earlier run printed (its stdout): each round's matmul rate, and its cells by (round, contender,
    length), so that `--resume` replays them and runs only the cells that run did not reach."""
    rates, cells, round_index = {}, {}, -1
    for line in path.read_text().splitlines():
        if line.startswith("round ") and "matmul rate" in line:
            round_index = int(line.split()[1].rstrip(":")) - 1
            rates[round_index] = float(line.split("matmul rate")[1].split()[0])
        elif line.startswith("{") and round_index >= 0:
            cell = json.loads(line)
            cells[(round_index, cell["contender"], cell["length"])] = cell
    return rates, cells


def predicted_skip(history: list[dict], length: int, args) -> str | None:
    if history and "error" in history[-1]:
        return f"skipped: failed at {history[-1]['length']:,} ({history[-1]['error']})"
    done = [h for h in history if "step_s" in h]
    if len(done) < 2:
        return None
    (l1, a), (l2, b) = [(h["length"], h) for h in done[-2:]]
    scale = math.log(length / l2) / math.log(l2 / l1)
    memory = b["peak_mib"] * (b["peak_mib"] / a["peak_mib"]) ** scale / 1024
    seconds = b["step_s"] * (b["step_s"] / a["step_s"]) ** scale
    if memory > args.max_memory_gib:
        return f"skipped: predicted {memory:.0f} GiB > {args.max_memory_gib:g} GiB"
    if seconds > args.max_step_s:
        return f"skipped: predicted {seconds:.0f} s per step > {args.max_step_s:g} s"
    return None


def run_cell(contender: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", contender, "--lengths", str(length), "--repeats",
               str(args.repeats), "--budget", str(args.budget), "--device", args.device, "--precision", args.precision]
    return run_worker(command, contender, length, timeout_s=args.max_step_s * 3 + 120)


def table(results: dict, lengths, contenders) -> list[str]:
    """The measurements: one row per length, one cell per contender."""
    rows = ["| tokens | " + " | ".join(f"{LABELS[c]}: s/step, tokens/s, peak GiB" for c in contenders) + " |",
            "|---:|" + "---|" * len(contenders)]
    for length in lengths:
        cells = []
        for contender in contenders:
            r = results.get((contender, length))
            if r is None:
                cells.append("-")
            elif "step_s" not in r:
                cells.append(r.get("skip") or f"failed: {r['error']}")
            else:
                cells.append(f"{r['step_s']:.2f} s, {length / r['step_s']:,.0f}, {r['peak_mib'] / 1024:.2f}")
        rows.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return rows


def targets_table(results: dict, lengths, contenders, rate_gflops: float) -> list[str]:
    """The issue's targets, one row per (length, our variant): speed-ups, memory ratio, FLOP rates."""
    peers = [c for c in ("hf", "reformer_pytorch") if c in contenders]
    ours_variants = [c for c in contenders if c.startswith("ours")]
    rows = ["| tokens | ours | speed-up over the faster Reformer peer | speed-up over SDPA "
            "| memory / the lower Reformer peer's | model GFLOP/s (share of the matmul rate) "
            "| share of the matmul rate measured right after its steps, in its process (that rate) "
            "| with the reversible recompute: GFLOP/s (share) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        done = {c: results[(c, length)] for c in contenders if "step_s" in results.get((c, length), {})}
        peer_done = [done[c] for c in peers if c in done]
        for variant in ours_variants:
            if variant not in done:
                continue
            ours = done[variant]
            speedup = f"{min(r['step_s'] for r in peer_done) / ours['step_s']:.2f}x" if peer_done else "-"
            over_sdpa = f"{done['sdpa']['step_s'] / ours['step_s']:.2f}x" if "sdpa" in done else "-"
            memory = f"{ours['peak_mib'] / min(r['peak_mib'] for r in peer_done):.2f}" if peer_done else "-"
            model = model_flops_per_step(length) / ours["step_s"] / 1e9
            kept, outputs = kept_layers(ours), ours.get("kept_outputs", 0)
            executed = executed_flops_per_step(length, kept, outputs) / ours["step_s"] / 1e9
            kept_text = f"attention kept in {kept} of {LAYERS} layers" + (
                f", feed-forward outputs in {outputs}" if outputs else "")
            after = adjacent_rate(ours)
            adjacent = f"**{model / after:.0%}** ({after:.0f})" if after else "-"
            rows.append(f"| {length:,} | {LABELS[variant]} ({kept_text}) | {speedup} "
                        f"| {over_sdpa} | {memory} | {model:.1f} ({model / rate_gflops:.0%}) | {adjacent} "
                        f"| {executed:.1f} ({executed / rate_gflops:.0%}) |")
    return rows


def adjacent_rate(cell: dict) -> float | None:
    """The matmul rate measured in the cell's own process right after its timed steps (the median over its
    rounds), or None for cells of runs before 2026-12-03."""
    rates = cell.get("matmul_after")
    return statistics.median(rates) if rates else None


def kept_layers(cell: dict) -> int:
    """How many layers kept their attention for the backward (cells of runs before the budget: all or none)."""
    return cell.get("kept_layers", LAYERS if cell["contender"] == "ours_keep" else 0)


def plots(results: dict, lengths, contenders, out_dir: Path, suffix: str = "") -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, ylabel, name in (("step_s", "seconds per training step", "time_vs_length.png"),
                              ("peak_mib", "peak memory (GiB)", "memory_vs_length.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for contender in contenders:
            points = [(n, results[(contender, n)][key] / (1024 if key == "peak_mib" else 1)) for n in lengths
                      if "step_s" in results.get((contender, n), {})]
            if points:
                ax.plot(*zip(*points), "o-", label=LABELS[contender])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        path = out_dir / name.replace(".png", f"{suffix}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(DEFAULT_CONTENDERS))
    p.add_argument("--peer-max-length", type=int, default=65536, help="longest length tried for the peers")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per cell (after one warm-up)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds of timed steps per cell, at least one step")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every cell this many times, the contenders in alternation; each cell reports the median "
                        "over all its timed steps (this machine's speed drifts by 10-20%% within minutes)")
    p.add_argument("--rounds-up-to", type=int, default=16384, help="longer cells run in the first round only")
    p.add_argument("--max-step-s", type=float, default=600.0, help="skip a cell predicted to be slower than this")
    p.add_argument("--max-memory-gib", type=float, default=20.0, help="skip a cell predicted to need more memory")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: every contender under torch.autocast(bfloat16); the matmul rate in bfloat16 too")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="name the outputs compare_TAG.md (and _TAG plots), e.g. for a subset")
    p.add_argument("--resume", type=Path, metavar="LOG",
                   help="the stdout of an interrupted run with the same options: its finished cells and matmul "
                        "rates are taken from there, and only the rest runs")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error(f"--rounds and --repeats must be at least 1 (got {args.rounds} and {args.repeats})")
    if args.resume is not None and not args.resume.is_file():
        p.error(f"--resume {args.resume}: no such file; give the saved stdout of the interrupted run")
    if args.worker:
        print(json.dumps(worker(args.worker, args.lengths[0], args.repeats, args.budget, args.device,
                                args.precision)))
        return

    import torch

    logged_rates, logged_cells = read_log(args.resume) if args.resume else ({}, {})
    rates: list[float] = []
    results: dict = {}
    history = {c: [] for c in args.contenders}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        rates.append(logged_rates.get(round_index) or matmul_gflops(args.device, args.precision))
        print(f"round {round_index + 1}: matmul rate {rates[-1]:.1f} GFLOP/s", flush=True)
        for length in args.lengths:
            if round_index > 0 and length > args.rounds_up_to:
                continue
            for contender in args.contenders:
                if not contender.startswith("ours") and length > args.peer_max_length:
                    continue
                previous = results.get((contender, length))
                if round_index > 0 and (previous is None or "step_s" not in previous):
                    continue  # skipped or failed in the first round
                skip = predicted_skip(history[contender], length, args) if round_index == 0 else None
                logged = logged_cells.get((round_index, contender, length))
                if logged is not None:
                    result = logged
                elif skip:
                    result = {"contender": contender, "length": length, "skip": skip}
                else:
                    result = run_cell(contender, length, args)
                print(json.dumps(result), flush=True)
                if round_index == 0:
                    results[(contender, length)] = result
                    if not skip:
                        history[contender].append(result)
                elif "step_s" in result:
                    results[(contender, length)] = merge_runs(previous, result)
    rate = statistics.median(rates)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + (f"_{args.tag}" if args.tag else "")
    written = plots(results, args.lengths, args.contenders, args.out_dir, suffix)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{cpu_name()}, {torch.get_num_threads()} threads")
    text = ["# Training step: ours beside the peers\n",
            f"Command: `{command_line('compare.py', argv)}`."
            f" {datetime.date.today()}, {device}, torch {torch.__version__}; {time.perf_counter() - started:.0f} s "
            "in all" + (f" (this invocation; the cells replayed from {args.resume.name} took what that run's log "
                        "shows)" if args.resume else "") + ".\n",
            f"Model: {LAYERS} layers, causal, d_model {D_MODEL}, {HEADS} heads x {D_HEAD}, d_ff {D_FF}, byte "
            f"vocabulary, batch 1; the Reformers: LSH attention in every layer, chunks of {CHUNK}, {HASHES} hashes, "
            f"reversible; ours with ff_chunk_size {FF_CHUNK}. Precision: {PRECISIONS[args.precision]}. Each cell: "
            "a fresh process, one warm-up step, "
            f"then up to {args.repeats} timed steps (forward, backward, AdamW)"
            + (f", in each of {args.rounds} rounds for lengths up to {args.rounds_up_to:,} (contenders in "
               "alternation); the table gives the median over all timed steps" if args.rounds > 1 else
               "; the table gives their median") + ". Memory: peak "
            f"{'torch.cuda.max_memory_allocated' if args.device.startswith('cuda') else 'RSS of the process'}.\n",
            f"Machine matmul rate ({'bfloat16' if args.precision == 'bf16' else 'float32'}, {RATE_LABEL}, median of 5"
            f"{' in each round, then over the rounds' if args.rounds > 1 else ''}): "
            f"**{rate:.1f} GFLOP/s**. Model FLOPs: see the "
            "docstring of benchmarks/compare.py.\n",
            *table(results, args.lengths, args.contenders), "",
            *targets_table(results, args.lengths, args.contenders, rate),
            "", *(f"![{path.stem}]({path.name})" for path in written)]
    write_result(args.out_dir / f"compare{suffix}.md", "\n".join(text) + "\n")
    (args.out_dir / f"compare{suffix}.json").write_text(json.dumps(
        {"matmul_gflops": rate, "matmul_gflops_per_round": rates, "results": [r for r in results.values()]},
        indent=1) + "\n")
    print("\n".join(text))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
