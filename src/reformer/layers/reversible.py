"""Reversible residual layers (RevNet; Reformer §3, eq. 9) and their plain twin.

A block maps (X1, X2) to
    Y1 = X1 + F(X2)      F = attention branch
    Y2 = X2 + G(Y1)      G = feed-forward
and is inverted by X2 = Y2 - G(Y1), X1 = Y1 - F(X2).

`run_reversible` keeps one state (X1, X2), a (2, b, n, d) tensor (contiguous
halves run the position-wise layers faster than the halves of a (b, n, 2d)
one), and updates it in place: the forward adds F and G into it layer by
layer; the backward walks the blocks in reverse, subtracts them again to
rebuild each block's inputs, and turns a gradient state (dY1, dY2) of the same
size into (dX1, dX2), in place too. A step holds these two tensors whatever
the depth, plus one layer's work:
- the feed-forward is recomputed and differentiated one chunk of positions at
  a time;
- the attention branch keeps its projections and the attention output for the
  whole sequence; its LayerNorm, projections and output projection are
  recomputed and differentiated chunk by chunk (`AttentionBranch.chunk_size`).
The recompute uses the same `LayerCall` (same seed, hence the same dropout
masks; same LSH buckets).

A `tail` (the model's final norm, head and loss, chunk by chunk) may close the
stack. The stack then returns the tail's sum and never hands out its state, so
the backward rebuilds the inputs in it without a copy, and the gradient state
starts from the tail's chunked gradients. Without a tail the stack returns
[Y1 ; Y2] (b, n, 2d), a copy, and its backward starts from copies of that and
of the incoming gradient.

The parameters enter the autograd Function as inputs and their gradients leave
it as outputs, so autograd (and DDP's hooks) see each gradient exactly once; no
`.backward()` is called inside the backward.

`run_plain` is the same math with ordinary autograd: the test oracle, and the
`reversible=False` execution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
from torch import nn

from ..rng import apply_keep
from .attention import AttentionBranch, LayerCall
from .chunks import chunk_bounds
from .feed_forward import FeedForward


class Tail(Protocol):
    """What closes a reversible stack: a scalar sum over chunks of positions of its state."""

    def parameters(self) -> Iterable[nn.Parameter]: ...

    def bounds(self) -> list[tuple[int, int]]: ...  # the (start, end) position chunks it reads

    def chunk(self, state: torch.Tensor, index: int) -> torch.Tensor: ...  # (b, m, 2d) -> scalar


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


def run_reversible(blocks, x: torch.Tensor, mask, calls: list[LayerCall], tail: Tail | None = None) -> torch.Tensor:
    """Same result as `run_plain` (or, with a tail, the tail's sum over it), storing no per-layer activations."""
    blocks = list(blocks)
    params = [p for block in blocks for p in block.parameters()]
    tail_params = [] if tail is None else list(tail.parameters())
    return _ReversibleStack.apply(x, (blocks, mask, calls, tail), *params, *tail_params)


def halves(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X1, X2) (2, b, n, d) -> X1, X2 (b, n, d), contiguous views."""
    return state[0], state[1]


def joined(state: torch.Tensor) -> torch.Tensor:
    """(X1, X2) (2, b, m, d) -> [X1 ; X2] (b, m, 2d), a copy."""
    return torch.cat([state[0], state[1]], dim=-1)


def split_(state: torch.Tensor, joined_value: torch.Tensor) -> torch.Tensor:
    """Write [X1 ; X2] (b, m, 2d) into state (2, b, m, d); returns state."""
    d = state.shape[-1]
    state[0].copy_(joined_value[..., :d])
    state[1].copy_(joined_value[..., d:])
    return state


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stack, *params):
        blocks, mask, calls, tail = stack
        with torch.no_grad():
            state = torch.stack([x, x])  # (2, b, n, d): (X1, X2), updated in place from here on
            for block, call in zip(blocks, calls):
                _block_forward(block, call, mask, state)
            ctx.stack = stack
            ctx.autocast = AutocastState.current(x.device.type)
            if tail is None:
                out = joined(state)  # (b, n, 2d)
                ctx.save_for_backward(out)  # the output itself
                return out
            ctx.state = state  # ours alone
            return _tail_forward(tail, state)

    @staticmethod
    def backward(ctx, grad):
        with ctx.autocast.restored():  # the recompute must round as the forward did, or the inverse is off
            return _ReversibleStack._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        blocks, mask, calls, tail = ctx.stack
        if tail is None:
            (out,) = ctx.saved_tensors
            state = split_(out.new_empty(2, *out.shape[:-1], out.shape[-1] // 2), out)
            grad_state = split_(torch.empty_like(state), grad)
            tail_grads = []
        else:
            if ctx.state is None:
                raise RuntimeError("the reversible stack's backward already ran: it rebuilds its inputs in place "
                                   "and cannot run twice (retain_graph); use reversible=False for that")
            state, ctx.state = ctx.state, None
            grad_state = torch.zeros_like(state)
            tail_grads = _tail_backward(tail, state, grad_state, grad)
        param_grads: list[torch.Tensor | None] = []
        for block, call in zip(reversed(blocks), reversed(calls)):
            param_grads = _block_backward(block, call, mask, state, grad_state) + param_grads
        del state
        d_x1, d_x2 = halves(grad_state)
        return (d_x1 + d_x2, None, *param_grads, *tail_grads)


@dataclass(frozen=True)
class AutocastState:
    """Whether autocast was on for a device type, and its dtype: the backward reruns the forward under it."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device_type: str) -> "AutocastState":
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def restored(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


# --- one block, in place ----------------------------------------------------------------------------

def _block_forward(block: ReformerBlock, call: LayerCall, mask, state: torch.Tensor) -> None:
    """(X1, X2) -> (Y1, Y2) in place (no autograd)."""
    x1, x2 = halves(state)
    branch, ff = block.attention, block.feed_forward
    attended = branch.attention.attend(branch.project_chunks(x2, call.global_tokens), mask, call)  # (b, n, h*d)
    for index, (start, end) in enumerate(chunk_bounds(x1.shape[1], branch.chunk_size)):
        x1[:, start:end] += branch.output_chunk(attended[:, start:end], call.seed, index)
    del attended
    kept = _reserve_output(ff, call, x2)  # G(Y1) for the backward, when the keep budget has room for it
    for index, (start, end) in enumerate(chunk_bounds(x1.shape[1], ff.chunk_size)):
        g = ff.chunk(x1[:, start:end], call.seed, index)
        x2[:, start:end] += g
        if kept is not None:
            kept[:, start:end] = g


def _reserve_output(ff: FeedForward, call: LayerCall, like: torch.Tensor) -> torch.Tensor | None:
    """Room to keep the feed-forward's output for the backward (`reversible_keep_attention`), or None: not
    asked, no room, or a compiled chunk (which the backward differentiates whole)."""
    if call.kept_output is None or ff.compiled_chunk is not None:
        return None
    return call.kept_output.reserve(like)


def _block_backward(block: ReformerBlock, call: LayerCall, mask, state: torch.Tensor,
                    grad_state: torch.Tensor) -> list[torch.Tensor | None]:
    """(Y1, Y2) -> (X1, X2) and (dY1, dY2) -> (dX1, dX2), both in place; the block's parameter grads."""
    y1, y2 = halves(state)
    dy1, dy2 = halves(grad_state)
    kept = None if call.kept_output is None else call.kept_output.take()  # G(Y1) from the forward, or None
    grads = _feed_forward_backward(block.feed_forward, call.seed, y1, y2, dy1, dy2, kept)  # y2 -> X2; dY1 total
    grads.update(_attention_backward(block.attention, call, mask, y1, y2, dy1, dy2))  # y1 -> X1; dy2 -> dX2
    return [grads.get(p) for p in block.parameters()]


def _feed_forward_backward(ff: FeedForward, seed, y1, y2, dy1, dy2, kept: torch.Tensor | None = None) -> dict:
    """X2 = Y2 - G(Y1) into y2 and dY1 += G'(Y1)^T dY2 into dy1, one chunk of positions at a time. With G(Y1)
    kept from the forward, the chunks run only up to the activation (`_kept_output_chunk_backward`)."""
    params = list(ff.parameters())
    totals = [torch.zeros_like(p) for p in params]
    for index, (start, end) in enumerate(chunk_bounds(y1.shape[1], ff.chunk_size)):
        if kept is not None:
            d_input, param_grads = _kept_output_chunk_backward(ff, seed, index, y1[:, start:end], dy2[:, start:end])
            dy1[:, start:end] += d_input
            y2[:, start:end] -= kept[:, start:end]
            _accumulate(totals, [param_grads.get(p) for p in params])
            continue
        with torch.enable_grad():
            part = y1[:, start:end].detach().requires_grad_()
            g = ff.chunk(part, seed, index)
            grads = torch.autograd.grad(g, [part, *params], dy2[:, start:end], allow_unused=True)
        dy1[:, start:end] += grads[0]
        y2[:, start:end] -= g.detach()
        _accumulate(totals, grads[1:])
        del g, grads
    return dict(zip(params, totals))


def _kept_output_chunk_backward(ff: FeedForward, seed, index: int, y1, dy2) -> tuple[torch.Tensor, dict]:
    """The gradients of one feed-forward chunk, G(y1) = drop(W2 a + b2) with a its activation, without its
    second product W2 a (its output was kept): the input's gradient and the parameters'."""
    keep_hidden, keep_out = ff.dropout_masks(y1, seed, index)
    with torch.enable_grad():
        part = y1.detach().requires_grad_()
        activated = ff.activated(part, keep_hidden)  # (b, m, d_ff)
    grad_out = apply_keep(dy2, keep_out, ff.dropout).flatten(0, 1)  # (b*m, d_model): the gradient of W2 a + b2
    inputs = activated.detach().flatten(0, 1)  # (b*m, d_ff)
    grads = {ff.w_out.weight: torch.mm(grad_out.t(), inputs)}
    if ff.w_out.bias is not None:
        grads[ff.w_out.bias] = grad_out.sum(0)
    d_activated = torch.mm(grad_out, ff.w_out.weight).view_as(activated)
    first = [part, *ff.norm.parameters(), *ff.w_in.parameters()]
    d_first = torch.autograd.grad(activated, first, d_activated, allow_unused=True)
    grads.update(zip(first[1:], d_first[1:]))
    return d_first[0], grads


def _attention_backward(branch: AttentionBranch, call: LayerCall, mask, y1, x2, dy1, dx2) -> dict:
    """X1 = Y1 - F(X2) into y1 and dX2 += F'(X2)^T dY1 into dx2 (dx2 holds dY2 on entry).

    Only the projections, the attention output and their gradients exist for
    the whole sequence; the position-wise parts run chunk by chunk.
    """
    bounds = chunk_bounds(x2.shape[1], branch.chunk_size)
    with torch.no_grad():
        # the projection backward pairs these with the first of projection_layers(): the others get zero gradients
        leaves = [p.requires_grad_() for p in branch.project_chunks(x2, call.global_tokens)]  # (b, n, h*d) each
    with torch.enable_grad():
        attended = branch.attention.attend(tuple(leaves), mask, call)  # (b, n, h*d)

    out_params = list(branch.out.parameters())
    out_totals = [torch.zeros_like(p) for p in out_params]
    d_attended = torch.empty_like(attended)
    for index, (start, end) in enumerate(bounds):
        with torch.enable_grad():
            part = attended[:, start:end].detach().requires_grad_()
            f = branch.output_chunk(part, call.seed, index)
            grads = torch.autograd.grad(f, [part, *out_params], dy1[:, start:end], allow_unused=True)
        y1[:, start:end] -= f.detach()
        d_attended[:, start:end] = grads[0]
        _accumulate(out_totals, grads[1:])
        del f, grads
    d_projections = torch.autograd.grad(attended, leaves, d_attended, allow_unused=True)
    d_projections = [torch.zeros_like(p) if d is None else d for p, d in zip(leaves, d_projections)]
    del attended, d_attended, leaves
    call.replay = None  # the kept attention (`reversible_keep_attention`) has served; free it now

    return {**dict(zip(out_params, out_totals)), **_projection_backward(branch, x2, dx2, d_projections, bounds)}


def _projection_backward(branch: AttentionBranch, x2, dx2, d_projections, bounds) -> dict:
    """dX2 += the projections' and LayerNorm's gradient, chunk by chunk; their parameter grads.

    The projections are linear: their gradients need the LayerNorm's output
    (recomputed per chunk), not the projections themselves.
    """
    layers = branch.attention.projection_layers()
    norm_params = list(branch.norm.parameters())
    totals = {p: torch.zeros_like(p) for p in [*norm_params, *(q for layer in layers for q in layer.parameters())]}
    for start, end in bounds:
        with torch.enable_grad():
            part = x2[:, start:end].detach().requires_grad_()
            normed = branch.norm(part)  # (b, m, d_model)
        h = normed.detach().flatten(0, 1)  # (b*m, d_model)
        d_normed = torch.zeros_like(h)
        for layer, d in zip(layers, d_projections):
            d = d[:, start:end].flatten(0, 1)  # (b*m, h*d)
            totals[layer.weight] += torch.mm(d.t(), h)  # out of place: under autocast, in its dtype
            if layer.bias is not None:
                totals[layer.bias] += d.sum(0)
            d_normed += torch.mm(d, layer.weight)
        grads = torch.autograd.grad(normed, [part, *norm_params], d_normed.view_as(normed), allow_unused=True)
        dx2[:, start:end] += grads[0]
        _accumulate([totals[p] for p in norm_params], grads[1:])
        del normed, grads
    return totals


def _accumulate(totals: list[torch.Tensor], grads) -> None:
    for total, grad in zip(totals, grads):
        if grad is not None:
            total += grad


# --- the tail ---------------------------------------------------------------------------------------

def _tail_forward(tail: Tail, state: torch.Tensor) -> torch.Tensor:
    total = state.new_zeros((), dtype=torch.promote_types(state.dtype, torch.float32))
    for index, (start, end) in enumerate(tail.bounds()):
        total = total + tail.chunk(joined(state[:, :, start:end]), index)
    return total


def _tail_backward(tail: Tail, state: torch.Tensor, grad_state: torch.Tensor, grad: torch.Tensor) -> list:
    """Add the tail's gradient with respect to the state into grad_state; return its parameter grads."""
    params = list(tail.parameters())
    totals = [torch.zeros_like(p) for p in params]
    d = state.shape[-1]
    for index, (start, end) in enumerate(tail.bounds()):
        with torch.enable_grad():
            part = joined(state[:, :, start:end]).requires_grad_()  # (b, m, 2d)
            value = tail.chunk(part, index)
            grads = torch.autograd.grad(value, [part, *params], grad, allow_unused=True)
        if grads[0] is not None:
            grad_state[0, :, start:end] += grads[0][..., :d]
            grad_state[1, :, start:end] += grads[0][..., d:]
        _accumulate(totals, grads[1:])
    return totals
