"""The KV cache: an explicit pytree passed into and returned from every forward.

Layout: ``k, v: [L, B, K, S, H]`` (layers, batch, kv heads, slots, head dim: heads-major, the
layout attention over many queries wants on a TPU; stored slots-major, the compiler relaid the
whole cache out around every verification step), or, for unrolled layers, a tuple of ``L``
per-layer buffers ``[B, K, S, H]`` (``per_layer``, the default for unrolled layers at batch > 1:
a layer's attention then reads its own buffer, where a slice of the stacked one is a copy on
XLA:CPU, 23 % of a batch-64 distiller step in benchmarks/results/refill_step_long.md), and
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
    k: jax.Array | tuple  # [L, B, K, S, H], or L buffers [B, K, S, H] (per layer)
    v: jax.Array | tuple  # the same
    lengths: jax.Array  # [B] int32

    @property
    def per_layer(self) -> bool:
        return is_per_layer(self.k)

    @property
    def dims(self) -> tuple:
        """``(L, B, K, S, H)`` in either layout."""
        return kv_dims(self.k)

    @property
    def buffer_shape(self) -> tuple:
        """The shape of one stored buffer: ``[L, B, K, S, H]``, or ``[B, K, S, H]`` per layer."""
        return tuple((self.k[0] if self.per_layer else self.k).shape)

    @property
    def max_len(self) -> int:
        return self.dims[3]

    @property
    def batch_size(self) -> int:
        return self.dims[1]

    @classmethod
    def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None,
             per_layer: bool | None = None) -> KVCache:
        """An empty cache of ``max_len`` slots per row (the dtype defaults to the compute dtype).
        ``per_layer`` stores one buffer per layer; scanned layers need the stacked one. The
        default is per layer for unrolled layers and more than one row: at batch 1 XLA:CPU drops
        the unit batch axis before attention's products and duplicated each layer's in-place
        write into the product's operand, copying the buffer twice per layer per step, more
        than the stack's one layer slice (tests/test_model.py checks the HLO)."""
        dtype = dtype or jnp.dtype(cfg.dtype)
        if per_layer is None:
            per_layer = not cfg.scan_layers and batch_size > 1
        if per_layer and cfg.scan_layers:
            raise ValueError("a per-layer KV cache needs unrolled layers (scan_layers=False)")
        if per_layer:
            shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
            zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
        else:
            shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
            zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch_size,), jnp.int32))

    def row(self, row) -> KVCache:
        """Row ``row`` (a traced index) as a batch-1 cache with no committed tokens."""
        def sl(buf, axis):
            return jax.lax.dynamic_slice_in_dim(buf, row, 1, axis=axis)
        return KVCache(_map(sl, self.k), _map(sl, self.v), jnp.zeros((1,), jnp.int32))

    def put_row(self, row, one: KVCache, length) -> KVCache:
        """Write the batch-1 cache ``one`` into row ``row``, holding ``length`` tokens."""
        def put(buf, new, axis):
            return jax.lax.dynamic_update_slice_in_dim(buf, new, row, axis=axis)
        return KVCache(_map(put, self.k, one.k), _map(put, self.v, one.v),
                       self.lengths.at[row].set(length))

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
            if is_per_layer(cache):  # per layer: the same writes, layer by layer
                picked = picked.transpose(0, 1, 3, 2, 4).astype(cache[0].dtype)
                out = []
                for layer, buf in enumerate(cache):
                    for b in range(B):
                        buf = jax.lax.dynamic_update_slice(buf, picked[layer, b: b + 1],
                                                           (b, 0, self.lengths[b], 0))
                    out.append(buf)
                return tuple(out)
            picked = picked.transpose(0, 1, 3, 2, 4).astype(cache.dtype)  # [L, B, K, P, H]
            for b in range(B):
                cache = jax.lax.dynamic_update_slice(cache, picked[:, b: b + 1],
                                                     (0, b, 0, self.lengths[b], 0))
            return cache

        return KVCache(k=put(self.k, tree_k), v=put(self.v, tree_v),
                       lengths=self.lengths + n.astype(jnp.int32))


def is_per_layer(cache) -> bool:
    """Whether a cache's keys (or values) are a tuple of per-layer buffers, not one stack."""
    return isinstance(cache, (tuple, list))


def kv_dims(cache) -> tuple:
    """``(L, B, K, S, H)`` of a stacked cache buffer or a tuple of per-layer ones."""
    if is_per_layer(cache):
        return (len(cache),) + tuple(cache[0].shape)
    return tuple(cache.shape)


def layer_buffer(cache, layer) -> jax.Array:
    """Layer ``layer``'s keys or values ``[B, K, S, H]``: its own buffer when stored per layer
    (``layer`` a Python int), else read out of the stack (a copy on XLA:CPU)."""
    if is_per_layer(cache):
        return cache[layer]
    return jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)


def _map(f, buffers, *others):
    """``f(buffer, *other, axis)`` on a stacked buffer (rows on axis 1) or each per-layer one
    (rows on axis 0)."""
    if is_per_layer(buffers):
        return tuple(f(b, *(o[i] for o in others), 0) for i, b in enumerate(buffers))
    return f(buffers, *others, 1)


def write_chunk(cache, new: jax.Array, layer, starts: jax.Array):
    """Write one layer's new keys or values ``new: [B, T, K, H]`` into the stacked
    ``cache: [L, B, K, S, H]`` at layer ``layer`` and row offsets ``starts: [B]`` (or, per
    layer, into that layer's buffer of the tuple; ``layer`` is then a Python int).

    Only the ``T`` new slots are written, in place, one ``dynamic_update_slice`` per row: slicing
    the layer out and writing it back made XLA:CPU copy the whole stacked cache twice per layer
    per step, and a scatter made the TPU compiler keep the cache slots-major around the step and
    relay it out for the tree attention (benchmarks/results/step_cost.md). The caller sizes the
    cache so that ``starts + T`` fits (``check_lengths``): an update past the end is clamped."""
    B, T = new.shape[:2]
    if is_per_layer(cache):
        buf = cache[layer]
        upd = new.astype(buf.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]
        for b in range(B):
            buf = jax.lax.dynamic_update_slice(buf, upd[b: b + 1], (b, 0, starts[b], 0))
        return tuple(cache[:layer]) + (buf,) + tuple(cache[layer + 1:])
    upd = new.astype(cache.dtype).transpose(0, 2, 1, 3)[None]  # [1, B, K, T, H]
    for b in range(B):
        cache = jax.lax.dynamic_update_slice(cache, upd[:, b: b + 1], (layer, b, 0, starts[b], 0))
    return cache
