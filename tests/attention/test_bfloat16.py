"""bfloat16 rows through the attentions, against the float64 reference on the same (rounded) values.

The kernels keep log-sum-exps, masks and gradient sums in float32; what is
left is bfloat16's own rounding (2^-8 relative) of the products and the
outputs. The bound is 2^-6 of the largest reference entry (4 bfloat16 steps
there); log-sum-exps kept in bfloat16 break it (the LSH value gradient).
"""

from __future__ import annotations

import pytest
import torch

from reformer.attention import local_attention, lsh_attention, rotation_size
from reformer.attention.reference import local_attention_reference, lsh_attention_reference
from tests.conftest import seeded

BF16, F64 = torch.bfloat16, torch.float64
BOUND = 2.0 ** -6  # of the largest reference entry


def rounded_inputs(count, b, h, n, d, gen):
    return [torch.randn(b, h, n, d, generator=gen).to(BF16) for _ in range(count)]


def padding_mask(b, n):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - 5:] = False  # right padding
    mask[-1, 3] = False  # a hole
    return mask


def assert_within_bfloat16_rounding(fn, reference, inputs, gen):
    low = [x.clone().requires_grad_() for x in inputs]
    high = [x.to(F64).requires_grad_() for x in inputs]
    out, ref = fn(*low), reference(*high)
    assert out.dtype == BF16
    weights = torch.randn(ref.shape, dtype=F64, generator=gen)
    grads = torch.autograd.grad((out.to(F64) * weights).sum(), low)
    ref_grads = torch.autograd.grad((ref * weights).sum(), high)
    for name, value, expected in [("out", out, ref), *zip(("grad 0", "grad 1", "grad 2"), grads, ref_grads)]:
        assert value.dtype == BF16, name
        error = (value.to(F64) - expected).abs().max() / expected.abs().max()
        assert error <= BOUND, f"{name}: {error:.2e} of the largest entry > {BOUND:.2e}"


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(dedup=True)], ids=["fused", "sorted"])
def test_lsh_in_bfloat16_matches_float64_reference(n_hashes, causal, options):
    gen = seeded(n_hashes + 2 * causal)
    b, h, n, d, n_buckets, c = 2, 2, 133, 32, 8, 16
    qk, v = rounded_inputs(2, b, h, n, d, gen)
    rotations = torch.randn(h, d, n_hashes, rotation_size(n_buckets), generator=gen)
    kwargs = dict(n_buckets=n_buckets, chunk_size=c, causal=causal, attention_mask=padding_mask(b, n), **options)
    _, buckets = lsh_attention(qk, v, rotations, **kwargs)  # hashing in bfloat16 may break ties differently
    assert_within_bfloat16_rounding(lambda qk, v: lsh_attention(qk, v, None, buckets=buckets, **kwargs)[0],
                                    lambda qk, v: lsh_attention_reference(qk, v, None, buckets=buckets, **kwargs)[0],
                                    [qk, v], gen)


@pytest.mark.parametrize("causal, window", [(True, (1, 0)), (False, (1, 0)), (False, (1, 1))])
def test_local_in_bfloat16_matches_float64_reference(causal, window):
    gen = seeded(3 + causal)
    b, h, n, d, c = 2, 2, 133, 32, 16
    kwargs = dict(chunk_size=c, causal=causal, attention_mask=padding_mask(b, n), chunks_before=window[0],
                  chunks_after=window[1])
    assert_within_bfloat16_rounding(lambda q, k, v: local_attention(q, k, v, **kwargs),
                                    lambda q, k, v: local_attention_reference(q, k, v, **kwargs),
                                    rounded_inputs(3, b, h, n, d, gen), gen)
