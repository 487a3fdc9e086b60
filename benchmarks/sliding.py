"""Sliding-window attention, forward + backward: ours, Hugging Face's LongformerSelfAttention, and dense SDPA.

Every contender is one self-attention layer on hidden states (1, n, 256): q, k, v projections to 4 heads
x 64, then the attention, then the backward of the output's sum to the input and the weights.
- ours: `reformer.attention.sliding_window_attention(window=128)`: 128 keys on each side, 257 in all,
  the same keys as HF's `attention_window=256` (HF counts both sides). Non-causal, no dilation.
- hf: `transformers`' `LongformerSelfAttention` (attention_window 256, no dropout), no global tokens.
- sdpa: `torch.nn.functional.scaled_dot_product_attention` over the whole sequence (exact, O(n^2)).
- ours, causal / ours, dilation (1, 1, 2, 2): our other options, for reference (no peer has them).
- ours, G global tokens: the first G positions (16 or 64) global (a question before its document, as
  Longformer's QA models have them), on the same q, k, v as the band: the attention's own cost of global
  tokens, beside "ours".
- ours / HF, G global tokens + q_g, k_g, v_g: Longformer's layer, with its separate global projections on
  both sides (HF's query_global, key_global, value_global): three more linear layers, like for like.

The targets (the Longformer issue's) are checked at 16,384 and 65,536 tokens: with G global tokens ours
takes at most 1.5x the band's time, and with Longformer's projections it is at least 2.5x faster than HF's
layer with at most 0.6x its memory (peak RSS, and the step's own memory).

Each (contender, length) runs in a fresh process: one warm-up step, then up to --repeats timed steps
while they fit in --budget seconds; the table gives the median seconds, the peak RSS of the process, and
the step's own memory (peak RSS minus the RSS before the first step), so that its growth with length
shows. A contender is skipped, with the reason in the table, when extrapolating its last two lengths
predicts a step longer than --max-step-s. Benchmarks are not tests: nothing here asserts a timing.

    python benchmarks/sliding.py                  # writes benchmarks/results/sliding.md and sliding.png
    python benchmarks/sliding.py --lengths 4096 --contenders ours hf --repeats 1 --out /tmp/sliding
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, cpu_name, run_worker, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
D_MODEL, HEADS, D_HEAD, WINDOW = 256, 4, 64, 128
GLOBALS = {"ours_global": 16, "ours_global64": 64, "ours_longformer": 16, "ours_longformer64": 64, "hf_global": 16,
           "hf_global64": 64}  # global tokens
GLOBAL_PROJECTIONS = ("ours_longformer", "ours_longformer64", "hf_global", "hf_global64")
# the band and its global-token runs one after the other (their ratio is a target: the machine drifts)
CONTENDERS = ("ours", "ours_global", "ours_global64", "hf", "sdpa", "ours_causal", "ours_dilated", "ours_longformer",
              "hf_global", "ours_longformer64", "hf_global64")
LABELS = {"ours": "ours", "hf": "HF LongformerSelfAttention", "sdpa": "SDPA (dense)", "ours_causal": "ours, causal",
          "ours_dilated": "ours, dilation (1, 1, 2, 2)",
          **{name: f"{'ours' if name.startswith('ours') else 'HF'}, {count} global tokens"
             + (" + q_g, k_g, v_g" if name in GLOBAL_PROJECTIONS else "") for name, count in GLOBALS.items()}}
PEERS = {"hf": "ours", "sdpa": "ours", "hf_global": "ours_longformer", "hf_global64": "ours_longformer64"}  # : ours
TARGET_LENGTHS = (16384, 65536)
BAND_TARGET, SPEED_TARGET, MEMORY_TARGET = 1.5, 2.5, 0.6


def projections(torch, count: int = 3):
    return [torch.nn.Linear(D_MODEL, HEADS * D_HEAD) for _ in range(count)]


def global_positions(torch, contender: str, length: int):
    """(1, n) bool: the first GLOBALS[contender] positions."""
    return torch.arange(length)[None] < GLOBALS[contender]


def build(contender: str, length: int):
    """A function of the hidden states (1, n, d_model) -> attention output, and the parameters it owns."""
    import torch

    if contender.startswith("hf"):
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(hidden_size=D_MODEL, num_attention_heads=HEADS, attention_window=[2 * WINDOW],
                                  attention_probs_dropout_prob=0.0)
        layer = LongformerSelfAttention(config, layer_id=0)
        mask = torch.zeros(1, length)  # HF's encoding: 0 local, > 0 global, < 0 padding
        if contender in GLOBALS:
            mask[global_positions(torch, contender, length)] = 1.0

        def hf(x):
            return layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                         is_global_attn=bool((mask > 0).any()))[0]
        return hf, list(layer.parameters())

    import torch.nn.functional as F

    from reformer.attention import sliding_window_attention

    layers = projections(torch, 6 if contender in GLOBAL_PROJECTIONS else 3)  # q, k, v (and q_g, k_g, v_g)
    params = [p for layer in layers for p in layer.parameters()]
    options = dict(window=WINDOW, causal=contender == "ours_causal",
                   dilation=(1, 1, 2, 2) if contender == "ours_dilated" else 1)
    if contender in GLOBALS:
        options["global_mask"] = global_positions(torch, contender, length)

    def heads(x):
        return x.view(1, length, HEADS, D_HEAD).transpose(1, 2)  # (1, h, n, d)

    def attend(x):
        q, k, v, *global_qkv = (heads(layer(x)) for layer in layers)
        if contender == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = sliding_window_attention(q, k, v, global_qkv=tuple(global_qkv) or None, **options)
        return out.transpose(1, 2).reshape(1, length, HEADS * D_HEAD)
    return attend, params


def worker(contender: str, length: int, repeats: int, budget_s: float) -> dict:
    import torch

    from reformer.memory import current_rss_mib, peak_rss_mib

    torch.manual_seed(0)  # HF initialises from the global RNG; this process is the benchmark's
    fn, params = build(contender, length)
    x = torch.randn(1, length, D_MODEL, requires_grad=True)
    before = current_rss_mib()

    def step() -> float:
        start = time.perf_counter()
        fn(x).sum().backward()
        x.grad = None
        for p in params:
            p.grad = None
        return time.perf_counter() - start

    warm = step()
    times = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        times.append(step())
    peak = peak_rss_mib()
    return {"contender": contender, "length": length, "warmup_s": warm, "step_s": statistics.median(times),
            "steps": len(times), "peak_mib": peak, "step_mib": peak - before}


def run_cell(contender: str, length: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", contender, "--lengths", str(length), "--repeats",
               str(args.repeats), "--budget", str(args.budget)]
    return run_worker(command, contender, length, timeout_s=args.max_step_s * 4 + 120)


def predicted_skip(history: list[dict], length: int, max_step_s: float) -> str | None:
    if history and "error" in history[-1]:
        return f"skipped: failed at {history[-1]['length']:,} ({history[-1]['error']})"
    done = [h for h in history if "step_s" in h]
    if len(done) < 2:
        return None
    a, b = done[-2:]
    seconds = b["step_s"] * (b["step_s"] / a["step_s"]) ** (math.log(length / b["length"])
                                                           / math.log(b["length"] / a["length"]))
    return f"skipped: predicted {seconds:.0f} s per step > {max_step_s:g} s" if seconds > max_step_s else None


def table(results: dict, lengths, contenders) -> list[str]:
    rows = ["| tokens | contender | s per step (median) | peak RSS (GiB) | the step's own memory (MiB) "
            "| MiB per 1k tokens | ours: speed-up | ours: memory ratio |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        for contender in contenders:
            r = results.get((contender, length), {})
            if "step_s" not in r:
                rows.append(f"| {length:,} | {LABELS[contender]} | {r.get('error', 'not run')} | | | | | |")
                continue
            speed, memory = "", ""
            ours = results.get((PEERS.get(contender), length), {})
            if contender in PEERS and "step_s" in ours:
                speed = f"{r['step_s'] / ours['step_s']:.2f}x"
                memory = f"{ours['step_mib'] / r['step_mib']:.2f}"
            rows.append(f"| {length:,} | {LABELS[contender]} | {r['step_s']:.3f} | {r['peak_mib'] / 1024:.2f} "
                        f"| {r['step_mib']:.0f} | {r['step_mib'] / length * 1024:.1f} | {speed} | {memory} |")
    return rows


def targets(results: dict) -> list[str]:
    """The global-token targets at TARGET_LENGTHS, from the cells that ran (none: no lines)."""
    rows = []
    for length in TARGET_LENGTHS:
        for count, ours, full, peer in ((16, "ours_global", "ours_longformer", "hf_global"),
                                        (64, "ours_global64", "ours_longformer64", "hf_global64")):
            cells = [results.get((name, length), {}) for name in ("ours", ours, full, peer)]
            if not all("step_s" in cell for cell in cells):
                continue
            band, alone, with_projections, hf = cells
            ratio, speed = alone["step_s"] / band["step_s"], hf["step_s"] / with_projections["step_s"]
            peak, step = with_projections["peak_mib"] / hf["peak_mib"], with_projections["step_mib"] / hf["step_mib"]
            met = ratio <= BAND_TARGET and speed >= SPEED_TARGET and max(peak, step) <= MEMORY_TARGET
            rows.append(f"| {length:,} | {count} | {ratio:.2f}x ({with_projections['step_s'] / band['step_s']:.2f}x) "
                        f"| {speed:.2f}x | {peak:.2f} / {step:.2f} | {'met' if met else 'NOT met'} |")
    if not rows:
        return []
    return ["Targets: with G global tokens, ours takes at most 1.5x the band's time (in brackets: with Longformer's "
            "global projections, three more linear layers); with the projections, HF takes at least 2.5x our time "
            "and we at most 0.6x its memory (peak RSS / the step's own memory).", "",
            "| tokens | global tokens | ours over the band | HF over ours | memory over HF's | targets |",
            "|---:|---:|---:|---:|---:|---|", *rows, ""]


def plot(results: dict, lengths, contenders, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for contender in contenders:
        done = [(n, results[(contender, n)]) for n in lengths if "step_s" in results.get((contender, n), {})]
        if done:
            left.plot([n for n, _ in done], [r["step_s"] for _, r in done], marker="o", label=LABELS[contender])
            right.plot([n for n, _ in done], [r["step_mib"] for _, r in done], marker="o", label=LABELS[contender])
    for axis, label in ((left, "seconds per forward + backward"), (right, "the step's own memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per cell, at most")
    parser.add_argument("--max-step-s", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.lengths) < 1:
        parser.error(f"--repeats and --lengths must be at least 1 (got {args.repeats} and {min(args.lengths)})")
    if args.worker:
        print(json.dumps(worker(args.worker, args.lengths[0], args.repeats, args.budget)))
        return

    import torch

    results, history = {}, {c: [] for c in args.contenders}
    for length in args.lengths:  # every contender at one length before the next length
        for contender in args.contenders:
            skip = predicted_skip(history[contender], length, args.max_step_s)
            result = {"contender": contender, "length": length, "error": skip} if skip else run_cell(
                contender, length, args)
            results[(contender, length)] = result
            history[contender].append(result)
            print(json.dumps(result), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    command = command_line("sliding.py", argv)
    lines = [
        "# Sliding-window attention: forward + backward, ours beside HF Longformer and dense SDPA", "",
        f"Command: `{command}`. {datetime.date.today()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {cpu_name()}. One layer: hidden (1, n, {D_MODEL}), "
        f"q, k, v projections to {HEADS} heads x {D_HEAD}, the attention, and the backward of the output's sum. "
        f"Window: {WINDOW} keys on each side ({2 * WINDOW + 1} in all; HF's attention_window {2 * WINDOW}). "
        "Medians over the timed steps after one warm-up; each cell in a fresh process.", "",
        "'ours: speed-up' is the contender's time over ours (HF with global tokens: over ours with as many and "
        "the same projections); 'ours: memory ratio' is our step's own memory over the contender's.", "",
        *table(results, args.lengths, args.contenders), "",
        *targets(results),
    ]
    if plot(results, args.lengths, args.contenders, args.out / "sliding.png"):
        lines += ["![time and memory against length](sliding.png)", ""]
    write_result(args.out / "sliding.md", "\n".join(lines))
    (args.out / "sliding.json").write_text(json.dumps([r for r in results.values()], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
