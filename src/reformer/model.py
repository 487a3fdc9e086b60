"""ReformerLM: embeddings -> reversible blocks -> LayerNorm(2d) -> vocabulary logits.

    x = dropout(token_embedding + positions)
    X1 = X2 = x                                 both halves start from the embedding
    per layer:  Y1 = X1 + Attention(LN(X2))      lsh, local, full or sliding (Longformer)
                Y2 = X2 + FeedForward(LN(Y1))    chunked over positions
    logits = Linear(LayerNorm([Y1 ; Y2]))

With labels, the final norm, the head and the cross-entropy run over chunks of
positions (checkpointed), so a long sequence's logits are never all alive.
Randomness: the init comes from a generator seeded by `config.seed`; in
training, every forward draws one seed per layer from `model.generator`, which
the model owns. The global RNG is never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention.chunking import pad_length, padded_length, padded_mask
from .attention.fused_chunks import KernelReplay
from .keep import KeepBudget, KeptOutput
from .attention.sliding import global_mask_as_bool
from .config import ReformerConfig
from .layers.attention import (
    AttentionBranch,
    FullSelfAttention,
    LayerCall,
    LocalSelfAttention,
    LSHSelfAttention,
    SlidingSelfAttention,
)
from .layers.chunks import chunk_bounds
from .layers.feed_forward import FeedForward
from .layers.positional import AbsolutePositionEmbedding, AxialPositionEmbedding
from .layers.reversible import ReformerBlock, run_plain, run_reversible
from .rng import STREAM_EMBED, derive_seed, draw_seeds, dropout, generator_for

IGNORE_INDEX = -100
_INIT_STREAM = 11
_TRAIN_STREAM = 12
_LAYER_STREAM = 13


@dataclass
class ReformerOutput:
    logits: torch.Tensor | None = None  # (b, n, vocab)
    loss: torch.Tensor | None = None  # scalar mean cross-entropy over counted positions
    n_tokens: int | None = None  # positions the loss was averaged over


# A pytree node, so that code that walks a module's outputs finds the tensors inside: DDP with static_graph
# routes them through its sink, or it never reduces the gradients; torch.compile and export flatten it.
torch.export.register_dataclass(ReformerOutput, serialized_type_name="reformer.ReformerOutput")


def build_attention(config: ReformerConfig, kind: str, layer: int) -> nn.Module:
    common = dict(d_model=config.d_model, n_heads=config.n_heads, d_head=config.d_head)
    if kind == "lsh":
        return LSHSelfAttention(
            **common, chunk_size=config.lsh_chunk_size, n_hashes=config.n_hashes, n_buckets=config.n_buckets,
            causal=config.causal, dedup=config.lsh_dedup, same_bucket_only=config.lsh_same_bucket_only,
            wrap=config.lsh_wrap,
            attn_dropout=config.attn_dropout if config.lsh_attn_dropout is None else config.lsh_attn_dropout,
            eval_seed=derive_seed(config.seed, _LAYER_STREAM, layer), bucket_rule=config.lsh_bucket_rule,
            max_positions=config.max_seq_len, hash_seed=config.hash_seed, normalize=config.lsh_normalize,
            window=(config.lsh_chunks_before, config.lsh_chunks_after), causal_window=config.lsh_window_keys,
        )
    if kind == "local":
        return LocalSelfAttention(**common, chunk_size=config.local_chunk_size, causal=config.causal,
                                  attn_dropout=config.attn_dropout, wrap=config.local_wrap,
                                  window=(config.local_chunks_before, config.local_chunks_after))
    if kind == "sliding":
        return SlidingSelfAttention(**common, window=config.sliding_window_of(layer),
                                    dilation=config.sliding_dilation_of(layer), causal=config.causal,
                                    attn_dropout=config.attn_dropout,
                                    global_projections=config.sliding_global_projections,
                                    global_rule=config.sliding_global_rule)
    return FullSelfAttention(**common, causal=config.causal, attn_dropout=config.attn_dropout)


class ReformerLM(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):  # no init here: the global RNG stays untouched
            self._build(config)
        self.to_empty(device="cpu")
        self.reset_parameters()
        self.generator = generator_for(derive_seed(config.seed, _TRAIN_STREAM))
        # the last training forward's budget of kept attention (`reversible_keep_attention`): its `kept` lists the
        # bytes of every layer whose attention it kept for the backward; None when it kept none
        self.kept_attention: KeepBudget | None = None

    def _build(self, c: ReformerConfig) -> None:
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
        if c.axial_shape is not None:
            self.position_embedding = AxialPositionEmbedding(c.axial_shape, c.axial_dims)
        else:
            self.position_embedding = AbsolutePositionEmbedding(c.max_seq_len, c.d_model)
        inner = c.n_heads * c.d_head
        self.layers = nn.ModuleList(
            ReformerBlock(
                AttentionBranch(build_attention(c, kind, i), c.d_model, inner, dropout=c.dropout,
                                layer_norm_eps=c.layer_norm_eps, chunk_size=c.ff_chunk_size),
                FeedForward(c.d_model, c.d_ff, chunk_size=c.ff_chunk_size, dropout=c.dropout,
                            activation=c.ff_activation, layer_norm_eps=c.layer_norm_eps),
            )
            for i, kind in enumerate(c.attn_layers)
        )
        self.final_norm = nn.LayerNorm(2 * c.d_model, eps=c.layer_norm_eps)
        self.head = nn.Linear(2 * c.d_model, c.vocab_size)
        self.compiled_loss = None  # a torch.compile of pure_loss_sum (`reformer.compile`), or None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit LayerNorms, axial Normal(0, axial_init_std).

        Sliding layers' global projections then start as copies of their q, k, v (Longformer).
        """
        gen = generator_for(derive_seed(self.config.seed, _INIT_STREAM))
        for name, p in self.named_parameters():
            if name.startswith("position_embedding.weights"):
                p.normal_(0.0, self.config.axial_init_std, generator=gen)
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.config.init_std, generator=gen)
        for module in self.modules():
            if isinstance(module, SlidingSelfAttention):
                module.copy_global_projections()

    # --- randomness -------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Reseed the model's own generator (dropout and training-time LSH rotations)."""
        self.generator.manual_seed(seed)

    @property
    def kept_attention_bytes(self) -> list[int]:
        """The bytes of every layer whose attention the last training forward kept for the backward, in layer
        order (`reversible_keep_attention`); empty when it kept none."""
        return [] if self.kept_attention is None else self.kept_attention.kept

    @property
    def kept_output_bytes(self) -> list[int]:
        """The bytes of every layer whose feed-forward output the last training forward kept for the backward, in
        what the kept attention left of the budget (`reversible_keep_attention`); empty when it kept none."""
        return [] if self.kept_attention is None else self.kept_attention.kept_outputs

    def _layer_calls(self, global_mask: torch.Tensor | None = None) -> tuple[int | None, list[LayerCall]]:
        self.kept_attention = None
        if not self.training:
            return None, [LayerCall(global_mask=global_mask) for _ in self.layers]
        seeds = draw_seeds(self.generator, len(self.layers) + 1)
        budget = self.config.keep_attention_budget()
        keep = self.config.reversible and budget > 0 and torch.is_grad_enabled()
        self.kept_attention = KeepBudget(budget) if keep else None
        return seeds[0], [LayerCall(seed=s, global_mask=global_mask,
                                    replay=KernelReplay(budget=self.kept_attention) if keep else None,
                                    kept_output=KeptOutput(budget=self.kept_attention)
                                    if keep and self.config.reversible_keep_feed_forward else None)
                          for s in seeds[1:]]

    def set_lsh_eval(self, n_hashes: int | None = None, full_attention: bool = False) -> None:
        """Evaluate the LSH layers with another number of hash rounds, or with full shared-QK attention."""
        for layer in self.layers:
            attention = layer.attention.attention
            if isinstance(attention, LSHSelfAttention):
                attention.use_full_attention = full_attention
                if n_hashes is not None:
                    attention.n_hashes = n_hashes

    # --- forward ----------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        global_mask: torch.Tensor | None = None,
        shift_labels: bool = True,
    ) -> ReformerOutput:
        """input_ids (b, n) int64; attention_mask (b, n) bool (True = real); labels (b, n) or None.

        global_mask (b, n) bool: Longformer's global tokens, for the "sliding" layers (the others ignore it).
        The loss is the mean cross-entropy of labels[:, 1:] given logits[:, :-1] (HF's convention), or with
        shift_labels=False of labels given logits, position by position (labels already aligned: an image model
        reads the sub-pixels shifted right by one and predicts every one of them), ignoring labels equal to -100
        and padded positions.
        """
        attention_mask = self._check_inputs(input_ids, attention_mask, labels)
        global_mask = self._check_global_mask(input_ids, global_mask)
        if labels is not None and not return_logits and self.config.reversible and torch.is_grad_enabled():
            return self._reversible_loss(input_ids, attention_mask, labels, global_mask, shift_labels)
        hidden = self.hidden_states(input_ids, attention_mask, global_mask)  # (b, n, 2d)
        if labels is None:
            return ReformerOutput(logits=self.logits_from_hidden(hidden))
        loss, count = self._chunked_loss(hidden, labels, attention_mask, shift_labels)
        logits = self.logits_from_hidden(hidden) if return_logits else None
        return ReformerOutput(logits=logits, loss=loss, n_tokens=count)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      global_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[Y1 ; Y2] of the last layer, (b, n, 2d), before the final norm."""
        x, mask, calls = self._embed(input_ids, attention_mask, global_mask)
        run = run_reversible if self.config.reversible and torch.is_grad_enabled() else run_plain
        return run(self.layers, x, mask, calls)[:, :input_ids.shape[1]]

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               global_mask: torch.Tensor | None = None):
        """The layers' input (b, n_pad, d), its mask and the layer calls of this forward."""
        n = input_ids.shape[1]
        if global_mask is not None:
            global_mask = pad_length(global_mask, padded_length(n, max(self.config.pad_to_multiple, 1)), dim=1)
        embed_seed, calls = self._layer_calls(global_mask)
        x = self.token_embedding(input_ids) + self.position_embedding(n).to(self.token_embedding.weight.dtype)
        x = dropout(x, self.config.dropout, embed_seed, STREAM_EMBED)  # (b, n, d)
        x, attention_mask = self._pad_to_multiple(x, attention_mask)  # (b, n_pad, d)
        return x, attention_mask, calls

    def _reversible_loss(self, input_ids, attention_mask, labels, global_mask=None,
                         shift_labels: bool = True) -> ReformerOutput:
        """The loss with the final norm, head and loss closing the reversible stack (`_LossTail`).

        The same value as `_chunked_loss(hidden_states(...))`; the stack then owns
        its state, and the loss's gradient reaches it chunk by chunk.
        """
        targets, count = self._loss_targets(labels, attention_mask, shift_labels)
        x, mask, calls = self._embed(input_ids, attention_mask, global_mask)
        total = run_reversible(self.layers, x, mask, calls, tail=_LossTail(self, targets))
        return ReformerOutput(loss=total / max(count, 1), n_tokens=count)

    def _pad_to_multiple(self, x: torch.Tensor, attention_mask: torch.Tensor | None):
        """Right-pad x (b, n, d) with masked zeros to a multiple of `pad_to_multiple` (HF's padding)."""
        multiple = self.config.pad_to_multiple
        b, n, _ = x.shape
        if multiple <= 1 or n % multiple == 0:
            return x, attention_mask
        n_pad = padded_length(n, multiple)
        return pad_length(x, n_pad, dim=1), padded_mask(attention_mask, b, n, n_pad, x.device)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(hidden))  # (b, n, vocab)

    def _chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self.compiled_loss or self.pure_loss_sum)(hidden, targets)

    def pure_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of one chunk of positions: hidden (b, m, 2d), targets (b, m)."""
        logits = self.logits_from_hidden(hidden)  # (b, m, vocab)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the log-sum-exp of the loss runs in float32 at least
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def _loss_targets(self, labels, attention_mask, shift_labels: bool = True) -> tuple[torch.Tensor, int]:
        """Targets (b, n - 1) for logits[:, :-1] (or (b, n) for logits, not shifted), padding set to -100, and
        how many count."""
        skip = 1 if shift_labels else 0
        targets = labels[:, skip:]
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask[:, skip:], IGNORE_INDEX)
        return targets, int((targets != IGNORE_INDEX).sum().item())

    def _chunked_loss(self, hidden, labels, attention_mask, shift_labels: bool = True) -> tuple[torch.Tensor, int]:
        targets, count = self._loss_targets(labels, attention_mask, shift_labels)
        hidden = hidden[:, :targets.shape[1]]
        use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        for start, end in chunk_bounds(hidden.shape[1], self.config.loss_chunk_size):
            args = (hidden[:, start:end], targets[:, start:end])
            if use_checkpoint:
                total = total + checkpoint(self._chunk_loss_sum, *args, use_reentrant=False,
                                           preserve_rng_state=False)
            else:
                total = total + self._chunk_loss_sum(*args)
        return total / max(count, 1), count

    def _check_inputs(self, input_ids, attention_mask, labels) -> torch.Tensor | None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}; "
                             "add a batch dimension with input_ids[None] for a single sequence")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}")
        b, n = input_ids.shape
        if n == 0:
            raise ValueError("input_ids is empty (length 0); give at least one token")
        if n > self.config.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_len = {self.config.max_seq_len}; "
                             "raise max_seq_len (and axial_shape) in the config, or shorten the input")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got ids from {low} to {high}; "
                             "fix the tokenisation or raise vocab_size")
        if attention_mask is not None:
            if attention_mask.shape != (b, n):
                raise ValueError(f"attention_mask must have the shape of input_ids {(b, n)}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
        if labels is not None:
            if labels.shape != (b, n):
                raise ValueError(f"labels must have the shape of input_ids {(b, n)}, got {tuple(labels.shape)}")
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"labels must be in [0, {self.config.vocab_size}) or -100 (ignored)")
        return attention_mask

    def _check_global_mask(self, input_ids: torch.Tensor, global_mask: torch.Tensor | None) -> torch.Tensor | None:
        return global_mask_as_bool(global_mask, tuple(input_ids.shape), "the shape of input_ids")

    # --- save and load ----------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (each atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp_config = directory / "config.json.tmp"
        tmp_config.write_text(self.config.to_json())
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_weights = directory / "model.safetensors.tmp"
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        tmp_weights.replace(directory / "model.safetensors")
        tmp_config.replace(directory / "config.json")

    @classmethod
    def from_hf(cls, source, **overrides) -> "ReformerLM":
        """An equal model from a Hugging Face Reformer: its directory or an in-memory HF model.

        See `reformer.hf` for what is matched and how; `overrides` replace config fields.
        """
        from .hf import from_hf

        return from_hf(source, **overrides)

    def to_hf(self, directory: str | Path, *, strict: bool = True, fold_bias: bool | None = None) -> Path:
        """Write an HF Reformer directory that `transformers` loads with the same logits (see `reformer.hf.to_hf`)."""
        from .hf import to_hf

        return to_hf(self, directory, strict=strict, fold_bias=fold_bias)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> "ReformerLM":
        """Read config.json (fields may be overridden, e.g. reversible=False) and model.safetensors."""
        from safetensors.torch import load_file

        from .checkpoint import CheckpointError

        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; save_pretrained writes it")
        try:
            data = json.loads((directory / "config.json").read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{directory / 'config.json'} is not valid JSON ({error})") from None
        data.update(overrides)
        model = cls(ReformerConfig.from_saved(data))
        try:
            state = load_file(str(directory / "model.safetensors"))
        except Exception as error:  # safetensors' own error type: a truncated or corrupt file
            raise CheckpointError(f"{directory / 'model.safetensors'} cannot be read ({error})") from None
        expected = model.state_dict()
        missing = [name for name in expected if name not in state]
        unexpected = [name for name in state if name not in expected]
        wrong = [name for name, tensor in state.items() if name in expected and expected[name].shape != tensor.shape]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{directory / 'model.safetensors'} does not fit {directory / 'config.json'} "
                                  f"({len(missing)} weights missing, {len(unexpected)} unexpected, {len(wrong)} of "
                                  f"another shape, e.g. {(missing + unexpected + wrong)[0]}); they were not written "
                                  "together")
        model.load_state_dict(state)
        return model.to(next(iter(state.values())).dtype) if state else model


class _LossTail:
    """The final norm, head and summed cross-entropy over chunks of positions: the reversible stack's tail.

    Chunk i reads the state's positions start..end, which predict targets[:, start:end].
    """

    def __init__(self, model: ReformerLM, targets: torch.Tensor):
        self.model, self.targets = model, targets
        self._bounds = chunk_bounds(targets.shape[1], model.config.loss_chunk_size)

    def parameters(self):
        return [*self.model.final_norm.parameters(), *self.model.head.parameters()]

    def bounds(self) -> list[tuple[int, int]]:
        return self._bounds

    def chunk(self, state: torch.Tensor, index: int) -> torch.Tensor:
        start, end = self._bounds[index]
        return self.model._chunk_loss_sum(state, self.targets[:, start:end])
