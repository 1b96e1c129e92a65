"""Flax modules: the Llama-family base model, Medusa heads and the KV cache."""

from medusa_jax.model.cache import KVCache
from medusa_jax.model.llama import (
    LlamaModel,
    convert_layout,
    init_params,
    stack_layers,
    unstack_layers,
)

__all__ = ["KVCache", "LlamaModel", "convert_layout", "init_params", "stack_layers", "unstack_layers"]
