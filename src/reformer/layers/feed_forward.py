"""Position-wise feed-forward, chunked over positions (paper eq. 10).

`FeedForward.chunk(x, seed, index)` is the pure per-chunk function: it draws its
dropout masks from (seed, index), so any chunk can be recomputed on its own.
`FeedForward.forward` runs it chunk by chunk; when autograd is on, each chunk is
checkpointed, so the backward too holds one chunk of d_ff at a time.
The reversible backward calls `chunk` directly (see `layers/reversible.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..rng import STREAM_FF_HIDDEN, STREAM_FF_OUT, apply_keep, keep_mask
from .chunks import chunk_bounds

ACTIVATIONS = {  # HF names: "gelu_new" is the tanh approximation
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


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
