"""Thin attention modules around the pure cores in `reformer.attention`.

Each module owns its projections only. Randomness comes in through `LayerCall`:
a training call carries a seed (dropout masks and LSH rotations derive from
it) and, after the first run, the LSH buckets, so a recompute replays exactly.

Legend: b batch, n length, h heads, d head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import full_attention, local_attention, lsh_attention, sliding_window_attention
from ..attention.full import shared_qk_attention
from ..attention.fused_chunks import KernelReplay
from ..keep import KeptOutput
from ..attention.lsh import n_buckets_for_length, n_buckets_hf_rule, random_rotations, rotation_size
from .chunks import chunk_bounds
from ..rng import (STREAM_ATTN_OUT, STREAM_ATTN_PROBS, STREAM_ROTATIONS, apply_keep, derive_seed, generator_for,
                   keep_mask)


@dataclass
class LayerCall:
    """What one layer call carries besides its input: its randomness, and the global tokens.

    seed None = eval: no dropout, fixed LSH rotations.
    """

    seed: int | None = None
    buckets: torch.Tensor | None = None  # (b, h, r, n), filled by the first LSH run, reused after
    global_mask: torch.Tensor | None = None  # (b, n) bool: Longformer's global tokens; other layers ignore it
    replay: KernelReplay | None = None  # the fused kernel's plan and output, kept for the recompute (or None)
    kept_output: KeptOutput | None = None  # the feed-forward's output, kept for the reversible backward (or None)

    @property
    def global_tokens(self) -> bool:
        return self.global_mask is not None


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)  # (b, h, n, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (b, n, h*d)


class ProjectedAttention(nn.Module):
    """A self-attention in two parts: position-wise projections, then the attention over all positions.

    Subclasses name their projections (`projection_layers`) and implement
    `attend`; the attention branch calls the two parts separately, so that it
    can run the projections chunk by chunk.
    """

    def projection_layers(self) -> tuple[nn.Linear, ...]:
        raise NotImplementedError

    def project(self, x: torch.Tensor, global_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """The position-wise part: x (b, m, d_model) -> (b, m, h*d) per projection.

        global_tokens: the call has global tokens (`LayerCall.global_tokens`); a layer may then need more.
        """
        return tuple(layer(x) for layer in self.projection_layers())

    def attend(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
               call: LayerCall) -> torch.Tensor:
        """The attention over all positions: projections (b, n, h*d) each -> (b, n, h*d)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, call: LayerCall) -> torch.Tensor:
        return self.attend(self.project(x, call.global_tokens), mask, call)


def qkv_projections(d_model: int, inner: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return tuple(nn.Linear(d_model, inner, bias=False) for _ in range(3))


class LSHSelfAttention(ProjectedAttention):
    """Shared-QK LSH attention. Rotations: fresh per training call, fixed per layer in eval.

    A sequence that fits in one chunk gets full shared-QK attention (HF's rule):
    every round would see every key anyway, so no hashing is needed.

    With `hash_seed` (HF's option) the rotations are drawn again on every call,
    in training and in eval, from a generator seeded with it, in the dtype of
    the query-keys: HF's `torch.manual_seed(hash_seed); torch.randn(...)`
    without touching the global RNG.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, chunk_size: int, n_hashes: int,
                 n_buckets, causal: bool, dedup: bool, same_bucket_only: bool, wrap: bool,
                 attn_dropout: float, eval_seed: int, bucket_rule: str = "trax", max_positions: int = 0,
                 hash_seed: int | None = None, normalize: str = "softmax", window: tuple[int, int] = (1, 0),
                 causal_window: int | None = None):
        super().__init__()
        self.qk = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.n_heads, self.d_head = n_heads, d_head
        self.chunk_size, self.n_hashes, self.n_buckets = chunk_size, n_hashes, n_buckets
        self.causal, self.dedup, self.same_bucket_only, self.wrap = causal, dedup, same_bucket_only, wrap
        self.attn_dropout = attn_dropout
        self.eval_seed = eval_seed
        self.bucket_rule, self.max_positions, self.hash_seed = bucket_rule, max_positions, hash_seed
        self.normalize, self.window = normalize, window
        self.causal_window = causal_window  # prefix-consistent causal LSH (`lsh_causal_window`), or None
        self.use_full_attention = False  # evaluate with full shared-QK attention (paper Table 2, "Full")
        self._eval_rotations: dict = {}

    def resolve_n_buckets(self, length: int, mask: torch.Tensor | None):
        """The configured count; else the Trax rule on the longest real length, or HF's on the padded length.

        Prefix-consistent layers count from `max_positions` instead: a token's buckets must not depend on
        how long the sequence is, or a prefix and its continuation would hash differently.
        """
        if self.n_buckets is not None:
            return self.n_buckets
        if self.causal_window is not None and self.max_positions:
            length, mask = self.max_positions, None
        if self.bucket_rule == "hf":
            return n_buckets_hf_rule(length, self.chunk_size, self.max_positions)
        real_length = length if mask is None else int(mask.sum(dim=1).max().item())
        return n_buckets_for_length(max(real_length, 1), self.chunk_size)

    def rotations(self, n_buckets, seed: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(h, d, r, rot) on the CPU: from the call seed in training, cached per layer in eval (float32).

        With `hash_seed`, the same rotations on every call, drawn in `dtype` as HF draws them.
        """
        if self.hash_seed is not None:
            key = ("hash_seed", self.n_hashes, n_buckets, dtype)
            if key not in self._eval_rotations:
                gen = torch.Generator().manual_seed(self.hash_seed)
                shape = (self.n_heads, self.d_head, self.n_hashes, rotation_size(n_buckets))
                self._eval_rotations[key] = torch.randn(shape, generator=gen, dtype=dtype)
            return self._eval_rotations[key]
        if seed is not None:
            gen = generator_for(derive_seed(seed, STREAM_ROTATIONS))
            return random_rotations(self.n_heads, self.d_head, self.n_hashes, n_buckets, gen)
        key = (self.n_hashes, n_buckets)
        if key not in self._eval_rotations:
            gen = generator_for(derive_seed(self.eval_seed, STREAM_ROTATIONS, self.n_hashes))
            self._eval_rotations[key] = random_rotations(self.n_heads, self.d_head, self.n_hashes, n_buckets, gen)
        return self._eval_rotations[key]

    def projection_layers(self) -> tuple[nn.Linear, ...]:
        return self.qk, self.v  # shared query-keys and values

    def attend(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
               call: LayerCall) -> torch.Tensor:
        qk, v = (split_heads(p, self.n_heads) for p in projections)  # (b, h, n, d)
        dropout_seed = None if call.seed is None else derive_seed(call.seed, STREAM_ATTN_PROBS)
        short = qk.shape[2] <= self.chunk_size and self.causal_window is None  # prefix-consistent: always hash
        if self.use_full_attention or short:
            return merge_heads(shared_qk_attention(qk, v, causal=self.causal, attention_mask=mask,
                                                   dropout=self.attn_dropout, dropout_seed=dropout_seed))
        n_buckets = self.resolve_n_buckets(qk.shape[2], mask)
        rotations = None if call.buckets is not None else self.rotations(n_buckets, call.seed, qk.dtype).to(qk.device)
        out, buckets = lsh_attention(
            qk, v, rotations, n_buckets=n_buckets, chunk_size=self.chunk_size, causal=self.causal,
            attention_mask=mask, dedup=self.dedup, same_bucket_only=self.same_bucket_only, wrap=self.wrap,
            buckets=call.buckets, dropout=self.attn_dropout, dropout_seed=dropout_seed, normalize=self.normalize,
            chunks_before=self.window[0], chunks_after=self.window[1], causal_window=self.causal_window,
            replay=call.replay,
        )
        call.buckets = buckets
        return merge_heads(out)


class LocalSelfAttention(ProjectedAttention):
    """Chunked local attention with separate q, k, v projections (HF `LocalSelfAttention`)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, chunk_size: int, causal: bool,
                 attn_dropout: float, wrap: bool = False, window: tuple[int, int] = (1, 0)):
        super().__init__()
        self.q, self.k, self.v = qkv_projections(d_model, n_heads * d_head)
        self.n_heads, self.chunk_size, self.causal, self.attn_dropout = n_heads, chunk_size, causal, attn_dropout
        self.wrap, self.window = wrap, window

    def projection_layers(self) -> tuple[nn.Linear, ...]:
        return self.q, self.k, self.v

    def attend(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
               call: LayerCall) -> torch.Tensor:
        q, k, v = (split_heads(p, self.n_heads) for p in projections)  # (b, h, n, d)
        out = local_attention(
            q, k, v, chunk_size=self.chunk_size, causal=self.causal, attention_mask=mask, wrap=self.wrap,
            chunks_before=self.window[0], chunks_after=self.window[1], dropout=self.attn_dropout,
            dropout_seed=None if call.seed is None else derive_seed(call.seed, STREAM_ATTN_PROBS), replay=call.replay,
        )
        return merge_heads(out)


class FullSelfAttention(ProjectedAttention):
    """Dense attention with separate q, k, v projections: the Transformer baseline."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, causal: bool, attn_dropout: float):
        super().__init__()
        self.q, self.k, self.v = qkv_projections(d_model, n_heads * d_head)
        self.n_heads, self.causal, self.attn_dropout = n_heads, causal, attn_dropout

    def projection_layers(self) -> tuple[nn.Linear, ...]:
        return self.q, self.k, self.v

    def attend(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
               call: LayerCall) -> torch.Tensor:
        q, k, v = (split_heads(p, self.n_heads) for p in projections)  # (b, h, n, d)
        out = full_attention(
            q, k, v, causal=self.causal, attention_mask=mask, dropout=self.attn_dropout,
            dropout_seed=None if call.seed is None else derive_seed(call.seed, STREAM_ATTN_PROBS),
        )
        return merge_heads(out)


class SlidingSelfAttention(ProjectedAttention):
    """Longformer attention: a sliding window, dilated per head, with global tokens (`sliding_window_attention`).

    With `global_projections` the layer owns Longformer's Q_g, K_g, V_g, initialised as copies of q, k, v
    (`copy_global_projections`); they are computed only for calls with global tokens, and otherwise get
    zero gradients. `global_rule`: what the other queries take at a global key (`sliding_window_attention`).
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, window: int, dilation, causal: bool,
                 attn_dropout: float, global_projections: bool = True, global_rule: str = "longformer"):
        super().__init__()
        self.q, self.k, self.v = qkv_projections(d_model, n_heads * d_head)
        self.global_q = self.global_k = self.global_v = None
        if global_projections:
            self.global_q, self.global_k, self.global_v = qkv_projections(d_model, n_heads * d_head)
        self.n_heads, self.window, self.dilation = n_heads, window, dilation
        self.causal, self.attn_dropout, self.global_rule = causal, attn_dropout, global_rule

    def projection_layers(self) -> tuple[nn.Linear, ...]:
        local = (self.q, self.k, self.v)
        return local if self.global_q is None else (*local, self.global_q, self.global_k, self.global_v)

    def project(self, x: torch.Tensor, global_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        layers = self.projection_layers() if global_tokens else self.projection_layers()[:3]
        return tuple(layer(x) for layer in layers)

    @torch.no_grad()
    def copy_global_projections(self) -> None:
        """Longformer's init: the global projections start equal to the local ones."""
        if self.global_q is not None:
            for local, glob in zip((self.q, self.k, self.v), (self.global_q, self.global_k, self.global_v)):
                glob.weight.copy_(local.weight)

    def attend(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
               call: LayerCall) -> torch.Tensor:
        q, k, v, *global_qkv = (split_heads(p, self.n_heads) for p in projections)  # (b, h, n, d)
        out = sliding_window_attention(
            q, k, v, window=self.window, dilation=self.dilation, causal=self.causal, attention_mask=mask,
            global_mask=call.global_mask, global_qkv=tuple(global_qkv) if global_qkv else None,
            global_rule=self.global_rule, dropout=self.attn_dropout,
            dropout_seed=None if call.seed is None else derive_seed(call.seed, STREAM_ATTN_PROBS),
            replay=call.replay,
        )
        return merge_heads(out)


class AttentionBranch(nn.Module):
    """F of the reversible block: LayerNorm -> projections -> attention -> output projection -> dropout.

    Everything but the attention acts position by position: the reversible
    stack runs it in chunks of `chunk_size` positions (`project_chunk`,
    `output_chunk`; 0 = one chunk), and only `attention.attend` sees the whole
    sequence. The output dropout is drawn per chunk, so the plain execution
    (`forward`) draws the same masks.
    """

    def __init__(self, attention: nn.Module, d_model: int, inner: int, *, dropout: float,
                 layer_norm_eps: float = 1e-12, chunk_size: int = 0):
        super().__init__()
        projected = {p for layer in attention.projection_layers() for p in layer.parameters()}
        if projected != set(attention.parameters()):
            raise ValueError(f"{type(attention).__name__}: every parameter must belong to one of its "
                             "projection_layers(); the reversible backward differentiates only those")
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attention = attention
        self.out = nn.Linear(inner, d_model, bias=False)
        self.dropout = dropout
        self.chunk_size = chunk_size
        self.compiled_project = self.compiled_output = None  # torch.compile twins (`reformer.compile`), or None

    def project_chunk(self, x: torch.Tensor, global_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """x (b, m, d_model) -> the attention's projections, (b, m, h*d) each."""
        return (self.compiled_project or self.pure_project)(x, global_tokens)

    def pure_project(self, x: torch.Tensor, global_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        return self.attention.project(self.norm(x), global_tokens)

    def output_chunk(self, attended: torch.Tensor, seed: int | None, index: int) -> torch.Tensor:
        """Attention output (b, m, h*d) of chunk `index` -> (b, m, d_model)."""
        keep = keep_mask((*attended.shape[:-1], self.out.out_features), attended.device, self.dropout, seed,
                         STREAM_ATTN_OUT, index)
        return (self.compiled_output or self.pure_output)(attended, keep)

    def pure_output(self, attended: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """`output_chunk` given its dropout mask."""
        return apply_keep(self.out(attended), keep, self.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, call: LayerCall) -> torch.Tensor:
        attended = self.attention.attend(self.project_chunks(x, call.global_tokens), mask, call)  # (b, n, h*d)
        return torch.cat([self.output_chunk(attended[:, start:end], call.seed, index)
                          for index, (start, end) in enumerate(chunk_bounds(x.shape[1], self.chunk_size))], dim=1)

    def project_chunks(self, x: torch.Tensor, global_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        """The projections of x (b, n, d_model), (b, n, h*d) each, made chunk by chunk into tensors of the whole
        length. Both executions (this module's forward and the reversible stack) make them here: a matrix
        product's last bits may depend on how many rows it has, so they must give it the same rows."""
        bounds = chunk_bounds(x.shape[1], self.chunk_size)
        if len(bounds) == 1:
            return tuple(self.project_chunk(x, global_tokens))
        outputs: tuple[torch.Tensor, ...] = ()
        for start, end in bounds:
            parts = self.project_chunk(x[:, start:end], global_tokens)
            if not outputs:
                outputs = tuple(part.new_empty(x.shape[0], x.shape[1], part.shape[-1]) for part in parts)
            for out, part in zip(outputs, parts):
                out[:, start:end] = part
        return outputs
