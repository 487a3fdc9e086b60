"""Axial position embeddings against the explicit broadcast formula (HF)."""

from __future__ import annotations

import pytest
import torch

from reformer.layers.positional import AxialPositionEmbedding


def filled(shape, dims):
    emb = AxialPositionEmbedding(shape, dims)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in emb.weights:
            w.copy_(torch.randn(w.shape, generator=gen))
    return emb


def broadcast_formula(emb):
    """HF: broadcast every weight to the full grid, concatenate features, flatten the grid."""
    grid = emb.axial_shape
    parts = [w.expand(*grid, w.shape[-1]) for w in emb.weights]
    return torch.cat(parts, dim=-1).reshape(-1, sum(emb.axial_dims))


@pytest.mark.parametrize("shape, dims", [((4, 6), (3, 5)), ((2, 3, 4), (2, 2, 4))])
def test_equals_broadcast_formula(shape, dims):
    emb = filled(shape, dims)
    full = broadcast_formula(emb)
    assert torch.equal(emb(full.shape[0]), full)
    assert torch.equal(emb(7), full[:7])


def test_position_is_row_major():
    emb = filled((4, 6), (3, 5))
    p = 2 * 6 + 5
    expected = torch.cat([emb.weights[0][2, 0], emb.weights[1][0, 5]])
    assert torch.equal(emb(24)[p], expected)


def test_hf_weight_shapes():
    emb = AxialPositionEmbedding((4, 6), (3, 5))
    assert [tuple(w.shape) for w in emb.weights] == [(4, 1, 3), (1, 6, 5)]


def test_too_long_is_explained():
    with pytest.raises(ValueError, match="axial_shape"):
        filled((4, 6), (3, 5))(25)


def test_axial_gradients_are_the_same_bit_for_bit_on_several_threads():
    """Each axis row is gathered for many positions; its gradient must add them up in a fixed order.

    Indexing (weight[coordinate]) accumulated with index_put_, whose order varied between
    runs on two threads: the same seed then trained differently.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        embedding = AxialPositionEmbedding((64, 64), (16, 48))
        for weight in embedding.weights:
            torch.nn.init.normal_(weight, generator=torch.Generator().manual_seed(0))
        upstream = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(8):
            embedding.zero_grad()
            (embedding(4096) * upstream).sum().backward()
            grads.append([w.grad.clone() for w in embedding.weights])
        assert all(torch.equal(a, b) for other in grads[1:] for a, b in zip(grads[0], other))
    finally:
        torch.set_num_threads(threads)
