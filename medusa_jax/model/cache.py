"""The KV cache: an explicit pytree passed into and returned from every forward.

Layout: ``k, v: [L, B, S, K, H]`` (layers, batch, slots, kv heads, head dim) and
``lengths: [B]`` — row ``b`` holds ``lengths[b]`` committed tokens in slots ``[0, lengths[b])``.
A forward over ``T`` new tokens writes them *tentatively* at slots ``[lengths[b], lengths[b]+T)``
and leaves ``lengths`` alone: the caller decides how many to keep (``advance``). A Medusa
verification does not write at all: its tree's K/V come back apart (``LlamaModel(write=False)``)
and ``commit_tree`` writes only the accepted path's slots. Slots past ``lengths`` are garbage
that attention never reads and the next write overwrites.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from medusa_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of ``max_len`` slots per row (the dtype defaults to the compute dtype)."""
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    def advance(self, n: jax.Array) -> KVCache:
        """Keep ``n[b]`` of the tokens just written to row ``b``."""
        return self.replace(lengths=self.lengths + n.astype(jnp.int32))

    def commit_tree(self, tree_k: jax.Array, tree_v: jax.Array, path: jax.Array,
                    n: jax.Array) -> KVCache:
        """Append an accepted tree path: ``tree_k, tree_v: [L, B, T, K, H]`` (the tree's K/V),
        ``path: [B, P]`` node indices (root first). Exactly ``P`` slots are written per row, at
        ``lengths + [0, P)`` (a static shape; entries past ``n`` are garbage beyond the new
        length) and ``lengths`` advances by ``n: [B]``.

        One in-place scatter of ``P`` slots per row: no whole-cache copy or batch-axis
        transpose (a ``vmap`` of ``dynamic_update_slice`` over rows moved the batch axis to the
        front and back, two whole-cache transposes per step when compiled for a TPU)."""
        B, P = path.shape
        rows = jnp.arange(B)[:, None]
        slots = jnp.clip(self.lengths[:, None] + jnp.arange(P)[None, :], 0, self.max_len - 1)

        def put(cache, tree):
            picked = jnp.take_along_axis(tree, path[None, :, :, None, None], axis=2)  # [L, B, P, K, H]
            return cache.at[:, rows, slots].set(picked.astype(cache.dtype), mode="promise_in_bounds")

        return KVCache(k=put(self.k, tree_k), v=put(self.v, tree_v),
                       lengths=self.lengths + n.astype(jnp.int32))


def write_chunk(cache: jax.Array, new: jax.Array, layer, starts: jax.Array) -> jax.Array:
    """Write one layer's new keys or values ``new: [B, T, K, H]`` into the stacked
    ``cache: [L, B, S, K, H]`` at layer ``layer`` and row offsets ``starts: [B]``.

    Only the ``T`` new slots are written, in place: slicing the layer out, updating it and
    writing the whole layer back made XLA copy the full stacked cache twice per layer per step
    on the CPU (as much memory traffic as reading the weights again)."""
    B, T = new.shape[:2]
    rows = jnp.arange(B)[:, None]
    slots = jnp.clip(starts[:, None] + jnp.arange(T)[None, :], 0, cache.shape[2] - 1)
    return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="promise_in_bounds")
