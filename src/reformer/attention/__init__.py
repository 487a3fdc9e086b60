"""Attention cores as pure tensor functions, and their slow references."""

from .backend import BACKENDS, BackendError, use_backend
from .full import full_attention
from .local import local_attention
from .sliding import sliding_window_attention
from .lsh import hash_vectors, lsh_attention, n_buckets_for_length, random_rotations, rotation_size, total_buckets

__all__ = [
    "BACKENDS",
    "BackendError",
    "full_attention",
    "hash_vectors",
    "local_attention",
    "lsh_attention",
    "n_buckets_for_length",
    "random_rotations",
    "rotation_size",
    "sliding_window_attention",
    "total_buckets",
    "use_backend",
]
