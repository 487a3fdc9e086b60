"""The GPU benchmark: the Triton kernels' tests on the device, a training step up to a million tokens beside HF's
Reformer and an SDPA Transformer, and attention layers beside SDPA's flash kernel, FlexAttention and
FlashAttention.

    python benchmarks/gpu.py            # on a CUDA machine (one GPU, <= 8 minutes): writes benchmarks/results/gpu.md
    python benchmarks/gpu.py --smoke    # without a GPU (the default there): the same code paths at toy sizes on
                                        # the CPU, Triton under its interpreter; prints, writes only with --out

1. Kernel tests: tests/attention/test_triton.py with REFORMER_TRITON_TEST_DEVICE=cuda (the kernels compiled,
   against the float64 references on the CPU). Smoke: two of its cases under the interpreter.
2. Training step of the speed table's model (benchmarks/compare.py: 6 causal LSH layers, d_model 256, 4 heads
   x 64, 4 hashes, chunks of 64, reversible; batch 1) at 16,384 to 1,048,576 tokens, under
   autocast(bfloat16): ours (the Triton backend, the default on CUDA), HF's Reformer and a Transformer on
   SDPA, each cell in a fresh process (compare.py's worker: one warm-up step, then timed steps). Time, tokens/s,
   peak CUDA memory (torch.cuda.max_memory_allocated) and model FLOP/s (compare.py's analytic count).
3. Attention layers, forward + backward of one (1, h, n, 64) bfloat16 attention, in this process:
   - LSH (ours: 4 heads, 4 hashes, chunks of 64, causal) beside SDPA's flash kernel (causal, the same heads);
   - a sliding window of 256 keys on each side (Longformer-base: 12 heads; ours, non-causal) beside
     FlexAttention (torch.compile'd, a `mask_mod` |q - k| <= 256 and its block mask) and FlashAttention-2's
     `window_size=(256, 256)` when `flash_attn` is installed.
   Median of the timed repeats after warm-ups (compilation, autotuning), CUDA-synchronised; the peak memory
   the call adds (max_memory_allocated over what was allocated before it).

The run stops starting cells when --budget-s is spent (a skipped cell says so), so it ends within about 8
minutes on an H100. Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, cpu_name, run_worker, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP_LENGTHS = (16384, 65536, 262144, 1048576)
STEP_CONTENDERS = ("ours", "hf", "sdpa")
STEP_LABELS = {"ours": "ours (Triton)", "hf": "HF Reformer", "sdpa": "Transformer + SDPA"}
LSH_LENGTHS = (4096, 8192, 16384, 65536)
SLIDING_LENGTHS = (16384, 65536)
LSH_HEADS, HASHES, CHUNK = 4, 4, 64
SLIDING_HEADS, WINDOW = 12, 256
D_HEAD = 64
SMOKE = dict(step_lengths=(128,), lsh_lengths=(256,), sliding_lengths=(256,), window=16, repeats=1)


# --- 1. the kernel tests ------------------------------------------------------------------------------

def kernel_tests(smoke: bool, timeout_s: float) -> dict:
    """Run tests/attention/test_triton.py on the device (smoke: two cases under the interpreter)."""
    env = dict(os.environ)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/attention/test_triton.py"]
    if smoke:
        command += ["-k", "float32 and (lsh-causal-2-rounds or sliding-global-tokens)"]
    else:
        env["REFORMER_TRITON_TEST_DEVICE"] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"summary": f"timed out after {timeout_s:.0f} s", "seconds": timeout_s, "ok": False}
    lines = done.stdout.strip().splitlines()
    return {"summary": lines[-1] if lines else done.stderr.strip()[-200:], "seconds": time.perf_counter() - start,
            "ok": done.returncode == 0}


# --- 2. the training step -----------------------------------------------------------------------------

def training_step(contender: str, length: int, device: str, precision: str, repeats: int, timeout_s: float,
                  smoke: bool) -> dict:
    """One cell of compare.py's worker in a fresh process (ours: the Triton backend; smoke: forced on the CPU)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--worker", contender, "--lengths",
               str(length), "--repeats", str(repeats), "--budget", "60", "--device", device, "--precision",
               precision]
    env = {"REFORMER_BACKEND": "triton"} if contender == "ours" and smoke else {}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return run_worker(command, contender, length, timeout_s)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def model_flops(length: int) -> float:
    from compare import model_flops_per_step

    return model_flops_per_step(length)


# --- 3. attention layers ------------------------------------------------------------------------------

def measure(call, device, repeats: int, warmups: int = 2) -> dict:
    """Median seconds of call() (forward and backward), and the peak memory it adds on CUDA (MiB)."""
    import torch

    for _ in range(warmups):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_mib": peak}


def _rows(heads: int, length: int, device, dtype, count: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, D_HEAD, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(count)]


def lsh_layer(length: int, device, dtype):
    """Ours: causal LSH over (1, 4, n, 64), 4 hashes, chunks of 64, buckets from the length (the paper's rule)."""
    import torch

    from reformer.attention import lsh_attention
    from reformer.attention.hashing import n_buckets_for_length, random_rotations

    qk, v = _rows(LSH_HEADS, length, device, dtype, 2)
    buckets = n_buckets_for_length(length, CHUNK)
    rotations = random_rotations(LSH_HEADS, D_HEAD, HASHES, buckets, torch.Generator().manual_seed(1)).to(device)
    grad = torch.randn(qk.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def call():
        out, _ = lsh_attention(qk, v, rotations.to(dtype), n_buckets=buckets, chunk_size=CHUNK, causal=True)
        out.backward(grad)
    return call


def sdpa_layer(length: int, device, dtype, heads: int = LSH_HEADS):
    """SDPA over (1, h, n, 64), causal: the flash kernel on CUDA."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _rows(heads, length, device, dtype, 3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

    def call():
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    return call


def sliding_layer(length: int, device, dtype, window: int):
    import torch

    from reformer.attention import sliding_window_attention

    q, k, v = _rows(SLIDING_HEADS, length, device, dtype, 3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def call():
        sliding_window_attention(q, k, v, window=window).backward(grad)
    return call


def flex_layer(length: int, device, dtype, window: int):
    """FlexAttention with the same band, |q - k| <= window, compiled with torch.compile; on the CPU (the smoke run)
    eager and forward only (its CPU path has no backward)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    on_gpu = device.type == "cuda"
    q, k, v = (x.detach().requires_grad_(on_gpu) for x in _rows(SLIDING_HEADS, length, device, dtype, 3))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    block_mask = create_block_mask(band, None, None, length, length, device=device.type)
    attend = torch.compile(flex_attention) if on_gpu else flex_attention

    def call():
        out = attend(q, k, v, block_mask=block_mask)
        if on_gpu:
            out.backward(grad)
    return call


def flash_window_layer(length: int, device, dtype, window: int):
    """FlashAttention-2's local attention: window_size=(window, window), (1, n, h, 64) layout."""
    import torch
    from flash_attn import flash_attn_func

    q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_()
               for x in _rows(SLIDING_HEADS, length, device, dtype, 3))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def call():
        flash_attn_func(q, k, v, window_size=(window, window)).backward(grad)
    return call


def layer_cell(name: str, build, repeats: int, device) -> dict:
    import torch

    try:
        call = build()
        cell = measure(call, device, repeats)
    except ImportError as error:
        return {"name": name, "skip": f"not installed ({error.name})"}
    except (RuntimeError, torch.OutOfMemoryError) as error:
        return {"name": name, "error": str(error).splitlines()[0][:120]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"name": name, **cell}


# --- the driver ----------------------------------------------------------------------------------------

class Clock:
    """The run's time budget: a cell starts only while some is left."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def main(argv=None) -> None:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", default=not cuda,
                   help="toy sizes on the CPU under Triton's interpreter (the default without CUDA)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no cell after this many seconds")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per cell, after the warm-ups")
    p.add_argument("--step-lengths", type=int, nargs="+", default=list(STEP_LENGTHS))
    p.add_argument("--peer-max-length", type=int, default=262144, help="longest training step tried for the peers")
    p.add_argument("--out", type=Path, help="where to write the table (default: benchmarks/results/gpu.md on a GPU; "
                                            "the smoke run only prints)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.budget_s <= 0 or any(length < 1 for length in args.step_lengths):
        p.error("--repeats, --budget-s and --step-lengths must be positive")
    smoke = args.smoke
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton loads: its kernels then run on CPU tensors
        sizes = SMOKE
        step_lengths, repeats = list(SMOKE["step_lengths"]), SMOKE["repeats"]
    else:
        sizes = dict(lsh_lengths=LSH_LENGTHS, sliding_lengths=SLIDING_LENGTHS, window=WINDOW)
        step_lengths, repeats = args.step_lengths, args.repeats
    device = torch.device("cuda" if cuda and not smoke else "cpu")
    cuda_run = device.type == "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if device.type == "cuda" else "fp32"
    clock = Clock(args.budget_s)
    started = time.perf_counter()

    print("kernel tests ...", flush=True)
    tests = kernel_tests(smoke, timeout_s=max(60.0, min(240.0, clock.left())))
    print(json.dumps(tests), flush=True)

    steps = {}
    for length in step_lengths:
        for contender in STEP_CONTENDERS:
            if contender != "ours" and length > args.peer_max_length:
                steps[(contender, length)] = {"skip": f"not tried above {args.peer_max_length:,} tokens"}
                continue
            failed = [steps.get((contender, shorter), {}) for shorter in step_lengths if shorter < length]
            if any("error" in cell or "skip" in cell for cell in failed):
                steps[(contender, length)] = {"skip": "failed or skipped at a shorter length"}
            elif clock.left() < 20:
                steps[(contender, length)] = {"skip": "the run's time budget was spent"}
            else:
                steps[(contender, length)] = training_step(contender, length, device.type, precision, repeats,
                                                           clock.left(), smoke)
            print(json.dumps({"step": contender, "length": length, **steps[(contender, length)]}), flush=True)

    from reformer.attention.backend import use_backend

    layers = []
    window = sizes["window"]
    with use_backend("triton"):
        for length in sizes["lsh_lengths"]:
            for name, build in ((f"LSH (ours), {length:,}", lambda: lsh_layer(length, device, dtype)),
                                (f"SDPA flash, causal, {length:,}", lambda: sdpa_layer(length, device, dtype))):
                layers.append(layer_cell(name, build, repeats, device) if clock.left() > 10 else
                              {"name": name, "skip": "the run's time budget was spent"})
                print(json.dumps(layers[-1]), flush=True)
        for length in sizes["sliding_lengths"]:
            for name, build in (
                    (f"sliding window (ours), {length:,}", lambda: sliding_layer(length, device, dtype, window)),
                    (f"FlexAttention{'' if cuda_run else ' (forward only)'}, {length:,}",
                     lambda: flex_layer(length, device, dtype, window)),
                    (f"FlashAttention window_size, {length:,}",
                     lambda: flash_window_layer(length, device, dtype, window))):
                layers.append(layer_cell(name, build, repeats, device) if clock.left() > 10 else
                              {"name": name, "skip": "the run's time budget was spent"})
                print(json.dumps(layers[-1]), flush=True)

    text = report(argv, smoke, device, tests, steps, step_lengths, layers, window, time.perf_counter() - started)
    print(text)
    out = args.out or (None if smoke else ROOT / "benchmarks" / "results" / "gpu.md")
    if out is not None:
        write_result(out, text)
        out.with_suffix(".json").write_text(json.dumps(
            {"tests": tests, "steps": [{"contender": c, "length": n, **cell} for (c, n), cell in steps.items()],
             "layers": layers}, indent=1) + "\n")


def report(argv, smoke: bool, device, tests: dict, steps: dict, step_lengths, layers: list, window: int,
           seconds: float) -> str:
    import torch

    where = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"{cpu_name()}, {torch.get_num_threads()} threads, no GPU")
    lines = ["# GPU: the Triton backend beside the peers\n",
             f"Command: `{command_line('gpu.py', argv)}`. {datetime.date.today()}, {where}, torch "
             f"{torch.__version__}; {seconds:.0f} s in all.\n"]
    if smoke:
        lines.append("**Smoke run on the CPU, Triton under its interpreter: toy sizes, and no figure here is a GPU "
                     "figure.** It shows that every part of the GPU run works; `python benchmarks/gpu.py` on a CUDA "
                     "machine measures.\n")
    lines += [f"## Kernel tests\n\n`tests/attention/test_triton.py`{'' if smoke else ' on the GPU'}: "
              f"{tests['summary']} ({'passed' if tests['ok'] else 'FAILED'}).\n",
              "## Training step\n",
              "compare.py's model (6 causal LSH layers, d_model 256, 4 heads x 64, 4 hashes, chunks of 64, "
              f"reversible; batch 1){', under autocast(bfloat16)' if device.type == 'cuda' else ''}; median step "
              "after a warm-up. Memory: "
              f"{'peak torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS of the process'}. "
              "Model FLOP/s: compare.py's analytic model FLOPs over the step time.\n",
              "| tokens | " + " | ".join(f"{STEP_LABELS[c]}: s/step, tokens/s, peak GiB, model TFLOP/s"
                                        for c in STEP_CONTENDERS) + " |",
              "|---:|" + "---|" * len(STEP_CONTENDERS)]
    for length in step_lengths:
        cells = []
        for contender in STEP_CONTENDERS:
            cell = steps.get((contender, length), {})
            if "step_s" in cell:
                cells.append(f"{cell['step_s']:.3f} s, {length / cell['step_s']:,.0f}, {cell['peak_mib'] / 1024:.2f}, "
                             f"{model_flops(length) / cell['step_s'] / 1e12:.2f}")
            else:
                cells.append(cell.get("skip") or f"failed: {cell.get('error', '-')}")
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    lines += ["", "## Attention layers\n",
              f"Forward + backward of one attention, {'bfloat16' if device.type == 'cuda' else 'float32'}, batch 1, "
              f"head width {D_HEAD}: LSH over {LSH_HEADS} heads ({HASHES} hashes, chunks of {CHUNK}, causal) beside "
              f"SDPA on the same heads (causal); the sliding window ({window} keys each side, {SLIDING_HEADS} heads, "
              "non-causal) beside FlexAttention"
              f"{' (torch.compile)' if device.type == 'cuda' else ' (eager, forward only on the CPU)'} and "
              "FlashAttention's window_size. "
              "Peak: the memory the call adds on the GPU.\n",
              "| layer | ms | tokens/s | peak MiB |", "|---|---:|---:|---:|"]
    for cell in layers:
        length = int(cell["name"].rsplit(", ", 1)[1].replace(",", ""))
        if "seconds" in cell:
            peak = "-" if cell["peak_mib"] is None else f"{cell['peak_mib']:,.0f}"
            lines.append(f"| {cell['name']} | {cell['seconds'] * 1e3:,.1f} | {length / cell['seconds']:,.0f} | "
                         f"{peak} |")
        else:
            lines.append(f"| {cell['name']} | {cell.get('skip') or 'failed: ' + cell.get('error', '-')} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
