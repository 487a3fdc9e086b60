"""local_attention and full_attention against their slow references."""

from __future__ import annotations

import pytest
import torch

from reformer.attention import full_attention, local_attention
from reformer.attention.reference import full_attention_reference, local_attention_reference
from tests.conftest import assert_close, seeded, tile_products

F64 = torch.float64


def make_qkv(b, h, n, d, masked, seed=0):
    gen = seeded(seed)
    q, k, v = (torch.randn(b, h, n, d, dtype=F64, generator=gen, requires_grad=True) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, -2:] = False
        mask[-1, n // 2] = False
    return q, k, v, mask


def check(fn, ref_fn, n, masked, **kwargs):
    q, k, v, mask = make_qkv(2, 2, n, 5, masked)
    out = fn(q, k, v, attention_mask=mask, **kwargs)
    ref = ref_fn(q, k, v, attention_mask=mask, **kwargs)
    assert_close(out, ref, 1e-10, "out")
    weights = torch.randn(out.shape, dtype=F64, generator=seeded(7))
    grads = torch.autograd.grad((out * weights).sum(), [q, k, v])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [q, k, v])
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, 1e-10, f"grad {name}")


LENGTHS_AND_MASKING = [(1, False), (5, False), (5, True), (13, False), (13, True), (16, False), (16, True)]


@pytest.mark.parametrize("n, masked", LENGTHS_AND_MASKING)
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_local_matches_reference(n, masked, chunk_size, causal):
    check(local_attention, local_attention_reference, n, masked, chunk_size=chunk_size, causal=causal)


@pytest.mark.parametrize("n, masked", LENGTHS_AND_MASKING)
@pytest.mark.parametrize("chunk_size", [1, 4, 7])
@pytest.mark.parametrize("causal", [False, True])
def test_local_with_wrap_matches_reference(n, masked, chunk_size, causal):
    check(local_attention, local_attention_reference, n, masked, chunk_size=chunk_size, causal=causal, wrap=True)


@pytest.mark.parametrize("products", ["tile", "blas"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunks_of_one_query_in_either_kind_of_product(products, causal):
    """Chunks of one query make products of one row, whose strides the BLAS still checks against the widths
    (it refused them, and the outputs were garbage, on a CPU without AVX-512, where the BLAS is the default)."""
    with tile_products(products == "tile"):
        for wrap in (False, True):
            check(local_attention, local_attention_reference, 13, True, chunk_size=1, causal=causal, wrap=wrap)


WINDOWS = [(0, 0), (2, 0), (1, 1), (0, 2), (2, 1)]


@pytest.mark.parametrize("before, after", WINDOWS)
@pytest.mark.parametrize("n", [5, 13, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
def test_local_windows_match_reference(before, after, n, causal, wrap):
    """Chunks before and after (HF's local_num_chunks_before / after), with and without wrap-around."""
    check(local_attention, local_attention_reference, n, True, chunk_size=4, causal=causal, wrap=wrap,
          chunks_before=before, chunks_after=after)


@pytest.mark.parametrize("chunks_per_block", [1, 2])
@pytest.mark.parametrize("wrap", [False, True])
def test_local_blocks_of_any_size_match_reference(monkeypatch, chunks_per_block, wrap):
    """The fused kernel's blocks (here 1 or 2 chunks of 3) write their outputs and window gradients in place."""
    from reformer.attention import fused_chunks

    monkeypatch.setattr(fused_chunks, "BLOCK_ELEMENTS", chunks_per_block * 3 * 9)  # chunk 3, window 9
    check(local_attention, local_attention_reference, 16, True, chunk_size=3, causal=False, wrap=wrap,
          chunks_before=1, chunks_after=1)


def test_bad_windows_are_explained():
    q, k, v, _ = make_qkv(1, 1, 8, 4, masked=False)
    for field in ("chunks_before", "chunks_after"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 0"):
            local_attention(q, k, v, chunk_size=4, **{field: -1})


def test_local_wrap_lets_the_first_chunk_see_the_last():
    """HF layout: non-causal, the first chunk sees the last chunk (and only the first chunk does)."""
    q, k, v, _ = make_qkv(1, 1, 12, 4, masked=False)
    v2 = v.detach().clone()
    v2[:, :, 8:] += 100.0
    out, out2 = (local_attention(q, k, values, chunk_size=4, wrap=True) for values in (v, v2))
    assert not torch.allclose(out[:, :, :4], out2[:, :, :4])
    assert torch.equal(out[:, :, 4:8], out2[:, :, 4:8])
    causal, causal2 = (local_attention(q, k, values, chunk_size=4, wrap=True, causal=True) for values in (v, v2))
    assert torch.equal(causal[:, :, :8], causal2[:, :, :8])


@pytest.mark.parametrize("n, masked", LENGTHS_AND_MASKING)
@pytest.mark.parametrize("causal", [False, True])
def test_full_matches_reference(n, masked, causal):
    check(full_attention, full_attention_reference, n, masked, causal=causal)


def test_local_first_chunk_does_not_wrap():
    """Non-causal: the first chunk must not see the last chunk (HF's wrap-around is not the default)."""
    q, k, v, _ = make_qkv(1, 1, 12, 4, masked=False)
    out = local_attention(q, k, v, chunk_size=4)
    v2 = v.detach().clone()
    v2[:, :, 8:] += 100.0
    out2 = local_attention(q, k, v2, chunk_size=4)
    assert torch.equal(out[:, :, :4], out2[:, :, :4])


@pytest.mark.parametrize("fn, kwargs", [(local_attention, dict(chunk_size=4)), (full_attention, {})])
def test_padding_filled_with_nan_never_leaks(fn, kwargs):
    """xformers' trick: NaN in the padded keys and values must not reach a real output."""
    q, k, v, _ = make_qkv(1, 2, 10, 4, masked=False)
    mask = torch.arange(10)[None] < 7
    k, v = k.detach().clone(), v.detach().clone()
    k[:, :, 7:] = float("nan")
    v[:, :, 7:] = float("nan")
    out = fn(q, k, v, attention_mask=mask, causal=False, **kwargs)
    assert torch.isfinite(out[:, :, :7]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_local_right_padding_invariance(causal):
    q, k, v, _ = make_qkv(1, 2, 9, 4, masked=False)
    out = local_attention(q, k, v, chunk_size=4, causal=causal)
    extra = torch.randn(3, 1, 2, 6, 4, dtype=F64, generator=seeded(2))
    padded = [torch.cat([t, e], dim=2) for t, e in zip((q, k, v), extra)]
    mask = torch.arange(15)[None] < 9
    out_p = local_attention(*padded, chunk_size=4, causal=causal, attention_mask=mask)
    assert_close(out_p[:, :, :9], out, 1e-12, "padded")


def test_local_dropout_is_seeded():
    q, k, v, _ = make_qkv(1, 2, 16, 4, masked=False)
    a = local_attention(q, k, v, chunk_size=4, dropout=0.5, dropout_seed=1)
    b = local_attention(q, k, v, chunk_size=4, dropout=0.5, dropout_seed=1)
    c = local_attention(q, k, v, chunk_size=4, dropout=0.5, dropout_seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_shared_query_keys_with_a_position_order_plan_are_refused():
    from reformer.attention.fused_chunks import ChunkedAttention, chunk_plan, projection_rows

    positions = torch.arange(16).expand(1, 2, 16)
    mask = torch.ones(1, 16, dtype=torch.bool)
    plan = chunk_plan(positions, mask, 16, 4, True, False, (1, 0), torch.float64, scale=0.5, self_value=None,
                      self_on_diagonal=True, in_position_order=True)
    rows = projection_rows(torch.randn(1, 2, 16, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="shared query-keys"):
        ChunkedAttention.apply(rows, None, rows, plan)
