"""reformer: Reformer (LSH attention, reversible layers) and friends, for very long sequences.

The names below are the public API. `reformer.train` and `reformer.generate` are modules that can be
called as their main function: `reformer.train(cfg, model_config)` is `reformer.train.train(...)`, and
`reformer.generate(model, ids)` is `reformer.generate.generate(...)`. Every other submodule
(`reformer.fetch`, `reformer.data`, `reformer.tokenizer`, `reformer.checkpoint`, ...) loads on first use.
"""

import importlib

from . import attention, generate, train
from .config import ReformerConfig
from .evaluate import evaluate_file
from .model import ReformerLM, ReformerOutput
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "ReformerConfig",
    "ReformerLM",
    "ReformerOutput",
    "TrainConfig",
    "attention",
    "evaluate_file",
    "generate",
    "train",
    "__version__",
]

_SUBMODULES = {"checkpoint", "cli", "compile", "data", "decoding", "distributed", "duplication", "fetch", "hf",
               "keep", "layers", "memory", "rng", "tokenizer"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'reformer' has no attribute {name!r}")
