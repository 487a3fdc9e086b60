"""The one switch that picks an attention call's implementation: reference, torch, native, triton (test_triton.py)."""

from __future__ import annotations

import pytest
import torch

from reformer.attention import (BackendError, full_attention, local_attention, lsh_attention, native,
                                sliding_window_attention, use_backend)
from reformer.attention.backend import choose, forced_backend, triton_runs
from reformer.attention.lsh import random_rotations
from tests.conftest import assert_close, seeded

F64 = torch.float64


def inputs(n=21, b=2, h=2, d=4, seed=0, dtype=F64):
    gen = seeded(seed)
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -4:] = False
    return q, k, v, mask


CALLS = {
    "lsh": lambda q, k, v, mask, **kw: lsh_attention(q, v, random_rotations(2, 4, 2, 4, seeded(1)).double(),
                                                     n_buckets=4, chunk_size=4, causal=True, attention_mask=mask,
                                                     **kw)[0],
    "local": lambda q, k, v, mask, **kw: local_attention(q, k, v, chunk_size=5, causal=True, attention_mask=mask,
                                                         **kw),
    "sliding": lambda q, k, v, mask, **kw: sliding_window_attention(
        q, k, v, window=3, dilation=(1, 2), attention_mask=mask,
        global_mask=torch.zeros_like(mask).index_fill_(1, torch.tensor([0, 9]), True), **kw),
    "full": lambda q, k, v, mask, **kw: full_attention(q, k, v, causal=True, attention_mask=mask, **kw),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_reference_backend_and_the_default_agree_in_float64(call):
    """`use_backend("reference")` runs the oracles: the default backend's output and gradients equal them to 1e-10."""
    q, k, v, mask = inputs()
    default = CALLS[call](q, k, v, mask)
    with use_backend("reference"):
        reference = CALLS[call](q, k, v, mask)
    assert_close(default, reference, 1e-10, "out")
    weights = torch.randn(default.shape, dtype=F64, generator=seeded(3))
    for name, a, b in zip("qkv", torch.autograd.grad((default * weights).sum(), (q, k, v), allow_unused=True),
                          torch.autograd.grad((reference * weights).sum(), (q, k, v), allow_unused=True)):
        if a is not None or b is not None:
            assert_close(a, b, 1e-10, f"grad {name}")


@pytest.mark.parametrize("call", ["lsh", "local", "sliding"])
def test_native_and_torch_give_the_same_result_and_the_backward_keeps_the_forwards(call):
    """The backend is decided when a call starts: its backward, run outside `use_backend`, takes the same one."""
    if native.library() is None:
        pytest.skip("the native kernel is unavailable here")
    results = {}
    for name in ("native", "torch"):
        q, k, v, mask = inputs()
        with use_backend(name):
            out = CALLS[call](q, k, v, mask)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        results[name] = [out, *(torch.zeros_like(q) if g is None else g for g in grads)]
    for a, b in zip(results["native"], results["torch"]):
        assert_close(a, b, 1e-12, call)


def test_a_forced_backend_that_cannot_run_a_call_says_so(monkeypatch):
    q, k, v, mask = inputs()
    with use_backend("native"), pytest.raises(BackendError, match="the native backend cannot run this call: the "
                                                                   "fused kernel does not take dropout; use torch"):
        CALLS["local"](q, k, v, mask, dropout=0.5, dropout_seed=1)
    with use_backend("native"), pytest.raises(BackendError, match="CPU tensors in float32 or float64, not "
                                                                   "torch.bfloat16"):
        CALLS["local"](*(x.detach().bfloat16() for x in (q, k, v)), mask)
    with use_backend("reference"), pytest.raises(BackendError, match="the reference does not model dropout"):
        CALLS["full"](q, k, v, mask, dropout=0.5, dropout_seed=1)
    with use_backend("triton"), pytest.raises(BackendError, match="the triton backend cannot run this call: it "
                                                                   "takes float32, bfloat16 or float16 rows"):
        CALLS["lsh"](q, k, v, mask)
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        with use_backend("fast"):
            pass
    monkeypatch.setenv("REFORMER_BACKEND", "cuda")
    with pytest.raises(BackendError, match="REFORMER_BACKEND: unknown backend 'cuda'"):
        CALLS["local"](q, k, v, mask)


def test_the_environment_forces_a_backend_and_the_context_overrides_it(monkeypatch):
    q, k, _, _ = inputs()
    monkeypatch.setenv("REFORMER_BACKEND", "torch")
    assert forced_backend() == "torch" and choose("x", q) == "torch"
    with use_backend("reference"):
        assert choose("x", q) == "reference"
    monkeypatch.delenv("REFORMER_BACKEND")
    assert forced_backend() is None
    expected = "native" if native.library() is not None else "torch"
    assert choose("x", q) == expected and choose("x", q, fused=["dropout"]) == "torch"
    assert choose("x", q.detach().bfloat16()) == "torch"


def test_reformer_native_0_still_turns_the_native_kernels_off(monkeypatch):
    from reformer.attention import backend

    q, *_ = inputs()
    monkeypatch.setenv("REFORMER_NATIVE", "0")
    monkeypatch.setattr(backend, "_warned_native_variable", [])
    with pytest.warns(DeprecationWarning, match="REFORMER_NATIVE=0 is deprecated; set REFORMER_BACKEND=torch"):
        assert choose("x", q) == "torch"
    with use_backend("native"), pytest.raises(BackendError, match="REFORMER_NATIVE=0 turns it off"):
        choose("x", q)


def design_rows() -> dict[str, dict[str, str]]:
    """docs/design.md's table of what each backend runs: {option: {backend: "yes" or "no"}}."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    lines = text[text.index("| option (`lsh_attention` unless named)"):].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def design_call(option: str, dtype=F64):
    """The call a row of the design table names, on small inputs in dtype (float64 unless told)."""
    q, k, v, mask = inputs(dtype=dtype)
    rotations = random_rotations(2, 4, 2, 4, seeded(1)).to(dtype)

    def lsh(**kw):
        options = dict(n_buckets=4, chunk_size=4, causal=True, attention_mask=mask)
        options.update(kw)
        return lambda: lsh_attention(q, v, rotations, **options)

    glob = torch.zeros_like(mask).index_fill_(1, torch.tensor([0, 9]), True)
    return {
        "causal, padding mask, several rounds": lsh(),
        "wrap (HF / Trax layout), chunks before and after": lsh(causal=False, wrap=True, chunks_after=1),
        "dedup (paper eq. 16)": lsh(dedup=True),
        "same-bucket only (eq. 3-4)": lsh(same_bucket_only=True),
        "prefix-consistent (`causal_window`)": lsh(causal_window=4),
        "attention dropout": lsh(dropout=0.3, dropout_seed=1),
        '`normalize="hf"`': lsh(normalize="hf"),
        "bfloat16 rows": lambda: lsh_attention(q.detach().bfloat16(), v.detach().bfloat16(), rotations.float(),
                                               n_buckets=4, chunk_size=4, causal=True, attention_mask=mask),
        "`sliding_window_attention`: dilation, causal, global tokens": lambda: sliding_window_attention(
            q, k, v, window=3, dilation=(1, 2), causal=True, attention_mask=mask, global_mask=glob),
        "`sliding_window_attention`: attention dropout": lambda: sliding_window_attention(
            q, k, v, window=3, attention_mask=mask, global_mask=glob, dropout=0.3, dropout_seed=1),
        "`local_attention`": lambda: local_attention(q, k, v, chunk_size=5, attention_mask=mask),
        "`full_attention`": lambda: full_attention(q, k, v, attention_mask=mask),
    }[option]


@pytest.mark.parametrize("option", sorted(design_rows()))
def test_the_design_table_is_what_the_backends_do(option):
    """The triton column on float32 rows (it refuses float64), under Triton's interpreter."""
    if native.library() is None:
        pytest.skip("the native kernel is unavailable here")
    for backend, cell in design_rows()[option].items():
        dtype = torch.float32 if backend == "triton" else F64
        if backend == "triton" and triton_runs(torch.zeros(1)) is not None:
            continue  # no Triton here (test_triton.py skips too)
        with use_backend(backend):
            if cell == "yes":
                design_call(option, dtype)()
            else:
                with pytest.raises(BackendError):
                    design_call(option, dtype)()
