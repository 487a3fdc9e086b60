"""sliding_window_attention (Longformer) against its dense-mask reference, forward and gradients, in float64."""

from __future__ import annotations

import pytest
import torch

from reformer.attention import sliding, sliding_window_attention
from reformer.attention.reference import sliding_window_reference
from tests.conftest import assert_close, seeded

F64 = torch.float64
HEADS = 2


def make_inputs(n, *, masked, global_tokens, global_projections=False, b=2, d=4, seed=0):
    gen = seeded(seed)
    q, k, v = (torch.randn(b, HEADS, n, d, dtype=F64, generator=gen, requires_grad=True) for _ in range(3))
    extra = {}
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, -2:] = False  # right padding
        mask[-1, n // 2] = False  # a hole in the middle
        extra["attention_mask"] = mask
    if global_tokens:
        glob = torch.zeros(b, n, dtype=torch.bool)
        glob[0, 0] = glob[-1, n // 3] = glob[-1, n - 1] = True  # rows with different counts; one may be padding
        extra["global_mask"] = glob
    if global_projections:
        extra["global_qkv"] = tuple(torch.randn(b, HEADS, n, d, dtype=F64, generator=gen, requires_grad=True)
                                    for _ in range(3))
    return q, k, v, extra


def use(path: str, monkeypatch) -> None:
    """Run sliding_window_attention's "fused" path (native kernel), "fused-pytorch" (REFORMER_NATIVE=0) or
    "explicit" (no fused kernel) until the test ends."""
    if path == "explicit":
        monkeypatch.setattr(sliding, "fused_kernel_available", lambda *_: False)
    elif path == "fused-pytorch":
        monkeypatch.setenv("REFORMER_BACKEND", "torch")


def check(n, *, masked=False, global_tokens=False, global_projections=False, explicit=False,
          monkeypatch=None, path=None, **options):
    """Outputs and the gradients of q, k, v (and the global projections) equal the reference's to 1e-10."""
    if explicit:
        monkeypatch.setattr(sliding, "fused_kernel_available", lambda *_: False)
    if path is not None:
        use(path, monkeypatch)
    q, k, v, extra = make_inputs(n, masked=masked, global_tokens=global_tokens,
                                 global_projections=global_projections)
    out = sliding_window_attention(q, k, v, **extra, **options)
    options.pop("chunk_size", None)
    ref = sliding_window_reference(q, k, v, **extra, **options)
    assert_close(out, ref, 1e-10, "out")
    leaves = [q, k, v, *extra.get("global_qkv", ())]
    weights = torch.randn(out.shape, dtype=F64, generator=seeded(7))
    grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), leaves, allow_unused=True)
    names = ["q", "k", "v", "q_g", "k_g", "v_g"]
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, leaves):
        zero = torch.zeros_like(leaf)
        assert_close(zero if grad is None else grad, zero if ref_grad is None else ref_grad, 1e-10, f"grad {name}")


WINDOWS = [1, 3, 16]
DILATIONS = [1, 2, (1, 3)]  # (1, 3): one value per head


@pytest.mark.parametrize("n", [7, 19])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_band_matches_reference(monkeypatch, explicit, window, dilation, causal, masked, n):
    check(n, masked=masked, explicit=explicit, monkeypatch=monkeypatch, window=window, dilation=dilation,
          causal=causal)


@pytest.mark.parametrize("global_projections", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("path", ["fused", "explicit"])
def test_global_tokens_match_reference(monkeypatch, path, window, dilation, causal, masked, global_projections):
    check(19, masked=masked, global_tokens=True, global_projections=global_projections, window=window,
          dilation=dilation, causal=causal, path=path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["fused", "fused-pytorch", "explicit"])
def test_the_rule_of_older_models_matches_reference(monkeypatch, path, causal):
    """global_rule="global_kv": the other rows score the global keys with k_g and take v_g."""
    check(19, masked=True, global_tokens=True, global_projections=True, window=3, dilation=(1, 2), causal=causal,
          global_rule="global_kv", path=path, monkeypatch=monkeypatch)


def test_the_two_rules_differ_only_with_global_projections_at_global_keys():
    q, k, v, extra = make_inputs(19, masked=True, global_tokens=True, global_projections=True)
    options = dict(window=2, **extra)
    new, old = (sliding_window_attention(q, k, v, global_rule=rule, **options) for rule in sliding.GLOBAL_RULES)
    assert not torch.allclose(new, old)
    extra.pop("global_qkv")
    same = [sliding_window_attention(q, k, v, global_rule=rule, window=2, **extra) for rule in sliding.GLOBAL_RULES]
    assert torch.equal(*same)
    with pytest.raises(ValueError, match="global_rule must be one of"):
        sliding_window_attention(q, k, v, window=2, global_rule="hf")


@pytest.mark.parametrize("global_tokens", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, (1, 3)])
def test_fused_pytorch_kernel_matches_reference(monkeypatch, dilation, causal, global_tokens):
    """The fused path without the native kernel (REFORMER_NATIVE=0): PyTorch's flash blocks, the columns merged."""
    check(19, masked=True, global_tokens=global_tokens, global_projections=global_tokens, window=3,
          dilation=dilation, causal=causal, path="fused-pytorch", monkeypatch=monkeypatch)


@pytest.mark.parametrize("rows_per_block", [1, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_in_blocks_of_any_size_match_reference(monkeypatch, causal, rows_per_block):
    """The global columns' merge and backward in blocks of few queries, the global rows' in blocks of few keys
    (and the window's blocks of one chunk)."""
    from reformer.attention import fused_chunks, global_tokens

    monkeypatch.setattr(global_tokens, "BLOCK_ELEMENTS", rows_per_block * 4)  # d = 4: rows (keys) of 4 elements
    monkeypatch.setattr(fused_chunks, "BLOCK_ELEMENTS", 4 * 12)  # the window's blocks: one chunk of 4
    check(23, masked=True, global_tokens=True, global_projections=True, window=3, dilation=(2, 1), causal=causal,
          chunk_size=4)


@pytest.mark.parametrize("global_tokens", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, (1, 3)])
def test_dropout_matches_reference(dilation, causal, global_tokens):
    """Seeded dropout on the probabilities, band, global columns and global rows, drops the same (batch, head,
    query, key) weights as the reference: outputs and gradients to 1e-10."""
    check(19, masked=True, global_tokens=global_tokens, global_projections=global_tokens, window=3,
          dilation=dilation, causal=causal, dropout=0.4, dropout_seed=11)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
@pytest.mark.parametrize("global_tokens", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_any_chunking_gives_the_same_result(dropout, chunk_size, global_tokens):
    """The layout's chunk (here shorter and longer than the window of 3, dilated) changes nothing, dropout
    included (its mask is drawn by position, not by layout)."""
    check(23, masked=True, global_tokens=global_tokens, window=3, dilation=(2, 1), causal=False,
          chunk_size=chunk_size, dropout=dropout, dropout_seed=3)


@pytest.mark.parametrize("chunks_per_block", [1, 3])
def test_fused_blocks_of_any_size_match_reference(monkeypatch, chunks_per_block):
    from reformer.attention import fused_chunks

    monkeypatch.setattr(fused_chunks, "BLOCK_ELEMENTS", chunks_per_block * 4 * 12)  # chunk 4, window 12
    check(29, masked=True, window=3, dilation=(1, 2), causal=False, chunk_size=4)


def test_a_single_token():
    check(1, window=3, dilation=2, causal=True)
    check(1, global_tokens=True, window=1, causal=False)


@pytest.mark.parametrize("global_tokens", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_padding_leaves_real_outputs_unchanged(causal, global_tokens):
    """NaN in every padded position of q, k, v (and the global projections): real outputs finite and equal."""
    q, k, v, extra = make_inputs(19, masked=True, global_tokens=global_tokens, global_projections=global_tokens)
    options = dict(window=3, dilation=(1, 2), causal=causal, **extra)
    clean = sliding_window_attention(q, k, v, **options)
    padded = ~extra["attention_mask"][:, None, :, None]

    def poisoned(x):
        return x.detach().masked_fill(padded, float("nan")).requires_grad_()

    rows = [poisoned(x) for x in (q, k, v)]
    if global_tokens:
        options["global_qkv"] = tuple(poisoned(x) for x in extra["global_qkv"])
    out = sliding_window_attention(*rows, **options)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)
    grads = torch.autograd.grad(out.sum(), rows)
    assert all(torch.isfinite(grad).all() for grad in grads)


@pytest.mark.parametrize("global_tokens", [False, True])
def test_causal_outputs_never_depend_on_later_tokens(global_tokens):
    q, k, v, extra = make_inputs(19, masked=False, global_tokens=global_tokens, global_projections=global_tokens)
    if global_tokens:
        extra["global_mask"][:, -1] = True  # a global token at the very end must not be seen early
    options = dict(window=4, dilation=(1, 2), causal=True, **extra)
    out = sliding_window_attention(q, k, v, **options)
    t = 11
    changed = [x.detach().clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, t + 1:] += 10.0
    if global_tokens:
        options["global_qkv"] = tuple(x.detach().clone().index_fill_(2, torch.arange(t + 1, 19), 5.0)
                                      for x in extra["global_qkv"])
    out_changed = sliding_window_attention(*changed, **options)
    assert torch.equal(out[:, :, :t + 1], out_changed[:, :, :t + 1])
    assert not torch.allclose(out[:, :, t + 1:], out_changed[:, :, t + 1:])


def test_global_tokens_see_and_are_seen_by_everything():
    """Window 1: without the global token, position 0 never reaches position 18; with it, both ways."""
    q, k, v, _ = make_inputs(19, masked=False, global_tokens=False)
    glob = torch.zeros(2, 19, dtype=torch.bool)
    glob[:, 0] = True
    for mask, connected in ((None, False), (glob, True)):
        out = sliding_window_attention(q, k, v, window=1, global_mask=mask)
        far = torch.autograd.grad(out[:, :, 18].sum(), v, retain_graph=True)[0][:, :, 0]
        near = torch.autograd.grad(out[:, :, 0].sum(), v)[0][:, :, 18]
        assert bool((far != 0).any()) == connected and bool((near != 0).any()) == connected


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_does_not_change_real_outputs(causal):
    q, k, v, _ = make_inputs(13, masked=False, global_tokens=False)
    out = sliding_window_attention(q, k, v, window=5, dilation=(1, 2), causal=causal)
    extra = torch.randn(3, 2, HEADS, 6, 4, dtype=F64, generator=seeded(2))
    padded = [torch.cat([x, e], dim=2) for x, e in zip((q, k, v), extra)]
    mask = torch.arange(19)[None].expand(2, -1) < 13
    out_padded = sliding_window_attention(*padded, window=5, dilation=(1, 2), causal=causal, attention_mask=mask)
    assert_close(out_padded[:, :, :13], out, 1e-12, "padded")
    assert torch.equal(out_padded[:, :, 13:], torch.zeros_like(out_padded[:, :, 13:]))


def test_dropout_is_seeded():
    q, k, v, extra = make_inputs(19, masked=True, global_tokens=True)
    options = dict(window=3, dropout=0.5, **extra)
    a = sliding_window_attention(q, k, v, dropout_seed=1, **options)
    b = sliding_window_attention(q, k, v, dropout_seed=1, **options)
    c = sliding_window_attention(q, k, v, dropout_seed=2, **options)
    plain = sliding_window_attention(q, k, v, window=3, **extra)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)


@pytest.mark.parametrize("global_tokens", [0, 4, 64])
def test_saved_memory_grows_with_length_times_window_not_length_squared(global_tokens):
    """Everything autograd keeps for the backward is O(n * (window + globals)), never n^2 (n = 4,096; 0, 4 or
    64 global tokens, with their own projections)."""
    n, window, d = 4096, 8, 4
    q, k, v, *global_qkv = (torch.randn(1, HEADS, n, d, requires_grad=True) for _ in range(6))
    glob = torch.zeros(1, n, dtype=torch.bool)
    if global_tokens:
        glob[0, ::n // global_tokens] = True
    largest = []

    def pack(x):
        largest.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = sliding_window_attention(q, k, v, window=window, global_mask=glob if global_tokens else None,
                                       global_qkv=tuple(global_qkv))
    out.sum().backward()
    chunk = sliding.default_chunk_size(window)
    per_query = chunk + 2 * chunk * -(-window // chunk) + 4  # the chunk layout's window, and the global columns
    assert max(largest) <= HEADS * n * max(per_query, d + 1)
    assert max(largest) < n * n // 16


def test_bfloat16_follows_float64():
    """Under bfloat16 both executions stay within 2^-6 of the largest output entry of float64."""
    q, k, v, extra = make_inputs(61, masked=True, global_tokens=False, d=16)
    for options in (dict(extra), dict(extra, global_mask=torch.zeros(2, 61, dtype=torch.bool).index_fill_(1,
                                                                                   torch.tensor([5]), True))):
        exact = sliding_window_attention(q, k, v, window=6, dilation=(1, 2), **options)
        low = sliding_window_attention(*(x.bfloat16() for x in (q, k, v)), window=6, dilation=(1, 2), **options)
        assert low.dtype == torch.bfloat16
        assert (low.double() - exact).abs().max() <= exact.abs().max() * 2 ** -6


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["fused", "explicit"])
def test_global_tokens_under_bfloat16_autocast_follow_float64(monkeypatch, path, causal):
    """float32 rows under autocast(bfloat16), global tokens with their own projections: out and the gradients of
    all six within 2^-6 of the largest entry of the float64 reference's."""
    use(path, monkeypatch)
    q, k, v, extra = make_inputs(61, masked=True, global_tokens=True, global_projections=True, d=16)
    leaves = [q, k, v, *extra["global_qkv"]]
    options = dict(window=6, dilation=(1, 2), causal=causal, attention_mask=extra["attention_mask"],
                   global_mask=extra["global_mask"])
    rows = [x.detach().float().requires_grad_() for x in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sliding_window_attention(*rows[:3], global_qkv=tuple(rows[3:]), **options)
    weights = torch.randn(low.shape, generator=seeded(5), dtype=F64)
    low_grads = torch.autograd.grad((low.double() * weights).sum(), rows)
    exact = sliding_window_reference(q, k, v, global_qkv=tuple(leaves[3:]), **options)
    exact_grads = torch.autograd.grad((exact * weights).sum(), leaves)
    for name, a, b in zip(["out", "q", "k", "v", "q_g", "k_g", "v_g"], [low, *low_grads], [exact, *exact_grads]):
        assert (a.double() - b).abs().max() <= b.abs().max() * 2 ** -6, name


def test_bad_input_is_explained():
    q, k, v, _ = make_inputs(8, masked=False, global_tokens=False)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="dilation must be integers >= 1"):
        sliding_window_attention(q, k, v, window=2, dilation=0)
    with pytest.raises(ValueError, match="dilation has 3 values for 2 heads"):
        sliding_window_attention(q, k, v, window=2, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match=r"global_mask must have shape \(batch, length\) = \(2, 8\)"):
        sliding_window_attention(q, k, v, window=2, global_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="global_mask must be bool"):
        sliding_window_attention(q, k, v, window=2, global_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="global_qkv's k_g must have the shape of q"):
        sliding_window_attention(q, k, v, window=2, global_qkv=(q, k[:, :, :4], v))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        sliding_window_attention(q, k, v, window=2, chunk_size=0)
