"""The feed-forward is chunked over positions, in the forward and in the backward pass."""

from __future__ import annotations

import pytest
import torch

from reformer.layers.chunks import chunk_bounds
from reformer.layers.feed_forward import FeedForward
from tests.conftest import assert_close, seeded


def make_ff(chunk_size, dropout=0.0):
    torch_gen = seeded(0)
    ff = FeedForward(6, 10, chunk_size=chunk_size, dropout=dropout).double()
    with torch.no_grad():
        for p in ff.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen, dtype=torch.float64))
    return ff


@pytest.mark.parametrize("chunk_size", [1, 7, 23, 0])
def test_chunk_sizes_give_equal_outputs_and_gradients(chunk_size):
    x = torch.randn(2, 23, 6, dtype=torch.float64, generator=seeded(1), requires_grad=True)
    reference = make_ff(0)
    expected = reference(x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), [x, *reference.parameters()])
    ff = make_ff(chunk_size)
    out = ff(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *ff.parameters()])
    assert_close(out, expected, 1e-12, "out")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, 1e-10, f"grad {i}")  # parameter grads sum 46 positions of order 1e3


def test_hidden_activations_are_one_chunk_at_a_time_forward_and_backward():
    ff = make_ff(4)
    widths = []
    ff.w_in.register_forward_hook(lambda m, i, out: widths.append(out.shape[1]))
    x = torch.randn(2, 23, 6, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = ff(x)
    out.sum().backward()
    assert max(widths) == 4 and len(widths) == 2 * 6  # 6 chunks, run in forward and again in backward
    assert all(shape[-1] != 10 for shape in saved), "a d_ff-wide activation was stored"


def test_chunk_bounds_cover_everything():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, 0) == [(0, 10)]
    assert chunk_bounds(3, 8) == [(0, 3)]


