"""reformer: Reformer (LSH attention, reversible layers) and friends, for very long sequences.

The names below are the public API. `reformer.train` and `reformer.generate` are the
functions (their modules stay importable as `from reformer.train import TrainConfig`).
"""

from . import attention
from .config import ReformerConfig
from .evaluate import evaluate_file
from .generate import generate
from .model import ReformerLM, ReformerOutput
from .train import TrainConfig, train

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
