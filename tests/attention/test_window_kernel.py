"""window_block_backward against autograd through an explicit softmax over each chunk's window.

Every implementation runs the tests that take one: the native kernel (`window_kernel.cpp`) with its own tile
products ("native") and with the BLAS's ("native-blas"), and the batched PyTorch one.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from reformer.attention import native
from reformer.attention import window_kernel
from reformer.attention.window_kernel import window_block_backward_batched
from tests.conftest import assert_close, seeded, tile_products

MASKED, SELF = -1e9, -1e5
IMPLEMENTATIONS = ["native", "native-blas", "batched"]


def needs_native():
    if native.library() is None:
        pytest.skip("the native kernel is unavailable here (no C++ compiler, or REFORMER_NATIVE=0)")


@pytest.fixture
def implementation_of(monkeypatch):
    """Runs the native kernels as an implementation says (REFORMER_NATIVE=0 for the batched one) until the test
    ends."""
    with contextlib.ExitStack() as stack:
        def use(implementation: str) -> None:
            if implementation == "batched":
                monkeypatch.setenv(native.ENABLE_VARIABLE, "0")
                return
            needs_native()
            stack.enter_context(tile_products(implementation == "native"))
        yield use


@pytest.fixture(params=IMPLEMENTATIONS)
def window_block_backward(request, implementation_of):
    """window_kernel.window_block_backward, through the native kernel (its tile products or the BLAS's) or
    (REFORMER_NATIVE=0) the batched one."""
    implementation_of(request.param)
    return window_kernel.window_block_backward


def explicit_block(q, k_extended, v_extended, mask, scale):
    """out (G, c, d) and lse (G, c) of each chunk's queries over its window of extended chunks i .. i + m - 1."""
    g, c, d = q.shape
    parts = mask.shape[-1] // c
    keys = torch.cat([k_extended[p * c:(p + g) * c].view(g, c, d) for p in range(parts)], dim=1)  # (G, w, d)
    values = torch.cat([v_extended[p * c:(p + g) * c].view(g, c, d) for p in range(parts)], dim=1)
    logits = scale * q @ keys.transpose(1, 2) + mask  # (G, c, w)
    return torch.softmax(logits, dim=-1) @ values, torch.logsumexp(logits, dim=-1)


def output_gradient(shape, dtype, seed):
    """A random dO, 0 for the last query: it sees nothing, as a padded query, whose output the library zeroes
    (its logits all sit at -1e9, where float64 keeps 1e-7 of a logit: both sides would be that far apart)."""
    grad = torch.randn(shape, dtype=dtype, generator=seeded(seed))
    grad[-1, -1] = 0.0
    return grad


def make_block(g, c, parts, d, dtype, seed):
    gen = seeded(seed)
    rows = (g + parts - 1) * c
    q = torch.randn(g, c, d, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(rows, d, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(rows, d, dtype=dtype, generator=gen, requires_grad=True)
    mask = torch.where(torch.rand(g, c, parts * c, generator=gen) < 0.3, MASKED, 0.0).to(dtype)
    mask[0, 0] = MASKED  # a query that sees only itself, at the self logit
    mask[0, 0, (parts - 1) * c] = SELF
    if c > 1:
        mask[-1, -1] = MASKED  # a query that sees nothing (a padded query)
    return q, k, v, mask


@pytest.mark.parametrize("g, c, parts, d", [(1, 1, 1, 1), (3, 5, 2, 4), (4, 3, 3, 2), (2, 7, 1, 3), (2, 64, 2, 64),
                                           (3, 37, 2, 70), (2, 13, 3, 33)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_gradients_match_autograd_in_float64(window_block_backward, g, c, parts, d, scale):
    q, k, v, mask = make_block(g, c, parts, d, torch.float64, seed=g * 100 + c)
    out, lse = explicit_block(q, k, v, mask, scale)
    grad = output_gradient(out.shape, torch.float64, 7)
    expected = torch.autograd.grad(out, [q, k, v], grad)
    got = window_block_backward(grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, scale)
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert_close(a, b, 1e-10, name)


def test_float32_matches_float64_and_masked_weights_are_exactly_zero(window_block_backward):
    q, k, v, mask = make_block(4, 8, 2, 4, torch.float64, seed=3)
    out, lse = explicit_block(q, k, v, mask, 0.5)
    grad = output_gradient(out.shape, torch.float64, 8)
    exact = window_block_backward(grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, 0.5)
    single = window_block_backward(*(x.detach().float() for x in (grad, q, k, v, out, lse, mask)), 0.5)
    for a, b in zip(single, exact):
        assert a.dtype == torch.float32
        assert_close(a.double(), b, 1e-5, "float32")
    # a value row that only masked keys reach gets exactly no gradient
    v_probe = v.detach().clone()
    mask_all = torch.full_like(mask, MASKED)
    mask_all[..., 0] = 0.0  # every query sees only window key 0, its own chunk's first extended row
    out, lse = explicit_block(q, k, v_probe, mask_all, 0.5)
    _, _, dv = window_block_backward(grad, q.detach(), k.detach(), v_probe, out.detach(), lse.detach(), mask_all, 0.5)
    seen = torch.zeros(dv.shape[0], dtype=torch.bool)
    seen[torch.arange(4) * 8] = True
    assert torch.equal(dv[~seen], torch.zeros_like(dv[~seen]))


@pytest.mark.parametrize("g, c, parts, d", [(1, 1, 1, 1), (3, 5, 2, 4), (4, 3, 3, 2), (64, 16, 2, 8), (2, 64, 2, 64),
                                           (3, 37, 2, 70), (2, 13, 3, 33)])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_matches_an_explicit_softmax(g, c, parts, d, implementation, implementation_of):
    implementation_of(implementation)
    q, k, v, mask = (x.detach() for x in make_block(g, c, parts, d, torch.float64, seed=g + 2 * c))
    expected_out, expected_lse = explicit_block(q, k, v, mask, 0.37)
    real = mask.amax(-1) > -1e8  # a query that sees nothing: its output is a mean of rounded logits (zeroed later)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        out, lse = window_kernel.window_block_forward(*(x.to(dtype) for x in (q, k, v, mask)), 0.37)
        assert out.dtype == lse.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
        assert_close(out[real].double(), expected_out[real], atol, f"out {dtype}")
        magnitude = expected_lse[real].abs().clamp(min=1.0)  # the self logit -1e5 is 0.0078 coarse in float32
        assert_close(lse[real].double() / magnitude, expected_lse[real] / magnitude, atol, f"lse {dtype}")


def test_native_forward_matches_pytorchs_flash_kernel_in_float32(monkeypatch):
    needs_native()
    q, k, v, mask = (x.detach().float() for x in make_block(64, 64, 2, 64, torch.float64, seed=9))
    got = window_kernel.window_block_forward(q, k, v, mask, 0.125)
    monkeypatch.setenv(native.ENABLE_VARIABLE, "0")
    expected = window_kernel.window_block_forward(q, k, v, mask, 0.125)
    real = mask.amax(-1) > -1e8
    assert_close(got[0][real], expected[0][real], 1e-5, "out")
    magnitude = expected[1][real].abs().clamp(min=1.0)
    assert_close(got[1][real] / magnitude, expected[1][real] / magnitude, 1e-6, "lse")


def block_arguments(g, c, parts, d, dtype, seed, scale=0.37):
    q, k, v, mask = make_block(g, c, parts, d, torch.float64, seed)
    out, lse = explicit_block(q, k, v, mask, scale)
    grad = output_gradient(out.shape, torch.float64, seed + 1)
    return [x.detach().to(dtype) for x in (grad, q, k, v, out, lse, mask)] + [scale]


@pytest.mark.parametrize("g, c, parts, d", [(1, 1, 1, 1), (5, 3, 2, 7), (3, 4, 3, 5), (64, 16, 2, 8), (3, 37, 2, 70)])
@pytest.mark.parametrize("implementation", ["native", "native-blas"])
def test_native_kernel_matches_the_batched_one(g, c, parts, d, implementation, implementation_of):
    implementation_of(implementation)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        arguments = block_arguments(g, c, parts, d, dtype, seed=g + c + parts)
        expected = window_block_backward_batched(*arguments)
        got = torch.ops.reformer.window_block_backward(*arguments)
        for name, a, b in zip(("dq", "dk", "dv"), got, expected):
            assert a.dtype == dtype
            assert_close(a, b, atol, f"{name} {dtype}")


def test_the_tile_products_run_where_the_cpu_has_avx512():
    """The library is built for this CPU (-march=native): with AVX-512 its chunk products are its own tiles,
    without it the BLAS; built with -DREFORMER_BLAS_PRODUCTS, the BLAS whatever the CPU."""
    needs_native()
    flags = native._cpu_flags().split()
    assert native.tile_products_in_use() == ("avx512f" in flags)
    with tile_products(False):
        assert not native.tile_products_in_use()
    assert native.tile_products_in_use() == ("avx512f" in flags)


def test_native_kernel_takes_strided_inputs_and_a_float32_mask_for_float64_rows():
    needs_native()
    arguments = block_arguments(4, 6, 2, 5, torch.float64, seed=11)
    expected = window_block_backward_batched(*arguments)
    grad, q = (torch.stack([x, x], dim=-1)[..., 0] for x in arguments[:2])  # the same values, strided
    assert not q.is_contiguous()
    got = torch.ops.reformer.window_block_backward(grad, q, *arguments[2:6],
                                               arguments[6].float(), arguments[7])
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("g, parts", [(9, 2), (1, 2), (2, 3), (7, 3), (5, 1)])
@pytest.mark.parametrize("implementation", ["native", "native-blas"])
def test_native_kernel_is_the_same_bit_for_bit_with_any_number_of_threads(g, parts, implementation,
                                                                            implementation_of):
    # each thread computes the key gradients of the extended chunks inside its share of the chunks, the rest
    # follow: shares that split a window, and more threads than chunks, must not change a bit
    implementation_of(implementation)
    arguments = block_arguments(g, 8, parts, 4, torch.float32, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            results.append(torch.ops.reformer.window_block_backward(*arguments))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], result))
    expected = window_block_backward_batched(*arguments)
    for name, a, b in zip(("dq", "dk", "dv"), results[0], expected):
        assert_close(a, b, 1e-5, name)


def test_native_kernel_refuses_keys_or_masks_that_do_not_fit_the_queries():
    needs_native()
    grad, q, k, v, out, lse, mask, scale = block_arguments(3, 4, 2, 5, torch.float64, seed=2)
    with pytest.raises(ValueError, match="do not cover 3 chunks of 4 with windows of 8"):
        torch.ops.reformer.window_block_backward(grad, q, k[:-1], v[:-1], out, lse, mask, scale)
    with pytest.raises(ValueError, match=r"the mask \(3, 4, 7\) is not \(G, c, w\)"):
        torch.ops.reformer.window_block_forward(q, k, v, mask[..., :7], scale)
    with pytest.raises(ValueError, match=r"the mask \(2, 4, 8\) is not \(G, c, w\)"):
        torch.ops.reformer.window_block_backward(grad, q, k, v, out, lse, mask[:2], scale)


def test_native_library_is_built_once_into_the_cache_directory(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        lib = native.library()
        assert lib is not None
        built = list(tmp_path.iterdir())
        assert [path.suffix for path in built] == [".so"]  # no temporary left behind
        native._load.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("compiler, reason", [("no-such-compiler-here", "no C\\+\\+ compiler found"),
                                              ("false", "compiling window_kernel.cpp and hash_kernel.cpp failed")])
def test_without_a_working_compiler_the_batched_path_runs_and_a_warning_says_why(compiler, reason, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=reason):
            assert native.library() is None
        arguments = block_arguments(3, 4, 2, 5, torch.float64, seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the failure is remembered
            got = window_kernel.window_block_backward(*arguments)
            out, lse = window_kernel.window_block_forward(*arguments[1:4], arguments[6], arguments[7])
        assert all(torch.equal(a, b) for a, b in zip(got, window_block_backward_batched(*arguments)))
        key_windows = (window_kernel.windows(x[None], 3, 4, 8) for x in arguments[2:4])  # (1, G, w, d)
        flash = window_kernel._FLASH(arguments[1][None], *key_windows, 0.0, False, attn_mask=arguments[6][None],
                                     scale=arguments[7])
        assert torch.equal(out, flash[0][0]) and torch.equal(lse, flash[1][0])
        assert list(tmp_path.iterdir()) == []  # nothing half-built is left
    finally:
        native._load.cache_clear()


def test_a_library_of_another_version_is_refused_with_both_versions():
    needs_native()
    path = native._library_path(native._compiler())
    assert path.exists()
    monkeypatch_version = native.VERSION
    try:
        native.VERSION = monkeypatch_version + 1
        with pytest.raises(RuntimeError, match=f"is version {monkeypatch_version}, expected {monkeypatch_version + 1}"):
            native.open_library(path)
    finally:
        native.VERSION = monkeypatch_version
    assert native.open_library(path).reformer_window_kernel_version() == native.VERSION


def test_reformer_native_0_never_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path))
    monkeypatch.setenv(native.ENABLE_VARIABLE, "0")
    native._load.cache_clear()
    try:
        assert native.library() is None
        assert list(tmp_path.iterdir()) == []
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kinds", [("lsh", "local", "full", "lsh"), ("sliding", "lsh")])
def test_a_models_gradients_are_the_same_with_either_kernel(causal, kinds, monkeypatch):
    """Padding, masks, several hashes, odd chunks and lengths, reversible layers: the batched and the native
    backward give the same parameter gradients in float64."""
    from reformer import ReformerLM
    from tests.conftest import random_batch, tiny_config

    needs_native()
    config = tiny_config(causal=causal, attn_layers=kinds, sliding_window=6)
    ids, mask = random_batch(config, batch=2, length=29, pad_from=20)
    grads = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(native.ENABLE_VARIABLE, setting)
        model = ReformerLM(config).double()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads[setting] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["1"].keys() == grads["0"].keys() and len(grads["1"]) > 10
    for name, grad in grads["1"].items():
        assert_close(grad, grads["0"][name], 1e-12, name)
