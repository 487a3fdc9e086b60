"""ReformerConfig: the one flat, typed configuration at the model boundary.

Every field has a comment. `__post_init__` validates the combination and says
what to change; `to_json` / `from_json` round-trip exactly (tuples stay tuples).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .attention.hashing import validate_n_buckets

ATTENTION_KINDS = ("lsh", "local", "full", "sliding")
BUCKET_RULES = ("trax", "hf")
LSH_NORMALIZATIONS = ("softmax", "hf")
FF_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
SLIDING_GLOBAL_RULES = ("longformer", "global_kv")  # as attention.sliding.GLOBAL_RULES


@dataclass
class ReformerConfig:
    # --- sizes ---
    vocab_size: int = 256  # number of token ids; ids must lie in [0, vocab_size)
    d_model: int = 256  # width of each of the two reversible halves
    n_heads: int = 4  # attention heads per layer
    d_head: int = 64  # width of one head
    d_ff: int = 1024  # hidden width of the feed-forward
    attn_layers: tuple[str, ...] = ("local", "lsh")  # one entry per layer: "lsh", "local", "full" or "sliding"
    causal: bool = True  # autoregressive LM (no key after the query) or bidirectional

    # --- LSH attention ---
    lsh_chunk_size: int = 64  # chunk length after sorting by bucket
    lsh_chunks_before: int = 1  # chunks before its own that each chunk attends to
    lsh_chunks_after: int = 0  # chunks after its own (bidirectional models only)
    n_hashes: int = 1  # hash rounds; may be raised at eval time
    n_buckets: int | tuple[int, ...] | None = None  # int, factorised tuple, or None = 2*length/chunk (paper)
    lsh_dedup: bool = False  # paper eq. 16: count a key seen in several rounds once
    lsh_same_bucket_only: bool = False  # paper eq. 3-4: attend only inside the own bucket
    lsh_wrap: bool = False  # Trax/HF layout: rounds concatenated, look-back wraps around
    lsh_bucket_rule: str = "trax"  # for n_buckets=None: "trax" = 2*length/chunk; "hf" = HF's power-of-two rule
    hash_seed: int | None = None  # HF's hash_seed: LSH rotations redrawn from this seed on every call, train and eval
    lsh_attn_dropout: float | None = None  # attention dropout of the LSH layers (None = attn_dropout)
    lsh_normalize: str = "softmax"  # "softmax" (exact) or "hf": exp(x - logsumexp(x)), HF's float32 rounding
    # causal LSH in which no output depends on a later token (cached decoding = training): per round, a query
    # attends to the latest lsh_causal_window keys of its own bucket; n_buckets=None then counts from max_seq_len
    lsh_prefix_consistent: bool = False
    lsh_causal_window: int = 0  # keys per round for lsh_prefix_consistent; 0 = 2 * lsh_chunk_size

    # --- local attention ---
    local_chunk_size: int = 64  # each chunk attends to itself and the previous chunk
    local_chunks_before: int = 1  # chunks before its own that each chunk attends to
    local_chunks_after: int = 0  # chunks after its own (bidirectional models only)
    local_wrap: bool = False  # HF/Trax layout: the first chunk looks back at the last (matters only non-causal)

    # --- sliding-window attention (Longformer) ---
    sliding_window: int | tuple[int, ...] = 64  # keys on each side of a query (causal: before it); int or one per layer
    # int (every head), one per head, or one per layer (each an int or one per head): the step between window keys
    sliding_dilation: int | tuple = 1  # 1 = no gaps
    sliding_global_projections: bool = True  # own q, k, v projections for global tokens (Longformer), copies at init
    # what a non-global query takes at a global key: "longformer" = its own k and v (allenai, HF); "global_kv" =
    # K_g and V_g, the rule of models saved before "longformer" (`from_saved` gives it to their config.json)
    sliding_global_rule: str = "longformer"

    # --- feed-forward ---
    ff_activation: str = "relu"  # "relu", "gelu", "gelu_new" (tanh approximation) or "silu"

    # --- execution ---
    reversible: bool = True  # recompute activations in backward instead of storing them
    # keep each layer's fused attention output and plan from the forward for its backward, instead of recomputing
    # them: faster, and about n * h * d floats (plus the plan) more per layer while a step runs. True: every
    # layer's; False: none; "auto": the latest layers' that fit in reversible_keep_attention_mib (short sequences)
    reversible_keep_attention: bool | str = "auto"
    reversible_keep_attention_mib: float = 256.0  # the budget of "auto", in MiB, for all layers of a step together
    # and, in what the kept attention leaves of it, the latest layers' feed-forward outputs (n * d_model floats
    # each): the backward then skips the feed-forward's second product
    reversible_keep_feed_forward: bool = True
    ff_chunk_size: int = 0  # positions per feed-forward chunk (0 = whole sequence at once)
    loss_chunk_size: int = 4096  # positions per chunk of the LM head and loss when labels are given
    pad_to_multiple: int = 0  # right-pad inputs to a multiple of this, as HF does (lcm of its chunks); 0 = off

    # --- positions ---
    # axial position grid, "auto" = from max_seq_len (4096: (64, 64)); None = learned absolute positions
    axial_shape: tuple[int, ...] | str | None = "auto"
    # feature split of the axial embedding, summing to d_model; "auto" = from d_model (256: (64, 192))
    axial_dims: tuple[int, ...] | str | None = "auto"
    max_seq_len: int = 4096  # longest sequence; at most prod(axial_shape)
    # (H, W, C) of an image model (`reformer train --task images`): its tokens are sub-pixel values 0-255 in raster
    # order, channels interleaved; "auto" axial_shape is then (H, W, C) ((H, W) for grayscale); None = not images
    image_shape: tuple[int, ...] | None = None

    # --- regularisation and init ---
    dropout: float = 0.0  # hidden dropout: embeddings, attention output, feed-forward
    attn_dropout: float = 0.0  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (HF default)
    init_std: float = 0.02  # std of the normal init of linear and token-embedding weights
    # HF's axial std is 1.0; next to 0.02 token embeddings it kept a byte LM on the unigram plateau for long
    axial_init_std: float = 0.02  # std of the normal init of the axial position weights
    seed: int = 0  # seeds the init, the eval-time LSH rotations and the model's own generator
    eos_token_id: int | None = None  # the end-of-sequence token (HF's eos_token_id): `reformer generate` stops there

    def __post_init__(self) -> None:
        self.attn_layers = tuple(self.attn_layers)
        if isinstance(self.n_buckets, list):
            self.n_buckets = tuple(self.n_buckets)
        if isinstance(self.sliding_window, list):
            self.sliding_window = tuple(self.sliding_window)
        if isinstance(self.sliding_dilation, list):
            self.sliding_dilation = tuple(tuple(x) if isinstance(x, list) else x for x in self.sliding_dilation)
        if isinstance(self.image_shape, list):
            self.image_shape = tuple(self.image_shape)
        if self.axial_shape == "auto" and isinstance(self.image_shape, tuple) and len(self.image_shape) == 3:
            self.axial_shape = self.image_shape if self.image_shape[2] > 1 else self.image_shape[:2]
        if self.axial_shape == "auto" and isinstance(self.max_seq_len, int) and self.max_seq_len >= 1:
            self.axial_shape = default_axial_shape(self.max_seq_len)
        if self.axial_shape is not None and not isinstance(self.axial_shape, str):
            self.axial_shape = tuple(self.axial_shape)
        if self.axial_dims == "auto":
            self.axial_dims = None if self.axial_shape is None else default_axial_dims(
                self.d_model, len(self.axial_shape) if isinstance(self.axial_shape, tuple) else 2)
        if self.axial_dims is not None and not isinstance(self.axial_dims, str):
            self.axial_dims = tuple(self.axial_dims)
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.attn_layers)

    def validate(self) -> None:
        """Raise ValueError naming the field to change when the config contradicts itself."""
        for name in ("vocab_size", "d_model", "n_heads", "d_head", "d_ff", "lsh_chunk_size",
                     "n_hashes", "local_chunk_size", "max_seq_len", "loss_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._validate_windows()
        for name, meaning in (("ff_chunk_size", "no chunking"), ("pad_to_multiple", "no padding")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = {meaning}), got {value!r}")
        self._validate_keep_attention()
        if self.lsh_bucket_rule not in BUCKET_RULES:
            raise ValueError(f"lsh_bucket_rule must be one of {BUCKET_RULES}, got {self.lsh_bucket_rule!r}")
        if self.lsh_normalize not in LSH_NORMALIZATIONS:
            raise ValueError(f"lsh_normalize must be one of {LSH_NORMALIZATIONS}, got {self.lsh_normalize!r}")
        if self.sliding_global_rule not in SLIDING_GLOBAL_RULES:
            raise ValueError(f"sliding_global_rule must be one of {SLIDING_GLOBAL_RULES}, got "
                             f"{self.sliding_global_rule!r}")
        if self.ff_activation not in FF_ACTIVATIONS:
            raise ValueError(f"ff_activation must be one of {FF_ACTIVATIONS}, got {self.ff_activation!r}")
        if self.hash_seed is not None and (not isinstance(self.hash_seed, int) or isinstance(self.hash_seed, bool)):
            raise ValueError(f"hash_seed must be an integer or None, got {self.hash_seed!r}")
        if not self.attn_layers:
            raise ValueError("attn_layers is empty: give one of 'lsh', 'local', 'full' per layer")
        bad = [kind for kind in self.attn_layers if kind not in ATTENTION_KINDS]
        if bad:
            raise ValueError(f"attn_layers has unknown kinds {bad}; use only {ATTENTION_KINDS}")
        for name in ("dropout", "attn_dropout", "lsh_attn_dropout"):
            p = getattr(self, name)
            if p is None and name == "lsh_attn_dropout":
                continue
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.n_buckets is not None:
            validate_n_buckets(self.n_buckets)
        self._validate_positions()

    def _validate_keep_attention(self) -> None:
        keep = self.reversible_keep_attention
        if not (isinstance(keep, bool) or isinstance(keep, str) and keep == "auto"):
            raise ValueError(f"reversible_keep_attention must be True, False or 'auto', got {keep!r}")
        if not isinstance(self.reversible_keep_feed_forward, bool):
            raise ValueError(f"reversible_keep_feed_forward must be True or False, got "
                             f"{self.reversible_keep_feed_forward!r}")
        budget = self.reversible_keep_attention_mib
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise ValueError(f"reversible_keep_attention_mib must be a number of MiB >= 0 (the budget of "
                             f"reversible_keep_attention='auto'), got {budget!r}")

    def keep_attention_budget(self) -> float:
        """The bytes a training step may keep of its layers' attention (math.inf: all, 0: none)."""
        if self.reversible_keep_attention == "auto":
            return self.reversible_keep_attention_mib * (1 << 20)
        return math.inf if self.reversible_keep_attention else 0.0

    def _validate_windows(self) -> None:
        for kind in ("lsh", "local"):
            for side in ("before", "after"):
                name = f"{kind}_chunks_{side}"
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            after = getattr(self, f"{kind}_chunks_after")
            if self.causal and after and kind in self.attn_layers:
                raise ValueError(f"{kind}_chunks_after = {after} in a causal model: those chunks are all in the "
                                 f"future and masked; set {kind}_chunks_after=0")
        if not _is_int(self.lsh_causal_window) or self.lsh_causal_window < 0:
            raise ValueError(f"lsh_causal_window must be an integer >= 0 (0 = 2 * lsh_chunk_size), "
                             f"got {self.lsh_causal_window!r}")
        if self.lsh_prefix_consistent and not self.causal:
            raise ValueError("lsh_prefix_consistent is a causal LSH variant; set causal=True or turn it off")
        if self.lsh_prefix_consistent and self.lsh_wrap:
            raise ValueError("lsh_prefix_consistent attends inside each round's buckets and has no wrap-around; "
                             "set lsh_wrap=False")
        if self.lsh_dedup and not self.lsh_prefix_consistent and (self.lsh_chunks_before,
                                                                   self.lsh_chunks_after) != (1, 0):
            raise ValueError("lsh_dedup needs lsh_chunks_before=1 and lsh_chunks_after=0; change one or the other")
        for layer in range(len(self.attn_layers)):
            self.sliding_window_of(layer)
            self.sliding_dilation_of(layer)

    @property
    def lsh_window_keys(self) -> int | None:
        """The causal window of prefix-consistent LSH layers (keys per round), or None for standard LSH."""
        if not self.lsh_prefix_consistent:
            return None
        return self.lsh_causal_window or 2 * self.lsh_chunk_size

    def sliding_window_of(self, layer: int) -> int:
        """The window of layer `layer` (keys on each side), validated."""
        value = self.sliding_window
        if isinstance(value, tuple):
            if len(value) != len(self.attn_layers):
                raise ValueError(f"sliding_window has {len(value)} entries for {len(self.attn_layers)} layers; "
                                 "give one int, or one per entry of attn_layers")
            value = value[layer]
        if not _is_int(value) or value < 1:
            raise ValueError(f"sliding_window must be integers >= 1 (keys on each side), got {self.sliding_window!r}")
        return value

    def sliding_dilation_of(self, layer: int) -> int | tuple[int, ...]:
        """The dilation of layer `layer`: one int, or one per head, validated."""
        value = self.sliding_dilation
        per_layer = isinstance(value, tuple) and any(isinstance(x, tuple) for x in value)
        if per_layer:
            if len(value) != len(self.attn_layers):
                raise ValueError(f"sliding_dilation has {len(value)} per-layer entries for "
                                 f"{len(self.attn_layers)} layers; give one per entry of attn_layers")
            value = value[layer]
        heads = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and len(value) != self.n_heads:
            raise ValueError(f"sliding_dilation {value!r} has {len(value)} values for n_heads = {self.n_heads}; "
                             "give one int, one per head, or one entry per layer")
        if not heads or any(not _is_int(x) or x < 1 for x in heads):
            raise ValueError(f"sliding_dilation must be integers >= 1 (1 = no gaps), got {self.sliding_dilation!r}")
        return value

    def _validate_image_shape(self) -> None:
        shape = self.image_shape
        if shape is None:
            return
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(x) and x >= 1 for x in shape)
                and shape[2] in (1, 3)):
            raise ValueError(f"image_shape must be (height, width, channels) with 1 or 3 channels, got {shape!r}")
        if self.vocab_size < 256:
            raise ValueError(f"an image model's tokens are the values 0-255: vocab_size must be at least 256, "
                             f"got {self.vocab_size}")
        if self.max_seq_len < math.prod(shape):
            raise ValueError(f"image_shape {shape} is {math.prod(shape):,} sub-pixels, more than max_seq_len = "
                             f"{self.max_seq_len:,}; raise max_seq_len to {math.prod(shape)}")

    def _validate_positions(self) -> None:
        self._validate_image_shape()
        for name in ("axial_shape", "axial_dims"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, tuple) and all(_is_int(x) for x in value)):
                raise ValueError(f"{name} must be a tuple of integers, 'auto' or None, got {value!r}")
        if self.eos_token_id is not None and (not _is_int(self.eos_token_id)
                                              or not 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(f"eos_token_id must be None or a token id in [0, vocab_size), got {self.eos_token_id!r}")
        if (self.axial_shape is None) != (self.axial_dims is None):
            raise ValueError("set both axial_shape and axial_dims, or both to None for learned absolute positions")
        if self.axial_shape is None:
            return
        if len(self.axial_shape) != len(self.axial_dims) or len(self.axial_shape) < 2:
            raise ValueError(
                f"axial_shape {self.axial_shape} and axial_dims {self.axial_dims} need the same length, at least 2"
            )
        if any(n < 1 for n in self.axial_shape) or any(d < 1 for d in self.axial_dims):
            raise ValueError("axial_shape and axial_dims entries must be positive")
        if sum(self.axial_dims) != self.d_model:
            raise ValueError(
                f"sum(axial_dims) = {sum(self.axial_dims)} must equal d_model = {self.d_model}; "
                f"change axial_dims, e.g. to {default_axial_dims(self.d_model, len(self.axial_shape))}"
            )
        capacity = math.prod(self.axial_shape)
        if self.max_seq_len > capacity:
            raise ValueError(
                f"max_seq_len = {self.max_seq_len} exceeds prod(axial_shape) = {capacity}; "
                f"enlarge axial_shape (e.g. {default_axial_shape(self.max_seq_len)}) or lower max_seq_len"
            )

    # --- JSON ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ReformerConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "ReformerConfig":
        """The config of a saved model (its config.json), with `saved_fields`."""
        return cls.from_dict(saved_fields(data))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ReformerConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def saved_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a saved model's config, with the values it was trained with where a field came later.

    A config without `sliding_global_rule` was saved before its sliding layers took Longformer's rule for
    global tokens: with global projections, it keeps the rule it was trained with ("global_kv"), and a
    warning says what changed and how to move to Longformer's.
    """
    data = dict(data)
    trained_with_global_kv = "sliding" in data.get("attn_layers", ()) and data.get("sliding_global_projections",
                                                                                  True)
    if "sliding_global_rule" not in data and trained_with_global_kv:
        warnings.warn("this model was saved before its sliding layers took Longformer's rule for global tokens, "
                      "so it keeps the rule it was trained with, sliding_global_rule='global_kv': a non-global "
                      "query scores the global tokens with K_g and takes V_g. Longformer (and transformers) use "
                      "its own K and V there; sliding_global_rule='longformer' (--sliding-global-rule longformer) "
                      "switches to that, which changes the outputs of every query that sees a global token",
                      UserWarning, stacklevel=3)
        data["sliding_global_rule"] = "global_kv"
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_axial_shape(max_seq_len: int) -> tuple[int, int]:
    """A two-axis grid with at least `max_seq_len` cells, as square as powers of two allow."""
    total = 1 << max(1, (max_seq_len - 1).bit_length())
    first = 1 << (total.bit_length() - 1) // 2
    return first, total // first


def default_axial_dims(d_model: int, n_axes: int = 2) -> tuple[int, ...]:
    """Split d_model over the axes, the last axis taking the remainder (HF uses (64, 192) for 256)."""
    first = d_model // 4 if n_axes == 2 else d_model // n_axes
    dims = [first] * (n_axes - 1)
    return (*dims, d_model - sum(dims))
