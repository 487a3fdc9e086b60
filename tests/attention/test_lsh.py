"""lsh_attention against its slow reference, plus the hashing and layout properties."""

from __future__ import annotations

import math

import pytest
import torch

from reformer.attention import hash_vectors, lsh_attention, n_buckets_for_length, rotation_size, total_buckets
from reformer.attention import native
from reformer.attention.lsh import first_signed_argmax, signed_argmax
from reformer.attention.reference import lsh_attention_reference
from tests.conftest import assert_close, seeded

F64 = torch.float64


def make_inputs(b, h, n, d, n_hashes, n_buckets, masked, seed=0):
    gen = seeded(seed)
    qk = torch.randn(b, h, n, d, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(b, h, n, d, dtype=F64, generator=gen, requires_grad=True)
    rotations = torch.randn(h, d, n_hashes, rotation_size(n_buckets), generator=gen)
    mask = None
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, n - 3:] = False  # right padding
        mask[-1, 1] = False  # a hole in the middle
    return qk, v, rotations, mask


def compare_with_reference(n, n_hashes, n_buckets, chunk_size, seed=0, normalize="softmax", **options):
    qk, v, rotations, mask = make_inputs(2, 2, n, 4, n_hashes, n_buckets, options.pop("masked"), seed)
    kwargs = dict(n_buckets=n_buckets, chunk_size=chunk_size, attention_mask=mask, **options)
    out, buckets = lsh_attention(qk, v, rotations, normalize=normalize, **kwargs)
    ref, ref_buckets = lsh_attention_reference(qk, v, rotations, **kwargs)
    assert torch.equal(buckets, ref_buckets)
    assert_close(out, ref, 1e-10, "out")
    weights = torch.randn(out.shape, dtype=F64, generator=seeded(99))
    grads = torch.autograd.grad((out * weights).sum(), [qk, v])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [qk, v])
    assert_close(grads[0], ref_grads[0], 1e-10, "grad qk")
    assert_close(grads[1], ref_grads[1], 1e-10, "grad v")
    return out


OPTION_SETS = [
    dict(dedup=False, same_bucket_only=False),
    dict(dedup=True, same_bucket_only=False),
    dict(dedup=False, same_bucket_only=True),
    dict(dedup=True, same_bucket_only=True),
]


@pytest.mark.parametrize("n_hashes", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "dedup", "same_bucket", "dedup+same_bucket"])
@pytest.mark.parametrize("wrap", [False, True])
def test_matches_reference(n_hashes, causal, masked, options, wrap):
    compare_with_reference(13, n_hashes, 4, 4, causal=causal, masked=masked, wrap=wrap, **options)


@pytest.mark.parametrize("before, after", [(0, 0), (2, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("same_bucket_only", [False, True])
def test_windows_match_reference(before, after, n_hashes, causal, wrap, same_bucket_only):
    """Chunks before and after (HF's lsh_num_chunks_before / after), with and without wrap-around."""
    compare_with_reference(13, n_hashes, 4, 3, causal=causal, masked=True, wrap=wrap, chunks_before=before,
                           chunks_after=after, same_bucket_only=same_bucket_only)


def test_dedup_needs_the_default_window():
    qk, v, rotations, _ = make_inputs(1, 1, 8, 4, 2, 4, masked=False)
    with pytest.raises(ValueError, match="dedup counts keys over windows of one chunk before"):
        lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, dedup=True, chunks_after=1)
    with pytest.raises(ValueError, match="chunks_before must be an integer >= 0"):
        lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, chunks_before=-1)


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
def test_hf_normalisation_matches_reference_in_float64(n_hashes, causal, wrap):
    """exp(x - logsumexp(x)) is the same math as softmax: equal to the reference in float64."""
    compare_with_reference(13, n_hashes, 4, 4, causal=causal, masked=True, wrap=wrap, normalize="hf")


def test_exact_normalisation_where_hf_rounding_is_off():
    """float32: a query that sees only itself (logit -1e5) in every round.

    Softmax weights give exactly its value; exp(x - logsumexp(x)) is off by
    up to 0.4% (float32 spacing near 1e5 is 0.0078), as in HF and Trax.
    """
    gen = seeded(3)
    qk, v = torch.randn(1, 1, 8, 4, generator=gen), torch.randn(1, 1, 8, 4, generator=gen)
    rotations = torch.randn(1, 4, 3, 2, generator=gen)
    kwargs = dict(n_buckets=4, chunk_size=4, causal=True, wrap=True)
    exact, _ = lsh_attention(qk, v, rotations, **kwargs)
    rounded, _ = lsh_attention(qk, v, rotations, normalize="hf", **kwargs)
    assert torch.allclose(exact[..., 0, :], v[..., 0, :], rtol=1e-6, atol=0)  # the first token sees only itself
    assert (rounded[..., 0, :] - v[..., 0, :]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="normalize must be one of"):
        lsh_attention(qk, v, rotations, normalize="sparsemax", **kwargs)


@pytest.mark.parametrize("n_buckets", [(2, 4), (4, 2, 2)])
@pytest.mark.parametrize("n, chunk_size", [(16, 4), (21, 5), (7, 8)])
@pytest.mark.parametrize("causal, masked, dedup", [(False, False, False), (True, True, True)])
def test_matches_reference_factorised_and_odd_lengths(n_buckets, n, chunk_size, causal, masked, dedup):
    compare_with_reference(n, 2, n_buckets, chunk_size, causal=causal, masked=masked, dedup=dedup)


def test_single_chunk_is_shared_qk_attention_with_self_mask():
    """One round, one chunk: plain softmax attention with unit-length keys, self only as a last resort."""
    qk, v, rotations, _ = make_inputs(1, 1, 6, 4, 1, 2, masked=False)
    out, _ = lsh_attention(qk, v, rotations, n_buckets=2, chunk_size=8, causal=True)
    q, vals = qk[0, 0], v[0, 0]
    keys = q / q.norm(dim=-1, keepdim=True)
    expected = [vals[0]]  # the first token has nothing but itself
    for i in range(1, 6):
        weights = torch.softmax(q[i] @ keys[:i].T, dim=0)
        expected.append(weights @ vals[:i])
    assert_close(out[0, 0], torch.stack(expected), 1e-5, "out")


def test_bucket_is_argmax_of_rotated_and_negated():
    gen = seeded(3)
    x = torch.randn(1, 1, 9, 4, generator=gen)
    rotations = torch.randn(1, 4, 2, 3, generator=gen)  # n_buckets 6, 2 rounds
    buckets = hash_vectors(x, rotations, 6)
    for r in range(2):
        rotated = x[0, 0] @ rotations[0, :, r]
        assert torch.equal(buckets[0, 0, r], torch.cat([rotated, -rotated], -1).argmax(-1))


@pytest.mark.parametrize("implementation", ["first_signed_argmax", "native"])
def test_signed_argmax_is_argmax_of_both_signs_first_on_ties(implementation):
    if implementation == "native" and native.library() is None:
        pytest.skip("the native kernel is unavailable here")
    argmax = signed_argmax if implementation == "native" else first_signed_argmax
    gen = seeded(5)
    y = torch.randn(3, 7, 300, generator=gen).round()  # many exact ties, also between y and -y; > 256 positions
    y[0, :, :5] = 0.0  # all equal: index 0
    y[1, 2, 5] = y[1, 4, 5] = 10.0  # the first positive maximum
    y[1, :, 6] = 1.0
    y[1, 3, 6] = -2.0  # only a negated maximum: 7 + 3
    expected = torch.cat([y, -y], dim=1).argmax(dim=1)
    assert torch.equal(argmax(y), expected)
    assert torch.equal(argmax(y.double()), expected)
    wide = torch.randn(2, 3, 11, 300, generator=gen)  # a slice of the rotations, as _hash_piece takes it
    part = wide[:, :, 4:9]
    assert torch.equal(argmax(part), torch.cat([part, -part], dim=2).argmax(dim=2))
    assert torch.equal(argmax(part.transpose(-1, -2).contiguous().transpose(-1, -2)),  # positions strided
                       torch.cat([part, -part], dim=2).argmax(dim=2))


def test_factorised_buckets_first_factor_least_significant():
    gen = seeded(4)
    x = torch.randn(1, 1, 50, 6, generator=gen)
    rotations = torch.randn(1, 6, 1, 3, generator=gen)  # factors (2, 4): slices of 1 and 2 columns
    buckets = hash_vectors(x, rotations, (2, 4))[0, 0, 0]
    first = hash_vectors(x, rotations[..., :1], 2)[0, 0, 0]
    second = hash_vectors(x, rotations[..., 1:], 4)[0, 0, 0]
    assert torch.equal(buckets, first + 2 * second)
    assert buckets.max() < 8 and len(buckets.unique()) > 4


def test_padded_tokens_get_the_extra_bucket():
    qk, v, rotations, mask = make_inputs(2, 2, 13, 4, 2, (2, 4), masked=True)
    _, buckets = lsh_attention(qk, v, rotations, n_buckets=(2, 4), chunk_size=4, attention_mask=mask)
    assert (buckets.permute(0, 3, 1, 2)[~mask] == total_buckets((2, 4))).all()
    assert (buckets.permute(0, 3, 1, 2)[mask] < 8).all()


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_does_not_change_real_tokens(causal):
    qk, v, rotations, _ = make_inputs(1, 2, 11, 4, 2, 4, masked=False)
    out, _ = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, causal=causal)
    for extra in (1, 5, 9):
        qk_p = torch.cat([qk, torch.randn(1, 2, extra, 4, dtype=F64)], dim=2)
        v_p = torch.cat([v, torch.randn(1, 2, extra, 4, dtype=F64)], dim=2)
        mask = torch.arange(11 + extra)[None] < 11
        out_p, _ = lsh_attention(qk_p, v_p, rotations, n_buckets=4, chunk_size=4, causal=causal,
                                 attention_mask=mask)
        assert_close(out_p[:, :, :11], out, 1e-12, f"padding {extra}")
        assert (out_p[:, :, 11:] == 0).all()


def test_dedup_is_attention_over_the_union_of_windows():
    """With as many rounds as identical hashes, dedup makes extra rounds change nothing."""
    qk, v, rotations, _ = make_inputs(1, 1, 16, 4, 1, 4, masked=False)
    one, _ = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, dedup=True)
    three, _ = lsh_attention(qk, v, rotations.repeat(1, 1, 3, 1), n_buckets=4, chunk_size=4, dedup=True)
    assert_close(three, one, 1e-12, "dedup")


def test_reused_buckets_give_the_same_output():
    qk, v, rotations, mask = make_inputs(2, 2, 13, 4, 2, 4, masked=True)
    out, buckets = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, attention_mask=mask, causal=True)
    again, same = lsh_attention(qk, v, None, n_buckets=4, chunk_size=4, attention_mask=mask, causal=True,
                                buckets=buckets)
    assert torch.equal(out, again) and torch.equal(buckets, same)


def test_dropout_is_seeded():
    qk, v, rotations, _ = make_inputs(1, 2, 16, 4, 2, 4, masked=False)
    kwargs = dict(n_buckets=4, chunk_size=4, dropout=0.3)
    a, _ = lsh_attention(qk, v, rotations, dropout_seed=5, **kwargs)
    b, _ = lsh_attention(qk, v, rotations, dropout_seed=5, **kwargs)
    c, _ = lsh_attention(qk, v, rotations, dropout_seed=6, **kwargs)
    plain, _ = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, plain)


def test_gradcheck():
    qk, v, rotations, mask = make_inputs(1, 1, 7, 3, 2, 4, masked=False)
    fn = lambda a, b: lsh_attention(a, b, rotations, n_buckets=4, chunk_size=3, causal=True, dedup=True)[0]
    assert torch.autograd.gradcheck(fn, (qk, v))


def test_long_sequence_is_linear_in_memory():
    """2^17 tokens: a length^2 tensor would need 64 GiB; the chunked path needs a few MB."""
    n, d = 1 << 17, 8
    gen = seeded(0)
    qk = torch.randn(1, 1, n, d, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, n, d, generator=gen, requires_grad=True)
    rotations = torch.randn(1, d, 1, 2048, generator=gen)
    out, _ = lsh_attention(qk, v, rotations, n_buckets=4096, chunk_size=32, causal=True)
    out.sum().backward()
    assert torch.isfinite(qk.grad).all() and out.shape == v.shape


def test_n_buckets_rule_follows_the_paper():
    assert n_buckets_for_length(1024, 64) == 32  # 2 * L / m
    assert n_buckets_for_length(10, 64) == 2
    big = n_buckets_for_length(65536, 64)  # 2048 buckets, factorised
    assert isinstance(big, tuple) and math.prod(big) == 2048


@pytest.mark.parametrize("bad, message", [
    (dict(n_buckets=3), "even"),
    (dict(n_buckets=(2, 3)), "even"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments_are_explained(bad, message):
    qk, v, rotations, _ = make_inputs(1, 2, 8, 4, 1, 4, masked=False)
    kwargs = dict(n_buckets=4, chunk_size=4) | bad
    with pytest.raises(ValueError, match=message):
        lsh_attention(qk, v, rotations, **kwargs)


def test_bad_shapes_are_explained():
    qk, v, rotations, _ = make_inputs(1, 2, 8, 4, 1, 4, masked=False)
    with pytest.raises(ValueError, match="rotations"):
        lsh_attention(qk, v, rotations, n_buckets=8, chunk_size=4)
    with pytest.raises(ValueError, match=r"\(batch, heads, length, d_head\)"):
        lsh_attention(qk[0], v[0], rotations, n_buckets=4, chunk_size=4)
    with pytest.raises(ValueError, match="shape"):
        lsh_attention(qk, v[:, :, :5], rotations, n_buckets=4, chunk_size=4)
    with pytest.raises(ValueError, match="attention_mask"):
        lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, attention_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        lsh_attention(qk.long(), v, rotations, n_buckets=4, chunk_size=4)


def test_padding_filled_with_nan_never_leaks():
    qk, v, rotations, _ = make_inputs(1, 2, 10, 4, 2, 4, masked=False)
    qk, v = qk.detach().clone(), v.detach().clone()
    qk[:, :, 7:] = float("nan")
    v[:, :, 7:] = float("nan")
    mask = torch.arange(10)[None] < 7
    out, _ = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, attention_mask=mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal, masked", [(False, False), (True, True)])
def test_shared_qk_full_attention_is_lsh_with_one_chunk(causal, masked):
    from reformer.attention.full import shared_qk_attention

    qk, v, rotations, mask = make_inputs(2, 2, 13, 4, 1, 4, masked=masked)
    lsh, _ = lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=16, causal=causal, attention_mask=mask)
    full = shared_qk_attention(qk, v, causal=causal, attention_mask=mask)
    assert_close(full, lsh, 1e-12, "full vs one-chunk LSH")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("chunks_per_block", [1, 4])
def test_fused_blocks_of_any_size_match_reference(monkeypatch, causal, wrap, chunks_per_block):
    """Blocks of one chunk, and of 4 chunks of 3 that straddle the 7-chunk rounds, give the reference's output."""
    from reformer.attention import fused_chunks

    monkeypatch.setattr(fused_chunks, "BLOCK_ELEMENTS", chunks_per_block * 3 * 6)  # chunk 3, window 6
    compare_with_reference(21, 3, (2, 4), 3, causal=causal, masked=True, wrap=wrap)


def test_fused_kernel_is_used_exactly_when_the_options_allow(monkeypatch):
    from reformer.attention import fused_chunks

    calls = []
    original = fused_chunks.ChunkedAttention.apply
    monkeypatch.setattr(fused_chunks.ChunkedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    qk, v, rotations, _ = make_inputs(1, 1, 16, 4, 2, 4, masked=False)
    for options, fused in ((dict(), True), (dict(dedup=True), False), (dict(same_bucket_only=True), False),
                           (dict(normalize="hf"), False), (dict(dropout=0.1, dropout_seed=3), False),
                           (dict(dropout=0.1), True)):
        calls.clear()
        lsh_attention(qk, v, rotations, n_buckets=4, chunk_size=4, **options)
        assert bool(calls) == fused, options
