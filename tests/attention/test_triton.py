"""The Triton backend (`triton_chunks.py`) under Triton's interpreter, on CPU tensors, against the references.

Float32 outputs and gradients within 2e-4 of the float64 reference, relative to the largest value; bfloat16
and float16 within their rounding. Odd lengths, padding, one to three hash rounds, causal or not, wrap, wider
windows, dilation and global tokens. The file skips without Triton.

REFORMER_TRITON_TEST_DEVICE=cuda runs the same tests on a GPU, the kernels compiled (benchmarks/gpu.py does);
the references still run on the CPU in float64.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("REFORMER_TRITON_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported: they run on CPU tensors
elif not torch.cuda.is_available():
    pytest.skip(f"REFORMER_TRITON_TEST_DEVICE={DEVICE} but CUDA is not available", allow_module_level=True)
pytest.importorskip("triton")

from reformer.attention import (BackendError, local_attention, lsh_attention, sliding_window_attention,  # noqa: E402
                                use_backend)
from reformer.attention.backend import choose, triton_runs  # noqa: E402
from reformer.attention.lsh import random_rotations  # noqa: E402
from tests.conftest import assert_close, random_batch, seeded, tiny_config  # noqa: E402

F32, F64 = torch.float32, torch.float64


def _mask(b, n, hole=True):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -3:] = False  # right padding
    if hole:
        mask[0, n // 2] = False  # a hole in the middle
    return mask.to(_MASK_DEVICE)


def _global(b, n):
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[0, 0] = glob[-1, n // 3] = glob[-1, n - 1] = True  # rows with different counts; one is padding
    return glob.to(_MASK_DEVICE)


def lsh(rounds, **options):
    def call(q, k, v, extra):
        rotations = random_rotations(q.shape[1], q.shape[-1], rounds, 4, seeded(1)).to(q.device, q.dtype)
        return lsh_attention(q, v, rotations, n_buckets=4, attention_mask=_mask(q.shape[0], q.shape[2]),
                             **options)[0]
    return call


def local(**options):
    return lambda q, k, v, extra: local_attention(q, k, v, attention_mask=_mask(q.shape[0], q.shape[2]), **options)


def sliding(global_tokens=False, **options):
    def call(q, k, v, extra):
        b, _, n, _ = q.shape
        more = dict(global_mask=_global(b, n), global_qkv=extra or None) if global_tokens else {}
        return sliding_window_attention(q, k, v, attention_mask=_mask(b, n), **more, **options)
    return call


CASES = {  # name: (call, n, d, global projections)
    "lsh-causal-2-rounds": (lsh(2, chunk_size=4, causal=True), 21, 4, False),
    "lsh-3-rounds-chunk-after": (lsh(3, chunk_size=5, chunks_after=1), 19, 6, False),
    "lsh-wrap-1-round": (lsh(1, chunk_size=4, causal=True, wrap=True), 17, 4, False),
    "lsh-two-chunks-before": (lsh(2, chunk_size=3, chunks_before=2), 13, 5, False),
    "local-causal": (local(chunk_size=5, causal=True), 23, 4, False),
    "local-wrap-both-sides": (local(chunk_size=4, chunks_before=2, chunks_after=1, wrap=True), 18, 3, False),
    "local-wide-chunks": (local(chunk_size=80, causal=True), 170, 8, False),  # 2 query blocks, 3 key blocks
    "sliding-dilated": (sliding(window=3, dilation=(1, 2)), 21, 4, False),
    "sliding-causal": (sliding(window=4, dilation=(1, 3), causal=True), 22, 4, False),
    "sliding-global-tokens": (sliding(True, window=2), 19, 4, False),
    "sliding-global-projections": (sliding(True, window=3, causal=True, global_rule="global_kv"), 17, 4, True),
}


def _inputs(n, d, projections, dtype, device, b=2, h=2, seed=0):
    gen = seeded(seed)
    rows = [torch.randn(b, h, n, d, dtype=F64, generator=gen) for _ in range(6 if projections else 3)]
    return [x.to(dtype).to(device).requires_grad_() for x in rows]


def _run(name, dtype, backend, seed=0):
    """Output and gradients (on the CPU) of case `name` on `backend` for rows rounded to dtype; the reference
    and the other backends on the CPU, triton on DEVICE. The reference computes in float64."""
    call, n, d, projections = CASES[name]
    device = DEVICE if backend == "triton" else torch.device("cpu")
    rows = _inputs(n, d, projections, dtype, device, seed=seed)
    if backend == "reference":
        rows = [x.detach().to(F64).requires_grad_() for x in rows]
    with _masks_on(device), use_backend(backend):
        out = call(*rows[:3], tuple(rows[3:]))
    weights = torch.randn(out.shape, dtype=F64, generator=seeded(7)).to(device)
    grads = torch.autograd.grad((out.to(F64) * weights).sum(), rows, allow_unused=True)
    return [x.cpu() for x in [out] + [torch.zeros_like(x) if g is None else g for x, g in zip(rows, grads)]]


@contextlib.contextmanager
def _masks_on(device):
    """The cases' masks made on `device` (they are built on the CPU inside the calls)."""
    global _MASK_DEVICE
    _MASK_DEVICE, before = device, _MASK_DEVICE
    try:
        yield
    finally:
        _MASK_DEVICE = before


_MASK_DEVICE = torch.device("cpu")


def _assert_near(actual, expected, relative, case):
    for label, a, e in zip(["out", "dq", "dk", "dv", "dq_g", "dk_g", "dv_g"], actual, expected):
        assert a.dtype == actual[0].dtype, f"{case} {label}: dtype {a.dtype}"
        assert_close(a.to(F64), e, relative * max(e.abs().max().item(), 1e-30), f"{case} {label}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_output_and_gradients_match_the_reference(case):
    _assert_near(_run(case, F32, "triton"), _run(case, F32, "reference"), 2e-4, case)


@pytest.mark.parametrize("dtype,relative", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("case", ["lsh-causal-2-rounds", "sliding-global-tokens", "local-causal"])
def test_half_precision_rows_stay_within_their_rounding(case, dtype, relative):
    """bfloat16 and float16 rows multiply in their own type with float32 sums: within a few of their units
    in the last place of the reference on the same rounded inputs."""
    _assert_near(_run(case, dtype, "triton"), _run(case, dtype, "reference"), relative, case)


def test_the_same_inputs_give_the_same_bits():
    first, second = (_run("lsh-causal-2-rounds", F32, "triton") for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_the_backend_switch_takes_triton_only_where_it_runs():
    x = torch.zeros(1, 1, 4, 4, device=DEVICE)
    default = choose("local_attention", x)
    assert default == "triton" if DEVICE.type == "cuda" else default in ("native", "torch")  # CPU: never by default
    with use_backend("triton"):
        assert choose("local_attention", x) == "triton"
        with pytest.raises(BackendError, match="triton backend cannot run this call: it takes float32, bfloat16 "
                                               "or float16 rows, not torch.float64; use torch"):
            choose("local_attention", x.double())
        with pytest.raises(BackendError, match="the fused kernel does not take dropout"):
            choose("local_attention", x, fused=["dropout"])
    assert triton_runs(x.to("meta")) == "it takes CUDA tensors, not meta"


def test_a_model_trains_the_same_on_triton_as_on_the_default_backend():
    """A training step of a small model with LSH, local and sliding layers (global tokens, padding): the loss
    and every gradient agree with the default backend's."""
    from reformer import ReformerLM

    config = tiny_config(attn_layers=("lsh", "local", "sliding"), sliding_window=3, sliding_dilation=2,
                         causal=False, lsh_chunks_after=1, reversible_keep_attention=True)
    ids, mask = random_batch(config, length=29, pad_from=25)
    glob = torch.zeros_like(mask)
    glob[:, 0] = True
    results = {}
    for backend in (None, "triton"):
        device = DEVICE if backend else torch.device("cpu")
        model = ReformerLM(config).to(device)
        with use_backend(backend) if backend else contextlib.nullcontext():
            loss = model(ids.to(device), attention_mask=mask.to(device), labels=ids.to(device),
                         global_mask=glob.to(device)).loss
            loss.backward()
        results[backend] = [loss.detach().cpu()] + [p.grad.cpu() for p in model.parameters()]
    for a, b in zip(results["triton"], results[None]):
        assert_close(a, b, 2e-4 * max(b.abs().max().item(), 1e-30), "model")


@pytest.mark.parametrize("case", ["lsh-3-rounds-chunk-after", "sliding-global-projections"])
def test_head_rows_in_groups_give_the_same_bits(case, monkeypatch):
    """Slot buffers go in groups of head rows within GROUP_BYTES (at a million tokens, one head row at a time):
    groups of one head row (of part of a batch's heads) give the same bits as all at once."""
    from reformer.attention import triton_chunks

    whole = _run(case, F32, "triton")
    monkeypatch.setattr(triton_chunks, "GROUP_BYTES", 1)
    assert triton_chunks._groups(2, 3, 100) == [(0, 1, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3), (1, 2, 0, 1),
                                                (1, 2, 1, 2), (1, 2, 2, 3)]
    for a, b in zip(_run(case, F32, "triton"), whole):
        assert torch.equal(a, b)


def test_positions_past_float32s_exact_range_take_float64(monkeypatch):
    """Past 2^24 tokens the mask recipe's positions are float64: the kernels compare them as such."""
    from reformer.attention import fused_chunks

    monkeypatch.setattr(fused_chunks, "EXACT_FLOAT32", 1)  # every recipe in float64, as past 2^24 positions
    for case in ("lsh-causal-2-rounds", "sliding-causal"):
        _assert_near(_run(case, F32, "triton"), _run(case, F32, "reference"), 2e-4, case)


def test_float32_products_follow_pytorchs_tf32_setting():
    """TF32 for float32 rows where PyTorch allows it for CUDA matmuls, through the new setting or the old."""
    from reformer.attention.triton_chunks import float32_products

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert float32_products() == "tf32"
        matmul.fp32_precision = "ieee"
        assert float32_products() == "ieee"
        matmul.allow_tf32 = True
        assert float32_products() == "tf32"
    finally:
        matmul.fp32_precision = before
