"""Position embeddings: axial (Reformer §3, HF `AxialPositionEmbeddings`) and learned absolute.

Axial: with axial_shape (n1, n2, ...) and axial_dims (d1, d2, ...), position
p = i * n2 + j (row-major) gets the concatenation [E1[i] ; E2[j] ; ...]. The
weights keep HF's shapes, `weights.0` (n1, 1, d1) and `weights.1` (1, n2, d2),
and are gathered per position, so a short sequence never builds the full grid.
Any length up to prod(axial_shape) is accepted, in training and in eval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AxialPositionEmbedding(nn.Module):
    def __init__(self, axial_shape: tuple[int, ...], axial_dims: tuple[int, ...]):
        super().__init__()
        self.axial_shape = tuple(axial_shape)
        self.axial_dims = tuple(axial_dims)
        k = len(self.axial_shape)
        self.weights = nn.ParameterList()
        for axis, (size, dim) in enumerate(zip(self.axial_shape, self.axial_dims)):
            shape = [1] * k + [dim]
            shape[axis] = size
            self.weights.append(nn.Parameter(torch.empty(shape)))

    @property
    def max_length(self) -> int:
        return math.prod(self.axial_shape)

    def forward(self, length: int) -> torch.Tensor:
        """(length, sum(axial_dims)) embeddings of positions 0 .. length-1."""
        if length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds prod(axial_shape) = {self.max_length}; "
                f"use a longer axial_shape in the config, or shorter sequences"
            )
        return self.at(torch.arange(length, device=self.weights[0].device))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of the given positions (n,) -> (n, sum(axial_dims))."""
        parts = []
        stride = self.max_length
        for size, dim, weight in zip(self.axial_shape, self.axial_dims, self.weights):
            stride //= size
            coordinate = (positions // stride) % size  # (length,)
            # an embedding lookup, not weight[coordinate]: the backward of advanced indexing accumulates
            # with index_put_, whose order (and so the float sum) varies between runs on several threads
            parts.append(F.embedding(coordinate, weight.reshape(size, dim)))  # (length, dim)
        return torch.cat(parts, dim=-1)


class AbsolutePositionEmbedding(nn.Module):
    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def forward(self, length: int) -> torch.Tensor:
        if length > self.embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_seq_len = {self.embedding.num_embeddings}")
        return self.embedding.weight[:length]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(positions)
