"""lsh_attention(causal_window=W), prefix-consistent causal LSH, against its reference, in float64."""

from __future__ import annotations

import pytest
import torch

from reformer.attention import lsh_attention, random_rotations
from reformer.attention.lsh_causal_window import from_relative, to_relative
from reformer.attention.reference import lsh_attention_reference
from tests.conftest import assert_close, seeded

F64 = torch.float64


def make_inputs(n, rounds, masked, seed=0, b=2, h=2, d=4):
    gen = seeded(seed)
    qk = torch.randn(b, h, n, d, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(b, h, n, d, dtype=F64, generator=gen, requires_grad=True)
    rotations = random_rotations(h, d, rounds, 4, gen).to(F64)
    mask = None
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, -2:] = False
        mask[-1, n // 2] = False
    return qk, v, rotations, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("chunk_size", [2, 4])
@pytest.mark.parametrize("n", [5, 13, 16])
def test_matches_reference(n, chunk_size, window, rounds, dedup, masked):
    qk, v, rotations, mask = make_inputs(n, rounds, masked)
    options = dict(n_buckets=4, chunk_size=chunk_size, causal=True, attention_mask=mask, dedup=dedup,
                   causal_window=window)
    out, buckets = lsh_attention(qk, v, rotations, **options)
    ref, ref_buckets = lsh_attention_reference(qk, v, rotations, **options)
    assert torch.equal(buckets, ref_buckets)
    assert_close(out, ref, 1e-10, "out")
    weights = torch.randn(out.shape, dtype=F64, generator=seeded(7))
    grads = torch.autograd.grad((out * weights).sum(), [qk, v])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [qk, v])
    for name, g, rg in zip(("qk", "v"), grads, ref_grads):
        assert_close(g, rg, 1e-10, f"grad {name}")


def test_relative_layout_round_trips():
    scores = torch.randn(3, 4, 12, dtype=F64)  # chunks of 4, window slots 12 (two chunks before)
    relative = to_relative(scores, window=6)
    for o in range(4):
        for t in range(7):
            assert torch.equal(relative[:, o, t], scores[:, o, o + 8 - 6 + t])  # the key 6 - t slots before
    back = from_relative(relative, 12)
    inside = from_relative(torch.ones_like(relative), 12).bool()
    assert torch.equal(back[inside], scores[inside]) and torch.equal(back[~inside], torch.zeros_like(back[~inside]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dedup", [False, True])
def test_no_output_depends_on_a_later_token(dtype, dedup):
    """Changing every query-key and value after position t leaves the outputs at <= t bit for bit the same."""
    qk, v, rotations, _ = make_inputs(40, 3, False)
    qk, v = qk.detach().to(dtype), v.detach().to(dtype)
    options = dict(n_buckets=4, chunk_size=4, causal=True, dedup=dedup, causal_window=5)
    out, _ = lsh_attention(qk, v, rotations.to(dtype), **options)
    for t in (0, 9, 22, 38):
        later_qk, later_v = qk.clone(), v.clone()
        later_qk[:, :, t + 1:] = torch.randn(later_qk[:, :, t + 1:].shape, dtype=dtype, generator=seeded(t))
        later_v[:, :, t + 1:] += 3.0
        changed, _ = lsh_attention(later_qk, later_v, rotations.to(dtype), **options)
        assert torch.equal(changed[:, :, :t + 1], out[:, :, :t + 1]), t


def test_standard_causal_lsh_does_depend_on_later_tokens():
    """The control: with chunks of the sorted sequence, later tokens move earlier queries' windows."""
    qk, v, rotations, _ = make_inputs(40, 3, False)
    qk, v = qk.detach(), v.detach()
    options = dict(n_buckets=4, chunk_size=4, causal=True)
    out, _ = lsh_attention(qk, v, rotations, **options)
    later = qk.clone()
    later[:, :, 21:] = torch.randn(later[:, :, 21:].shape, dtype=F64, generator=seeded(3))
    changed, _ = lsh_attention(later, v, rotations, **options)
    assert not torch.equal(changed[:, :, :21], out[:, :, :21])


def test_dropout_is_seeded():
    qk, v, rotations, _ = make_inputs(16, 2, False)
    options = dict(n_buckets=4, chunk_size=4, causal=True, causal_window=4, dropout=0.5)
    a, _ = lsh_attention(qk, v, rotations, dropout_seed=1, **options)
    b, _ = lsh_attention(qk, v, rotations, dropout_seed=1, **options)
    c, _ = lsh_attention(qk, v, rotations, dropout_seed=2, **options)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_options_are_explained():
    qk, v, rotations, _ = make_inputs(8, 1, False)
    options = dict(n_buckets=4, chunk_size=4)
    with pytest.raises(ValueError, match="causal_window must be an integer >= 1"):
        lsh_attention(qk, v, rotations, causal=True, causal_window=0, **options)
    with pytest.raises(ValueError, match="set causal=True"):
        lsh_attention(qk, v, rotations, causal=False, causal_window=4, **options)
    with pytest.raises(ValueError, match="set wrap=False"):
        lsh_attention(qk, v, rotations, causal=True, wrap=True, causal_window=4, **options)
