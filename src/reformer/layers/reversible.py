"""Reversible residual layers (RevNet; Reformer §3, eq. 9) and their plain twin.

A block maps (X1, X2) to
    Y1 = X1 + F(X2)      F = attention branch
    Y2 = X2 + G(Y1)      G = feed-forward
and is inverted by X2 = Y2 - G(Y1), X1 = Y1 - F(X2).

`run_reversible` keeps only the final (Y1, Y2): the backward walks the blocks in
reverse, reconstructs each block's inputs and recomputes F and G with the same
`LayerCall` (same seed, hence the same dropout masks; same LSH buckets), then
backpropagates through the recompute. The feed-forward recompute and its
backward run one position chunk at a time.

The parameters enter the autograd Function as inputs and their gradients leave
it as outputs, so autograd (and DDP's hooks) see each gradient exactly once; no
`.backward()` is called inside the backward.

`run_plain` is the same math with ordinary autograd: the test oracle, and the
`reversible=False` execution.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionBranch, LayerCall
from .feed_forward import FeedForward, chunk_bounds


class ReformerBlock(nn.Module):
    def __init__(self, attention: AttentionBranch, feed_forward: FeedForward):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward

    def forward(self, x1, x2, mask, call: LayerCall):
        y1 = x1 + self.attention(x2, mask, call)
        y2 = x2 + self.feed_forward(y1, call.seed)
        return y1, y2


def run_plain(blocks, x: torch.Tensor, mask, calls: list[LayerCall]) -> torch.Tensor:
    """Both halves start from x (b, n, d); returns [Y1, Y2] (b, n, 2d)."""
    x1 = x2 = x
    for block, call in zip(blocks, calls):
        x1, x2 = block(x1, x2, mask, call)
    return torch.cat([x1, x2], dim=-1)


def run_reversible(blocks, x: torch.Tensor, mask, calls: list[LayerCall]) -> torch.Tensor:
    """Same result as `run_plain`, storing no per-layer activations."""
    params = [p for block in blocks for p in block.parameters()]
    return _ReversibleStack.apply(x, (list(blocks), mask, calls), *params)


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stack, *params):
        blocks, mask, calls = stack
        with torch.no_grad():
            x1 = x2 = x
            for block, call in zip(blocks, calls):
                x1, x2 = block(x1, x2, mask, call)
        ctx.stack = stack
        out = torch.cat([x1, x2], dim=-1)
        del x1, x2
        ctx.save_for_backward(out)  # the output itself: no second copy of the last activations
        return out

    @staticmethod
    def backward(ctx, grad_out):
        blocks, mask, calls = ctx.stack
        (out,) = ctx.saved_tensors
        y1, y2 = out.chunk(2, dim=-1)
        dy1, dy2 = grad_out.chunk(2, dim=-1)
        param_grads: list[torch.Tensor | None] = []
        for block, call in zip(reversed(blocks), reversed(calls)):
            y1, y2, dy1, dy2, grads = _block_backward(block, call, mask, y1, y2, dy1, dy2)
            param_grads = grads + param_grads
        return (dy1 + dy2, None, *param_grads)


def _block_backward(block: ReformerBlock, call: LayerCall, mask, y1, y2, dy1, dy2):
    """Invert one block and backpropagate through it. Returns x1, x2, dx1, dx2 and its parameter grads."""
    ff = block.feed_forward
    ff_params = list(ff.parameters())
    ff_grads = [torch.zeros_like(p) for p in ff_params]
    x2 = y2.clone()  # becomes y2 - G(y1), chunk by chunk
    dy1 = dy1.clone()  # accumulates the feed-forward's gradient in place
    for index, (start, end) in enumerate(chunk_bounds(y1.shape[1], ff.chunk_size)):
        with torch.enable_grad():
            y1_part = y1[:, start:end].detach().requires_grad_()
            g_part = ff.chunk(y1_part, call.seed, index)
            grads = torch.autograd.grad(g_part, [y1_part, *ff_params], dy2[:, start:end], allow_unused=True)
        dy1[:, start:end] += grads[0]
        x2[:, start:end] -= g_part.detach()
        for total, grad in zip(ff_grads, grads[1:]):
            if grad is not None:
                total += grad
        del g_part, grads

    attn_params = list(block.attention.parameters())
    with torch.enable_grad():
        x2_leaf = x2.detach().requires_grad_()
        f = block.attention(x2_leaf, mask, call)
        grads = torch.autograd.grad(f, [x2_leaf, *attn_params], dy1, allow_unused=True)
    x1 = y1 - f.detach()
    del f
    dx2 = dy2 + grads[0]
    return x1, x2, dy1, dx2, list(grads[1:]) + ff_grads
