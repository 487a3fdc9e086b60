"""Position-wise feed-forward, chunked over positions (paper eq. 10).

`FeedForward.chunk(x, seed, index)` is the pure per-chunk function: it draws its
dropout masks from (seed, index), so any chunk can be recomputed on its own.
`FeedForward.forward` runs it chunk by chunk; when autograd is on, each chunk is
checkpointed, so the backward too holds one chunk of d_ff at a time.
The reversible backward (see `layers/reversible.py`) calls `chunk_backward`
where it serves (the ReLU, no compiled chunk, autocast off): the chunk's
recompute and gradients written out by hand, without autograd. Elsewhere it
differentiates `chunk` (or, with the chunk's output kept, `activated`) through
autograd, the reference the tests hold `chunk_backward` to in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..rng import STREAM_FF_HIDDEN, STREAM_FF_OUT, apply_keep, keep_mask, keep_rows
from .by_hand import add_linear_grads, layer_norm, layer_norm_backward, linear

ACTIVATIONS = {  # HF names: "gelu_new" is the tanh approximation
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering range(length); chunk_size 0 means one chunk."""
    step = chunk_size if chunk_size > 0 else max(length, 1)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d_ff) -> dropout -> activation -> Linear(d_model) -> dropout (HF / Trax order)."""

    def __init__(self, d_model: int, d_ff: int, *, chunk_size: int, dropout: float,
                 activation: str = "relu", layer_norm_eps: float = 1e-12):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.w_in = nn.Linear(d_model, d_ff)
        self.w_out = nn.Linear(d_ff, d_model)
        self.chunk_size = chunk_size
        self.dropout = dropout
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.compiled_chunk = None  # a torch.compile of pure_chunk (`reformer.compile.compile_model`), or None

    def chunk(self, x: torch.Tensor, seed: int | None, index: int) -> torch.Tensor:
        """The feed-forward of one chunk of positions. x (b, m, d_model) -> (b, m, d_model)."""
        return (self.compiled_chunk or self.pure_chunk)(x, *self.dropout_masks(x, seed, index))

    def dropout_masks(self, x: torch.Tensor, seed: int | None,
                      index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Chunk `index`'s dropout masks of the hidden (b, m, d_ff) and output (b, m, d_model) values, or None."""
        keep_hidden = keep_mask((*x.shape[:-1], self.w_in.out_features), x.device, self.dropout, seed,
                                STREAM_FF_HIDDEN, index)
        return keep_hidden, keep_mask(x.shape, x.device, self.dropout, seed, STREAM_FF_OUT, index)

    def pure_chunk(self, x: torch.Tensor, keep_hidden: torch.Tensor | None,
                   keep_out: torch.Tensor | None) -> torch.Tensor:
        """`chunk` given its dropout masks: no randomness, no Python scalars that change per call."""
        return apply_keep(self.w_out(self.activated(x, keep_hidden)), keep_out, self.dropout)

    def activated(self, x: torch.Tensor, keep_hidden: torch.Tensor | None) -> torch.Tensor:
        """The activation of the hidden values (b, m, d_ff): the chunk before its second product."""
        return self.activation(apply_keep(self.w_in(self.norm(x)), keep_hidden, self.dropout))

    def forward(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        bounds = chunk_bounds(x.shape[1], self.chunk_size)
        if len(bounds) == 1:
            return self.chunk(x, seed, 0)
        use_checkpoint = torch.is_grad_enabled() and x.requires_grad
        outputs = []
        for index, (start, end) in enumerate(bounds):
            part = x[:, start:end]
            if use_checkpoint:
                outputs.append(checkpoint(self.chunk, part, seed, index,
                                          use_reentrant=False, preserve_rng_state=False))
            else:
                outputs.append(self.chunk(part, seed, index))
        return torch.cat(outputs, dim=1)

    def has_chunk_backward(self, x: torch.Tensor) -> bool:
        """Whether `chunk_backward` serves chunks of x: the ReLU, not compiled, autocast off."""
        return (self.activation_name == "relu" and self.compiled_chunk is None
                and not torch.is_autocast_enabled(x.device.type))

    @torch.no_grad()
    def chunk_backward(self, x: torch.Tensor, grad: torch.Tensor, seed: int | None, index: int,
                       totals: dict[nn.Parameter, torch.Tensor],
                       need_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`chunk(x, seed, index)` (b, m, d_model) recomputed and differentiated by hand (ReLU only).

        Adds the parameters' gradients, given the output's gradient `grad` (b, m, d_model), into `totals`
        (parameter -> its running sum); returns the input's gradient (b, m, d_model) and, if `need_output`,
        the chunk's output (else None: its second product is skipped). The same products as autograd
        through `chunk`, written into the sums in place, with the activation and its gradient in place.
        """
        keep_hidden, keep_out = self.dropout_masks(x, seed, index)
        rows = x.flatten(0, 1)  # (b*m, d_model)
        normed, mean, rstd = layer_norm(self.norm, rows)
        activated = apply_keep(linear(normed, self.w_in), keep_rows(keep_hidden), self.dropout)  # (b*m, d_ff)
        activated.relu_()
        output = None
        if need_output:
            output = apply_keep(linear(activated, self.w_out), keep_rows(keep_out), self.dropout).view_as(x)
        d_out = apply_keep(grad.flatten(0, 1), keep_rows(keep_out), self.dropout)  # (b*m, d_model)
        add_linear_grads(totals, self.w_out, d_out, activated)
        d_hidden = torch.mm(d_out, self.w_out.weight)  # (b*m, d_ff)
        torch.ops.aten.threshold_backward.grad_input(d_hidden, activated, 0, grad_input=d_hidden)  # ReLU's
        del activated
        d_hidden = apply_keep(d_hidden, keep_rows(keep_hidden), self.dropout)
        add_linear_grads(totals, self.w_in, d_hidden, normed)
        d_normed = torch.mm(d_hidden, self.w_in.weight)  # (b*m, d_model)
        del d_hidden
        return layer_norm_backward(self.norm, totals, d_normed, rows, mean, rstd).view_as(x), output
