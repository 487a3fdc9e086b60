"""reformer: Reformer (LSH attention, reversible layers) and friends, for very long sequences."""

from . import attention
from .config import ReformerConfig
from .model import ReformerLM, ReformerOutput

__version__ = "0.1.0"

__all__ = ["ReformerConfig", "ReformerLM", "ReformerOutput", "attention", "__version__"]
