"""Position-wise layers on rows, differentiated by hand (no autograd): the pieces the reversible backward's
chunk backward is made of (`FeedForward.chunk_backward`, `AttentionBranch.output_chunk_backward`,
`reversible._projection_backward_by_hand`).

Each runs the products autograd would run for the same layer on the same rows, and adds parameter gradients
into `totals` (parameter -> its running sum) in place. Rows are (r, features): callers flatten (b, m, ...) chunks.
"""

from __future__ import annotations

import torch
from torch import nn


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for rows x (r, in) -> (r, out), as one product."""
    if layer.bias is None:
        return torch.mm(x, layer.weight.t())
    return torch.addmm(layer.bias, x, layer.weight.t())


def add_linear_grads(totals: dict, layer: nn.Linear, d_out: torch.Tensor, inputs: torch.Tensor) -> None:
    """Add a linear layer's parameter gradients, given its output's gradient d_out (r, out) and its inputs
    (r, in), into totals."""
    totals[layer.weight].addmm_(d_out.t(), inputs)
    if layer.bias is not None:
        totals[layer.bias] += d_out.sum(0)


def layer_norm(norm: nn.LayerNorm, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """norm(rows) (r, d), with the mean and reciprocal deviation its backward needs."""
    return torch.native_layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def layer_norm_backward(norm: nn.LayerNorm, totals: dict, d_normed: torch.Tensor, rows: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The gradient of the rows (r, d) through norm, given that of its output; its parameters' into totals."""
    d_rows, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
        d_normed, rows, norm.normalized_shape, mean, rstd, norm.weight, norm.bias,
        [True, norm.weight is not None, norm.bias is not None])
    for parameter, d in ((norm.weight, d_weight), (norm.bias, d_bias)):
        if parameter is not None:
            totals[parameter] += d
    return d_rows
