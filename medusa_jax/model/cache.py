"""The KV cache: an explicit pytree passed into and returned from every forward.

Layout: ``k, v: [L, B, S, K, H]`` (layers, batch, slots, kv heads, head dim) and
``lengths: [B]`` — row ``b`` holds ``lengths[b]`` committed tokens in slots ``[0, lengths[b])``.
A forward over ``T`` new tokens writes them *tentatively* at slots ``[lengths[b], lengths[b]+T)``
and leaves ``lengths`` alone: the caller decides how many to keep (``advance``), or, for a
Medusa tree, which slots to keep (``commit_slots``). Slots past ``lengths`` are garbage that
the mask hides and the next write overwrites.
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

    def commit_slots(self, rel_slots: jax.Array, n: jax.Array) -> KVCache:
        """Keep a chosen subset of the tokens just written, moving them to be contiguous.

        ``rel_slots: [B, P]`` are slot offsets relative to ``lengths`` (the tree-node indices of
        the accepted path); entry ``p`` moves to slot ``lengths + p``. Exactly ``P`` slots are
        written per row (a static shape) and ``lengths`` advances by ``n: [B]``; the extra
        entries are garbage beyond the new length.
        """
        B, P = rel_slots.shape
        src = jnp.clip(self.lengths[:, None] + rel_slots, 0, self.max_len - 1)  # [B, P]
        dst_start = self.lengths

        def move(c):  # c: [L, B, S, K, H]
            picked = jnp.take_along_axis(c, src[None, :, :, None, None], axis=2)  # [L, B, P, K, H]

            def row(cb, pb, start):  # [L, S, K, H], [L, P, K, H]
                return jax.lax.dynamic_update_slice(cb, pb, (0, start, 0, 0))

            return jax.vmap(row, in_axes=(1, 1, 0), out_axes=1)(c, picked, dst_start)

        return KVCache(k=move(self.k), v=move(self.v), lengths=self.lengths + n.astype(jnp.int32))


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


def attention_mask(lengths: jax.Array, T: int, S: int, chunk_mask: jax.Array | None) -> jax.Array:
    """``[B, T, S]`` boolean mask for ``T`` new tokens written at ``lengths`` in a cache of ``S``
    slots: every committed slot is visible, and among the new ones what ``chunk_mask: [T, T]``
    (or ``[B, T, T]``) allows — causal when it is None, the tree mask for verification."""
    slots = jnp.arange(S)[None, None, :]  # [1, 1, S]
    rel = slots - lengths[:, None, None]  # [B, 1, S]
    committed = rel < 0
    in_chunk = (rel >= 0) & (rel < T)
    if chunk_mask is None:
        chunk_ok = rel <= jnp.arange(T)[None, :, None]  # causal: [B, T, S]
    else:
        cm = chunk_mask if chunk_mask.ndim == 3 else chunk_mask[None]
        cm = jnp.broadcast_to(cm, (lengths.shape[0], T, T))
        idx = jnp.clip(rel, 0, T - 1)  # [B, 1, S]
        chunk_ok = jnp.take_along_axis(cm, jnp.broadcast_to(idx, (lengths.shape[0], T, S)), axis=2)
    return committed | (in_chunk & chunk_ok)
