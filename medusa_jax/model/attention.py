"""Attention over a KV cache: the one entry point the decoder calls with a cache.

A forward over ``T`` new tokens (one decode step, a Medusa tree, a prompt) attends to two key
sets: the committed prefix in the cache (slots ``[0, lengths[b])`` of row ``b``, visible to every
new token) and the new tokens themselves (visible as ``chunk_mask: [T, T]`` allows: causal, or
the tree mask). The two parts are computed apart and merged with the usual running max /
log-sum-exp rule, so

* the prefix is read only up to the longest live row, in blocks of ``block`` slots (a
  ``fori_loop`` whose trip count is ``ceil(max(lengths) / block)``), never the whole static cache;
* scores exist one block at a time (``[B, K, G, T, block]``), never at ``[B, T, S]`` f32 size;
* the new tokens' keys/values need not be in the cache: a Medusa verification keeps its tree's
  K/V apart and commits only the accepted slots (``KVCache.commit_tree``), so the T tree writes
  never touch the cache's layout.

``impl`` picks who reads the prefix: ``"xla"`` (the loop above), ``"pallas_gpu"`` /
``"pallas_tpu"`` (the kernels of :mod:`medusa_jax.model.kernels`: the same state, merged with the
new tokens' dense block by the same rule; off their hardware they run in Pallas interpret mode),
or ``"auto"``: :data:`BACKEND_IMPL` by backend (the CPU keeps the XLA loop). ``"reference"`` is
the plain dense formulation (all ``S + T`` keys, one mask), kept as the test oracle.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medusa_jax.config import ATTENTION_IMPLS, ConfigError
from medusa_jax.model.cache import is_per_layer, layer_buffer

# The prefix is read in blocks of at most this many slots; a cache of up to this length is one
# block (one loop trip when any row is live).
PREFIX_BLOCK = 512
# New-token blocks above this size (long prompts) are processed causally in blocks too.
NEW_BLOCK = 256
_NEG = -1e30
IMPLS = ATTENTION_IMPLS
# What "auto" means per backend. The CPU keeps the XLA loop (what users here run). The TPU keeps
# it too: its program was measured through libtpu with no cache-sized copy
# (benchmarks/results/step_cost.md) and no TPU has run the kernel. The GPU keeps it as well: on
# an H200 the Triton kernel (``attention_impl="pallas_gpu"``) compiled, ran and was within 1 % of
# the XLA loop on the 7B shape at batch 1 (4.44 vs 4.42 ms a plain step, 5.95 vs 6.00 ms a
# 64-node verification; benchmarks/results/device_check.md), so every backend shares the loop.
BACKEND_IMPL = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# Prefix block the kernels read per step on their hardware (a divisor of the cache is taken).
KERNEL_BLOCK = {"pallas_gpu": 64, "pallas_tpu": 128}
# Folded query rows (T new tokens x G query heads per kv head) above this stay on the XLA loop:
# a long prompt's queries do not fit one kernel program; decode and verification steps do.
MAX_QUERY_ROWS = 512


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
    """The attention implementation ``impl`` stands for on ``backend`` (default: JAX's)."""
    if impl not in IMPLS:
        raise ConfigError(f"unknown attention impl {impl!r} ({', '.join(IMPLS)})")
    if impl != "auto":
        return impl
    return BACKEND_IMPL.get(backend or jax.default_backend(), "xla")


def kernel_block(impl: str, S: int) -> int:
    """The kernels' prefix block for a cache of ``S`` slots: the largest divisor of ``S`` up
    to :data:`KERNEL_BLOCK` (16 at least, a Triton dot's minimum, when ``S`` allows)."""
    want = KERNEL_BLOCK[impl]
    for b in (want, 128, 64, 32, 16, 8):
        if b <= want and S % b == 0:
            return b
    return S


def prefix_block_size(S: int) -> int:
    """Slots per prefix block for a cache of ``S`` slots (a divisor of ``S``)."""
    if S <= PREFIX_BLOCK:
        return S
    for b in (PREFIX_BLOCK, 256, 128, 64, 32, 16, 8):
        if S % b == 0:
            return b
    return S


def prefix_blocks(lengths: jax.Array, block: int) -> jax.Array:
    """Trip count of the prefix loop: blocks up to the longest live row."""
    return (jnp.max(lengths) + block - 1) // block


def _update(state, s, valid, vb, dt):
    """One online-softmax step. ``s: [B, K, G, T, C]`` f32 scores, ``valid`` broadcastable to
    it, ``vb: [B, K, C, H]``; ``state = (max [B,K,G,T], denominator [B,K,G,T], acc [B,K,G,T,H])``."""
    m, denom, acc = state
    s = jnp.where(valid, s, _NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgtc,bkch->bkgth", p.astype(dt), vb, preferred_element_type=jnp.float32)
    return m_new, denom * corr + p.sum(-1), acc * corr[..., None] + pv


def _scores(qg, kb, scale):
    # qg: [B, T, K, G, H], kb: [B, K, C, H] -> [B, K, G, T, C]
    return jnp.einsum("btkgh,bkch->bkgtc", qg, kb, preferred_element_type=jnp.float32) * scale


def attention(q, k_cache, v_cache, layer, lengths, k_new, v_new, chunk_mask=None, *,
              impl: str = "auto", block: int | None = None, new_in_cache: bool = False):
    """Attention of ``T`` new tokens over a cache prefix and themselves.

    ``q: [B, T, N, H]``; ``k_cache, v_cache``: the stacked cache ``[L, B, K, S, H]`` (layer
    ``layer`` is read), a tuple of per-layer buffers ``[B, K, S, H]`` (``layer`` a Python int:
    that layer's buffer is read as a stack of one, a free reshape, and only it rides through the
    attention loops: carried together, the other layers' buffers were copied) or None (no
    prefix); ``lengths: [B]`` committed slots per row;
    ``k_new, v_new: [B, T, K, H]``; ``chunk_mask``: ``[T, T]`` or ``[B, T, T]`` bool among the
    new tokens (None = causal). ``new_in_cache``: the new K/V are already written at slots
    ``[lengths, lengths + T)`` (a decode step or a prompt); then a short causal chunk is read
    with the prefix, in the same loop (one pass, no merge). Returns ``(out [B, T, N, H] in q's
    dtype, k_cache, v_cache)``: go on with these caches (the same values), not the ones passed
    in.
    """
    if is_per_layer(k_cache):
        out, kl, vl = _attention(q, k_cache[layer][None], v_cache[layer][None], 0, lengths,
                                 k_new, v_new, chunk_mask, impl=impl, block=block,
                                 new_in_cache=new_in_cache)
        k_cache = tuple(k_cache[:layer]) + (kl[0],) + tuple(k_cache[layer + 1:])
        v_cache = tuple(v_cache[:layer]) + (vl[0],) + tuple(v_cache[layer + 1:])
        return out, k_cache, v_cache
    return _attention(q, k_cache, v_cache, layer, lengths, k_new, v_new, chunk_mask, impl=impl,
                      block=block, new_in_cache=new_in_cache)


def _attention(q, k_cache, v_cache, layer, lengths, k_new, v_new, chunk_mask=None, *,
               impl: str = "auto", block: int | None = None, new_in_cache: bool = False):
    """:func:`attention` on a stacked cache."""
    impl = resolve_impl(impl)
    if impl == "reference":
        out = attention_reference(q, k_cache, v_cache, layer, lengths, k_new, v_new, chunk_mask)
        return out, k_cache, v_cache
    B, T, N, H = q.shape
    K = k_new.shape[2]
    G = N // K
    dt = q.dtype
    scale = 1.0 / math.sqrt(H)
    qg = q.reshape(B, T, K, G, H)
    kn, vn = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)  # [B, K, T, H]
    caches = (k_cache, v_cache)  # what goes back to the caller (the kernels only read them)
    state = (jnp.full((B, K, G, T), _NEG, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
             jnp.zeros((B, K, G, T, H), jnp.float32))

    with jax.named_scope("prefix"):
        if impl.startswith("pallas") and k_cache is not None and T * G <= MAX_QUERY_ROWS:
            # the kernel reads the committed prefix (a one-token step already written reads itself
            # there too); the new tokens follow below, merged by log-sum-exp
            one = new_in_cache and chunk_mask is None and T == 1
            state = _kernel_state(impl, q, k_cache, v_cache, layer, lengths + int(one), T, G, block)
            if one:
                _, denom, acc = state
                out = acc / denom[..., None]
                return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(dt), k_cache, v_cache
            k_cache = None  # the prefix is done: only the new tokens' block is left

        # a decode step (or a short causal chunk) already in the cache: read it with the prefix
        in_prefix = new_in_cache and chunk_mask is None and T <= NEW_BLOCK and k_cache is not None
        if k_cache is not None:
            S = k_cache.shape[3]
            C = block or prefix_block_size(S)
            # key slot s is visible to new token t iff s < lengths (+ t + 1 when read in the prefix)
            limit = lengths[:, None] + (jnp.arange(T)[None, :] + 1 if in_prefix else 0)  # [B, T]

            def prefix_step(i, carry):
                st, kc, vc = carry
                start = i * C
                kb = jax.lax.dynamic_slice(kc, (layer, 0, 0, start, 0), (1, B, K, C, H))[0]
                vb = jax.lax.dynamic_slice(vc, (layer, 0, 0, start, 0), (1, B, K, C, H))[0]
                valid = (start + jnp.arange(C))[None, None, :] < limit[:, :, None]  # [B, T, C]
                st = _update(st, _scores(qg, kb.astype(dt), scale), valid[:, None, None],
                             vb.astype(dt), dt)
                return st, kc, vc

            # The cache rides through the loop as carried state, and the caller goes on with the
            # loop's output: read from outside, it would be live after the loop and XLA would copy
            # the whole cache into the loop (measured: two cache-sized copies per layer per step).
            if C == S:  # one block: no loop (read from a loop, a scanned layer's cache was copied)
                state, k_cache, v_cache = prefix_step(0, (state, k_cache, v_cache))
            else:
                state, k_cache, v_cache = jax.lax.fori_loop(
                    0, prefix_blocks(limit[:, -1], C), prefix_step, (state, k_cache, v_cache))
            caches = (k_cache, v_cache)
            if in_prefix:
                _, denom, acc = state
                out = acc / denom[..., None]
                return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(dt), k_cache, v_cache

    with jax.named_scope("new_tokens"):
        if chunk_mask is None and T > NEW_BLOCK and T % NEW_BLOCK == 0:
            # a long prompt: causal over its own keys, one block of keys at a time
            C = NEW_BLOCK
            q_idx = jnp.arange(T)[:, None]

            def new_step(j, st):
                kb = jax.lax.dynamic_slice_in_dim(kn, j * C, C, axis=2)
                vb = jax.lax.dynamic_slice_in_dim(vn, j * C, C, axis=2)
                valid = (j * C + jnp.arange(C))[None, :] <= q_idx  # [T, C]
                return _update(st, _scores(qg, kb, scale), valid, vb, dt)

            state = jax.lax.fori_loop(0, T // C, new_step, state)
        else:
            if chunk_mask is None:
                mask = jnp.tril(jnp.ones((T, T), bool))[None]
            else:
                mask = jnp.asarray(chunk_mask, bool)
                mask = mask if mask.ndim == 3 else mask[None]  # [B or 1, T, T]
            state = _update(state, _scores(qg, kn, scale), mask[:, None, None], vn, dt)

    _, denom, acc = state
    out = acc / denom[..., None]  # every token sees itself: denom > 0
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(dt), caches[0], caches[1]


def _kernel_state(impl, q, k_cache, v_cache, layer, limit, T, G, block):
    """The prefix's online-softmax state from a Pallas kernel (interpret mode off its
    hardware)."""
    from medusa_jax.model import kernels

    S = k_cache.shape[3]
    C = block or kernel_block(impl, S)
    if impl == "pallas_gpu":
        return kernels.prefix_state_gpu(q, k_cache, v_cache, layer, limit, T=T, G=G, block=C,
                                        interpret=jax.default_backend() != "gpu")
    return kernels.prefix_state_tpu(q, k_cache, v_cache, layer, limit, T=T, G=G, block=C,
                                    interpret=jax.default_backend() != "tpu")


def attention_reference(q, k_cache, v_cache, layer, lengths, k_new, v_new, chunk_mask=None):
    """The dense formulation of :func:`attention`: all ``S + T`` keys, one ``[B, T, S + T]``
    mask, a plain softmax. The test oracle; memory grows with ``T x S``."""
    B, T, N, H = q.shape
    K = k_new.shape[2]
    dt = q.dtype
    if chunk_mask is None:
        cm = jnp.tril(jnp.ones((T, T), bool))[None]
    else:
        cm = jnp.asarray(chunk_mask, bool)
        cm = cm if cm.ndim == 3 else cm[None]
    cm = jnp.broadcast_to(cm, (B, T, T))
    if k_cache is not None:
        kc, vc = layer_buffer(k_cache, layer).astype(dt), layer_buffer(v_cache, layer).astype(dt)
        kc, vc = kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3)  # [B, S, K, H]
        S = kc.shape[1]
        committed = jnp.arange(S)[None, None, :] < lengths[:, None, None]  # [B, 1, S]
        keys, vals = jnp.concatenate([kc, k_new], 1), jnp.concatenate([vc, v_new], 1)
        mask = jnp.concatenate([jnp.broadcast_to(committed, (B, T, S)), cm], axis=2)
    else:
        keys, vals, mask = k_new, v_new, cm
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, keys).astype(jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskh->btkgh", probs, vals).reshape(B, T, N, H)
