"""`torch.compile` for a ReformerLM: its position-wise parts, compiled; its attention kernels, as they are.

What runs position by position, chunk by chunk, is pure tensor code with no
randomness in it: the feed-forward (LayerNorm, two linears, activation),
each attention branch's LayerNorm and projections, its output projection,
and the final norm, head and cross-entropy. `compile_model` swaps compiled
twins of those in (`FeedForward.compiled_chunk`, `AttentionBranch.
compiled_project` / `compiled_output`, `ReformerLM.compiled_loss`). Their
dropout masks are drawn outside, from the layer's seed (`rng.keep_mask`), and
passed in as tensors: no generator and no per-call seed reaches the compiler,
so nothing recompiles from one call to the next.

The rest runs eagerly, on purpose: the LSH hashing and sorting, the fused
chunk-attention kernel (a loop over blocks of chunks, each one call of
PyTorch's flash kernel, with hand-written backward) and the reversible stack
(an autograd Function that updates its state in place). Dynamo would unroll
their loops into graphs that grow with the sequence length.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .model import ReformerLM


def compile_model(model: ReformerLM, **options: Any) -> ReformerLM:
    """Compile the position-wise parts of `model` in place (options go to torch.compile); returns the model."""
    compiled = partial(torch.compile, **options)
    for layer in model.layers:
        layer.attention.compiled_project = compiled(layer.attention.pure_project)
        layer.attention.compiled_output = compiled(layer.attention.pure_output)
        layer.feed_forward.compiled_chunk = compiled(layer.feed_forward.pure_chunk)
    model.compiled_loss = compiled(model.pure_loss_sum)
    return model


def uncompile_model(model: ReformerLM) -> ReformerLM:
    """Back to the eager functions (e.g. before saving the whole module with torch.save)."""
    for layer in model.layers:
        layer.attention.compiled_project = layer.attention.compiled_output = None
        layer.feed_forward.compiled_chunk = None
    model.compiled_loss = None
    return model
