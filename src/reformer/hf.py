"""Hugging Face Reformer checkpoints: load theirs (`from_hf`), write ours as theirs (`to_hf`).

Supported HF classes: `ReformerModelWithLMHead` (causal, `is_decoder=True`) and
`ReformerForMaskedLM` (bidirectional). Reading a directory or writing one needs
only torch and safetensors; `transformers` is imported only to read an
in-memory HF model's config, or to ask how the installed version treats
`lm_head.bias`.

What HF computes differently from our defaults, and the option that matches it
(the converter sets them; see docs/huggingface.md):

    HF behaviour                                            our option
    LSH look-back crosses hash rounds and wraps around      lsh_wrap=True
    non-causal local attention: chunk 0 sees the last one   local_wrap=True
    num_buckets=None: largest power of 2 <= 2L/chunk        lsh_bucket_rule="hf"
    hash_seed: rotations redrawn from the seed every call   hash_seed (no global reseed)
    weights as exp(x - logsumexp(x)) (float32 rounding)     lsh_normalize="hf"
    eval input right-padded to the lcm of chunk lengths     pad_to_multiple=lcm
    separate dropout of LSH and local attention probs       lsh_attn_dropout, attn_dropout

The weights map one to one by name (tables below), with identical shapes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import ReformerConfig

CAUSAL_ARCHITECTURE = "ReformerModelWithLMHead"
MASKED_ARCHITECTURE = "ReformerForMaskedLM"
ARCHITECTURES = (CAUSAL_ARCHITECTURE, MASKED_ARCHITECTURE)

# HF's ReformerConfig defaults, for config.json files that leave keys out.
HF_DEFAULTS: dict[str, Any] = dict(
    attention_head_size=64, attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"], axial_norm_std=1.0,
    axial_pos_embds=True, axial_pos_shape=[64, 64], axial_pos_embds_dim=[64, 192], chunk_size_lm_head=0,
    chunk_size_feed_forward=0, eos_token_id=2, feed_forward_size=512, hash_seed=None, hidden_act="relu",
    hidden_dropout_prob=0.05, hidden_size=256, initializer_range=0.02, is_decoder=False, layer_norm_eps=1e-12,
    local_attention_probs_dropout_prob=0.05, local_attn_chunk_length=64, local_num_chunks_after=0,
    local_num_chunks_before=1, lsh_attention_probs_dropout_prob=0.0, lsh_attn_chunk_length=64,
    lsh_num_chunks_after=0, lsh_num_chunks_before=1, max_position_embeddings=4096, num_attention_heads=12,
    num_buckets=None, num_hashes=1, pad_token_id=0, vocab_size=320,
)

# HF activation names -> ours (`ReformerConfig.ff_activation`); the first HF name is the one `to_hf` writes.
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                  "silu": "silu", "swish": "silu"}

# --- weight names: (ours, HF); {i} is the layer index ---------------------------------------------
_HF_LAYER = "reformer.encoder.layers.{i}."
EMBEDDING_WEIGHTS = [
    ("token_embedding.weight", "reformer.embeddings.word_embeddings.weight"),
]
AXIAL_WEIGHT = ("position_embedding.weights.{axis}", "reformer.embeddings.position_embeddings.weights.{axis}")
ABSOLUTE_WEIGHT = ("position_embedding.embedding.weight", "reformer.embeddings.position_embeddings.embedding.weight")
LAYER_WEIGHTS = [
    ("layers.{i}.attention.norm.weight", _HF_LAYER + "attention.layer_norm.weight"),
    ("layers.{i}.attention.norm.bias", _HF_LAYER + "attention.layer_norm.bias"),
    ("layers.{i}.attention.out.weight", _HF_LAYER + "attention.output.dense.weight"),
    ("layers.{i}.feed_forward.norm.weight", _HF_LAYER + "feed_forward.layer_norm.weight"),
    ("layers.{i}.feed_forward.norm.bias", _HF_LAYER + "feed_forward.layer_norm.bias"),
    ("layers.{i}.feed_forward.w_in.weight", _HF_LAYER + "feed_forward.dense.dense.weight"),
    ("layers.{i}.feed_forward.w_in.bias", _HF_LAYER + "feed_forward.dense.dense.bias"),
    ("layers.{i}.feed_forward.w_out.weight", _HF_LAYER + "feed_forward.output.dense.weight"),
    ("layers.{i}.feed_forward.w_out.bias", _HF_LAYER + "feed_forward.output.dense.bias"),
]
ATTENTION_WEIGHTS = {
    "lsh": [
        ("layers.{i}.attention.attention.qk.weight", _HF_LAYER + "attention.self_attention.query_key.weight"),
        ("layers.{i}.attention.attention.v.weight", _HF_LAYER + "attention.self_attention.value.weight"),
    ],
    "local": [
        ("layers.{i}.attention.attention.q.weight", _HF_LAYER + "attention.self_attention.query.weight"),
        ("layers.{i}.attention.attention.k.weight", _HF_LAYER + "attention.self_attention.key.weight"),
        ("layers.{i}.attention.attention.v.weight", _HF_LAYER + "attention.self_attention.value.weight"),
    ],
}
HEAD_WEIGHTS = [
    ("final_norm.weight", "reformer.encoder.layer_norm.weight"),
    ("final_norm.bias", "reformer.encoder.layer_norm.bias"),
    ("head.weight", "lm_head.decoder.weight"),
    ("head.bias", "lm_head.bias"),
]
# Keys HF files may carry that hold no weights of the model, or duplicate one.
IGNORED_HF_SUFFIXES = ("mask_value_float16", "mask_value_float32")  # persistent buffers in transformers 4.x
# The head bias HF applies: the decoder's. transformers 4.x ties it to `lm_head.bias`; 5.0-5.23 build the
# decoder without one (and apply none); 5.24 gives the decoder a bias of its own and ignores `lm_head.bias`.
HF_ALIASES = {"lm_head.decoder.bias": "lm_head.bias"}


class ConversionError(ValueError):
    """A Hugging Face checkpoint or model that cannot be converted, with what to change."""


def weight_names(config: ReformerConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every weight of a model with this config."""
    names = list(EMBEDDING_WEIGHTS)
    if config.axial_shape is not None:
        names += [tuple(n.format(axis=a) for n in AXIAL_WEIGHT) for a in range(len(config.axial_shape))]
    else:
        names.append(ABSOLUTE_WEIGHT)
    for i, kind in enumerate(config.attn_layers):
        if kind not in ATTENTION_WEIGHTS:
            raise ConversionError(f"layer {i} is {kind!r} attention, which HF's Reformer does not have "
                                  f"(it has {sorted(ATTENTION_WEIGHTS)})")
        names += [(ours.format(i=i), theirs.format(i=i)) for ours, theirs in ATTENTION_WEIGHTS[kind] + LAYER_WEIGHTS]
    return names + HEAD_WEIGHTS


# --- configs --------------------------------------------------------------------------------------

def hf_chunk_lcm(attn_layers, lsh_chunk: int, local_chunk: int) -> int:
    """HF pads eval inputs to the least common multiple of the chunk lengths its layers use."""
    chunks = {"lsh": lsh_chunk, "local": local_chunk}
    return math.lcm(*(chunks[kind] for kind in set(attn_layers)))


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ReformerConfig:
    """Our ReformerConfig for an HF Reformer config (a config.json dict), matching HF's computation."""
    c = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k in ("hash_seed", "num_buckets")}}
    _check_supported_hf_config(c)
    axial = bool(c["axial_pos_embds"])
    max_len = c["max_position_embeddings"]
    if axial:
        max_len = min(max_len, math.prod(c["axial_pos_shape"]))
    buckets = c["num_buckets"]
    data = dict(
        vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_heads=c["num_attention_heads"],
        d_head=c["attention_head_size"], d_ff=c["feed_forward_size"], attn_layers=tuple(c["attn_layers"]),
        causal=bool(c["is_decoder"]),
        lsh_chunk_size=c["lsh_attn_chunk_length"], n_hashes=c["num_hashes"],
        lsh_chunks_before=c["lsh_num_chunks_before"], lsh_chunks_after=c["lsh_num_chunks_after"],
        local_chunks_before=c["local_num_chunks_before"], local_chunks_after=c["local_num_chunks_after"],
        n_buckets=tuple(buckets) if isinstance(buckets, (list, tuple)) and len(buckets) > 1
        else (buckets[0] if isinstance(buckets, (list, tuple)) else buckets),
        lsh_wrap=True, lsh_bucket_rule="hf", hash_seed=c["hash_seed"], lsh_normalize="hf",
        lsh_attn_dropout=c["lsh_attention_probs_dropout_prob"],
        local_chunk_size=c["local_attn_chunk_length"], local_wrap=True,
        ff_activation=HF_ACTIVATIONS[c["hidden_act"]], ff_chunk_size=c["chunk_size_feed_forward"] or 0,
        pad_to_multiple=hf_chunk_lcm(c["attn_layers"], c["lsh_attn_chunk_length"], c["local_attn_chunk_length"]),
        axial_shape=tuple(c["axial_pos_shape"]) if axial else None,
        axial_dims=tuple(c["axial_pos_embds_dim"]) if axial else None,
        max_seq_len=max_len, dropout=c["hidden_dropout_prob"], attn_dropout=c["local_attention_probs_dropout_prob"],
        layer_norm_eps=c["layer_norm_eps"], init_std=c["initializer_range"], axial_init_std=c["axial_norm_std"],
        eos_token_id=_eos_token(hf.get("eos_token_id", HF_DEFAULTS["eos_token_id"]), c["vocab_size"]),
    )
    data.update(overrides)
    try:
        return ReformerConfig(**data)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"the HF config converts to an invalid ReformerConfig: {e}") from e


def _eos_token(value, vocab_size: int) -> int | None:
    """HF's eos_token_id when it names a token of the vocabulary (HF's default is 2), else None."""
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


def _check_supported_hf_config(c: dict[str, Any]) -> None:
    problems = []
    if c.get("model_type", "reformer") != "reformer":
        problems.append(f"model_type is {c['model_type']!r}, not 'reformer'")
    architectures = c.get("architectures") or []
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        problems.append(f"architectures {unknown} (supported: {list(ARCHITECTURES)})")
    bad_layers = sorted(set(c["attn_layers"]) - {"lsh", "local"})
    if bad_layers or not c["attn_layers"]:
        problems.append(f"attn_layers {c['attn_layers']} (HF allows only 'lsh' and 'local')")
    if c["hidden_act"] not in HF_ACTIVATIONS:
        problems.append(f"hidden_act {c['hidden_act']!r} (supported: {sorted(HF_ACTIVATIONS)})")
    if c["axial_pos_embds"] and len(c["axial_pos_shape"]) != 2:
        problems.append(f"axial_pos_shape {c['axial_pos_shape']} (HF's axial embedding is two-dimensional)")
    if problems:
        raise ConversionError("cannot convert this HF Reformer: " + "; ".join(problems))


def config_to_hf(config: ReformerConfig) -> dict[str, Any]:
    """The HF config.json dict for our config (`differences_from_hf` lists what HF would compute differently)."""
    axial = config.axial_shape is not None
    lsh_dropout = config.attn_dropout if config.lsh_attn_dropout is None else config.lsh_attn_dropout
    activation = next(hf for hf, ours in HF_ACTIVATIONS.items() if ours == config.ff_activation)
    return {
        "architectures": [CAUSAL_ARCHITECTURE if config.causal else MASKED_ARCHITECTURE],
        "model_type": "reformer",
        "attention_head_size": config.d_head,
        "attn_layers": list(config.attn_layers),
        "axial_norm_std": config.axial_init_std,
        "axial_pos_embds": axial,
        "axial_pos_embds_dim": list(config.axial_dims) if axial else HF_DEFAULTS["axial_pos_embds_dim"],
        "axial_pos_shape": list(config.axial_shape) if axial else HF_DEFAULTS["axial_pos_shape"],
        "chunk_size_feed_forward": config.ff_chunk_size,
        "chunk_size_lm_head": 0,
        "eos_token_id": config.eos_token_id,  # None: no end-of-sequence token (HF's default, 2, would stop generate)
        "feed_forward_size": config.d_ff,
        "hash_seed": config.hash_seed,
        "hidden_act": activation,
        "hidden_dropout_prob": config.dropout,
        "hidden_size": config.d_model,
        "initializer_range": config.init_std,
        "is_decoder": config.causal,
        "layer_norm_eps": config.layer_norm_eps,
        "local_attention_probs_dropout_prob": config.attn_dropout,
        "local_attn_chunk_length": config.local_chunk_size,
        "local_num_chunks_after": config.local_chunks_after,
        "local_num_chunks_before": config.local_chunks_before,
        "lsh_attention_probs_dropout_prob": lsh_dropout,
        "lsh_attn_chunk_length": config.lsh_chunk_size,
        "lsh_num_chunks_after": config.lsh_chunks_after,
        "lsh_num_chunks_before": config.lsh_chunks_before,
        "max_position_embeddings": config.max_seq_len,
        "num_attention_heads": config.n_heads,
        "num_buckets": list(config.n_buckets) if isinstance(config.n_buckets, tuple) else config.n_buckets,
        "num_hashes": config.n_hashes,
        "num_hidden_layers": config.n_layers,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def differences_from_hf(config: ReformerConfig) -> list[str]:
    """What HF would compute differently from our model with this config (empty: the same logits)."""
    kinds = set(config.attn_layers)
    out = []
    for kind in sorted(kinds & {"full", "sliding"}):
        out.append(f"'{kind}' attention layers do not exist in HF's Reformer")
    if config.axial_shape is not None and len(config.axial_shape) != 2:
        out.append(f"axial_shape {config.axial_shape}: HF's axial embedding is two-dimensional")
    if "lsh" in kinds:
        if not config.lsh_wrap:
            out.append("lsh_wrap=False: HF's LSH look-back crosses hash rounds and wraps around (lsh_wrap=True)")
        if config.lsh_dedup or config.lsh_same_bucket_only:
            out.append("lsh_dedup / lsh_same_bucket_only: HF has neither")
        if config.lsh_prefix_consistent:
            out.append("lsh_prefix_consistent: HF has only the standard chunked LSH")
        if config.n_buckets is None and config.lsh_bucket_rule != "hf":
            out.append("n_buckets=None with the Trax rule: HF picks a power of two (lsh_bucket_rule='hf'), "
                       "or set n_buckets")
        if config.lsh_normalize != "hf":
            out.append("lsh_normalize='softmax': HF weights by exp(x - logsumexp(x)), up to 0.4% off in float32 "
                       "for a token that sees only itself (lsh_normalize='hf')")
        if config.hash_seed is None:
            out.append("hash_seed=None: HF draws fresh random LSH rotations on every call, ours are fixed in eval; "
                       "set hash_seed for the same rotations in both")
    if "local" in kinds and not config.causal and not config.local_wrap:
        out.append("local_wrap=False: HF's non-causal local attention lets the first chunk see the last")
    if kinds <= {"lsh", "local"}:
        lcm = hf_chunk_lcm(config.attn_layers, config.lsh_chunk_size, config.local_chunk_size)
        if config.pad_to_multiple != lcm and ("lsh" in kinds or not config.causal):
            out.append(f"pad_to_multiple={config.pad_to_multiple}: HF pads inputs to a multiple of {lcm}, "
                       "which moves the LSH / wrapped chunk boundaries")
    return out


# --- weights --------------------------------------------------------------------------------------

def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ReformerConfig) -> dict[str, torch.Tensor]:
    """Rename HF weights to ours, checking that every expected weight is there with its shape."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    for alias, canonical in HF_ALIASES.items():
        if alias in hf_state:  # the alias is what HF computes with, where both exist
            hf_state[canonical] = hf_state.pop(alias)
    names = weight_names(config)
    missing = [theirs for _, theirs in names if theirs not in hf_state]
    unexpected = sorted(set(hf_state) - {theirs for _, theirs in names})
    if missing or unexpected:
        raise ConversionError("the HF weights do not fit the HF config: "
                              + (f"missing {missing}" if missing else "")
                              + ("; " if missing and unexpected else "")
                              + (f"unexpected {unexpected}" if unexpected else ""))
    return {ours: hf_state[theirs] for ours, theirs in names}


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ReformerConfig) -> dict[str, torch.Tensor]:
    """Our weights under HF's names, the head bias under both of its names (every transformers version reads one)."""
    hf_state = {theirs: state[ours].detach().contiguous().cpu() for ours, theirs in weight_names(config)}
    for alias, canonical in HF_ALIASES.items():
        hf_state[alias] = hf_state[canonical].clone()
    return hf_state


def _load_into(model, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    wrong = [f"{name}: HF {tuple(t.shape)} vs ours {tuple(expected[name].shape)}"
             for name, t in state.items() if t.shape != expected[name].shape]
    if wrong:
        raise ConversionError("HF weight shapes do not match the config: " + "; ".join(wrong))
    model.load_state_dict(state, strict=True)


# --- reading HF files and models ------------------------------------------------------------------

def read_hf_directory(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights (model.safetensors, its sharded index, or pytorch_model.bin) of an HF dir."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a directory; give an HF model directory (config.json + weights)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file} not found; an HF model directory has config.json next to its weights")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_file} is not valid JSON ({e})") from e
    return hf_config, _read_hf_weights(path)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConversionError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_hf_model(hf_model) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    name = type(hf_model).__name__
    if name not in ARCHITECTURES:
        raise ConversionError(f"cannot convert a {name}; give a {' or a '.join(ARCHITECTURES)}")
    hf_config = hf_model.config.to_dict()
    hf_config["architectures"] = [name]
    return hf_config, {k: v.detach() for k, v in hf_model.state_dict().items()}


def from_hf(source, **overrides: Any):
    """A ReformerLM equal to an HF Reformer: an HF model directory or an in-memory HF model.

    `overrides` replace fields of the converted config (execution choices such
    as reversible or ff_chunk_size; dropout for training).
    """
    from .model import ReformerLM

    if isinstance(source, (str, os.PathLike)):
        hf_config, hf_state = read_hf_directory(source)
    else:
        hf_config, hf_state = _read_hf_model(source)
    config = config_from_hf(hf_config, **overrides)
    state = state_dict_from_hf(hf_state, config)
    model = ReformerLM(config)
    _load_into(model, {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    return model


# --- writing --------------------------------------------------------------------------------------

def hf_applies_head_bias() -> bool | None:
    """Does the installed transformers add `lm_head.bias` to the logits? None when it is not installed.

    transformers 4.x ties it to the decoder's bias; 5.0 to 5.23 build the decoder without a bias and never
    add `lm_head.bias`, so a checkpoint's head bias is silently dropped there; 5.24 gives the decoder a bias
    of its own again (read from `lm_head.decoder.bias`).
    """
    try:
        from transformers import ReformerConfig as HFConfig
        from transformers import ReformerModelWithLMHead
    except ImportError:
        return None
    tiny = HFConfig(vocab_size=4, hidden_size=4, num_attention_heads=1, attention_head_size=2, feed_forward_size=4,
                    attn_layers=["local"], axial_pos_embds=False, max_position_embeddings=4, is_decoder=True)
    head = ReformerModelWithLMHead(tiny).lm_head
    return head.decoder.bias is not None


def fold_head_bias(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Move the head bias into the final LayerNorm's bias: logits = W (LN(h) + beta') with W beta' = W beta + b.

    Exact when the head weight W (vocab, 2d) has full row rank (vocab <= 2 d_model); returns the new state
    and the largest remaining logit error max|W beta' - W beta - b|.
    """
    w = state["head.weight"].double()  # (vocab, 2d)
    beta, b = state["final_norm.bias"].double(), state["head.bias"].double()
    shift = torch.linalg.lstsq(w, b[:, None]).solution[:, 0]  # (2d,)
    residual = float((w @ shift - b).abs().max())
    folded = dict(state)
    folded["final_norm.bias"] = (beta + shift).to(state["final_norm.bias"].dtype)
    folded["head.bias"] = torch.zeros_like(state["head.bias"])
    return folded, residual


def _head_bias_for_hf(state: dict[str, torch.Tensor], fold_bias: bool | None) -> dict[str, torch.Tensor]:
    """Fold the head bias when asked, or (None) when the installed transformers would drop it."""
    bias_max = float(state["head.bias"].abs().max())
    drops = hf_applies_head_bias() is False
    if fold_bias is None:
        fold_bias = drops and bias_max > 0
        explicit = False
    else:
        explicit = True
    if not fold_bias:
        if drops and bias_max > 0:
            warnings.warn(f"to_hf: the installed transformers ignores lm_head.bias (max |bias| {bias_max:.3g}); "
                          "its logits will lack it, transformers 4.x adds it", stacklevel=3)
        return state
    folded, residual = fold_head_bias(state)
    if residual <= 1e-6 * (1.0 + bias_max):
        return folded
    message = (f"the head bias cannot be folded into the final LayerNorm exactly (residual {residual:.2e}): "
               f"the head weight has rank < vocab_size (vocab {state['head.bias'].numel()} vs 2 * d_model "
               f"{state['final_norm.bias'].numel()})")
    if explicit:
        raise ConversionError(message + "; write it with fold_bias=False (CLI: --fold-bias no)")
    warnings.warn(f"to_hf: {message}; writing lm_head.bias as it is, which the installed transformers ignores",
                  stacklevel=3)
    return state


def to_hf(model, directory: str | Path, *, strict: bool = True, fold_bias: bool | None = None) -> Path:
    """Write `model` as an HF Reformer directory (config.json, model.safetensors).

    strict: raise when HF would compute something else than our model (see
        `differences_from_hf`); strict=False writes anyway and warns.
    fold_bias: fold the head bias into the final LayerNorm bias, for
        transformers versions that ignore `lm_head.bias`; exact only when
        the head weight has full row rank (vocab <= 2 d_model), else an
        error. None = fold when the installed transformers ignores the bias,
        the bias is not zero and folding is exact; otherwise warn.
    """
    from safetensors.torch import save_file

    config = model.config
    differences = differences_from_hf(config)
    if any("do not exist" in d or "two-dimensional" in d for d in differences):
        raise ConversionError("HF cannot hold this model: " + "; ".join(differences))
    if differences and strict:
        raise ConversionError("HF would compute something else than this model: " + "; ".join(differences)
                              + ". Convert a model built with these options, or pass strict=False "
                              "(CLI: --allow-differences) to write it anyway")
    for difference in differences:
        warnings.warn(f"to_hf: {difference}", stacklevel=2)
    state = _head_bias_for_hf({k: v.detach().float() for k, v in model.state_dict().items()}, fold_bias)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / "model.safetensors.tmp"
    save_file(state_dict_to_hf(state, config), str(tmp_weights), metadata={"format": "pt"})
    tmp_config = directory / "config.json.tmp"
    tmp_config.write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    tmp_weights.replace(directory / "model.safetensors")
    tmp_config.replace(directory / "config.json")
    return directory
