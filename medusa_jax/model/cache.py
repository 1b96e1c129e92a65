"""The KV cache: an explicit pytree passed into and returned from every forward.

Layout: ``k, v: [L, B, K, S, H]`` (layers, batch, kv heads, slots, head dim: heads-major, the
layout attention over many queries wants on a TPU; stored slots-major, the compiler relaid the
whole cache out around every verification step) and ``lengths: [B]`` — row ``b`` holds ``lengths[b]`` committed tokens in slots ``[0, lengths[b])``.
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
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of ``max_len`` slots per row (the dtype defaults to the compute dtype)."""
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
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

        One in-place ``dynamic_update_slice`` of ``P`` slots per row: no whole-cache copy or
        batch-axis transpose (a ``vmap`` of ``dynamic_update_slice`` over rows moved the batch
        axis to the front and back, and a scatter changed the cache's layout: whole-cache copies
        every step when compiled for a TPU).

        A row with ``n == 0`` writes zeros (its slots past ``lengths`` stay garbage either way).
        That select is what orders the write after the verification's reads of the cache: with
        a single-path tree (a chain) ``path`` is a constant, the written K/V do not depend on
        the last layer's read, and XLA copied the whole cache twice per step for K and for V
        (unrolled layers on CPU: 4 cache-sized copies per step)."""
        B, P = path.shape
        keep = (n > 0)[None, :, None, None, None]

        def put(cache, tree):
            picked = jnp.take_along_axis(tree, path[None, :, :, None, None], axis=2)  # [L, B, P, K, H]
            picked = jnp.where(keep, picked, 0)
            picked = picked.transpose(0, 1, 3, 2, 4).astype(cache.dtype)  # [L, B, K, P, H]
            for b in range(B):
                cache = jax.lax.dynamic_update_slice(cache, picked[:, b: b + 1],
                                                     (0, b, 0, self.lengths[b], 0))
            return cache

        return KVCache(k=put(self.k, tree_k), v=put(self.v, tree_v),
                       lengths=self.lengths + n.astype(jnp.int32))


def write_chunk(cache: jax.Array, new: jax.Array, layer, starts: jax.Array) -> jax.Array:
    """Write one layer's new keys or values ``new: [B, T, K, H]`` into the stacked
    ``cache: [L, B, K, S, H]`` at layer ``layer`` and row offsets ``starts: [B]``.

    Only the ``T`` new slots are written, in place, one ``dynamic_update_slice`` per row: slicing
    the layer out and writing it back made XLA:CPU copy the whole stacked cache twice per layer
    per step, and a scatter made the TPU compiler keep the cache slots-major around the step and
    relay it out for the tree attention (benchmarks/results/step_cost.md). The caller sizes the
    cache so that ``starts + T`` fits (``check_lengths``): an update past the end is clamped."""
    B, T = new.shape[:2]
    upd = new.astype(cache.dtype).transpose(0, 2, 1, 3)[None]  # [1, B, K, T, H]
    for b in range(B):
        cache = jax.lax.dynamic_update_slice(cache, upd[:, b: b + 1], (layer, b, 0, starts[b], 0))
    return cache
