"""window_block_backward against autograd through an explicit softmax over each chunk's window."""

from __future__ import annotations

import pytest
import torch

from reformer.attention.window_kernel import window_block_backward
from tests.conftest import assert_close, seeded

MASKED, SELF = -1e9, -1e5


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


@pytest.mark.parametrize("g, c, parts, d", [(1, 1, 1, 1), (3, 5, 2, 4), (4, 3, 3, 2), (2, 7, 1, 3)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_gradients_match_autograd_in_float64(g, c, parts, d, scale):
    q, k, v, mask = make_block(g, c, parts, d, torch.float64, seed=g * 100 + c)
    out, lse = explicit_block(q, k, v, mask, scale)
    grad = output_gradient(out.shape, torch.float64, 7)
    expected = torch.autograd.grad(out, [q, k, v], grad)
    got = window_block_backward(grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, scale)
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert_close(a, b, 1e-10, name)


def test_float32_matches_float64_and_masked_weights_are_exactly_zero():
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
