"""Pallas kernels for the committed-prefix part of :func:`medusa_jax.model.attention.attention`.

Both read the stacked heads-major cache ``[L, B, K, S, H]`` in place (the layer is a scalar
operand, so no layer slice is materialised), fold the ``T`` new queries of each kv head's ``G``
query heads into one ``[G * T, H]`` query block (a verification step's 64 tree queries become a
matrix product per K/V block instead of 64 vector products), read only the blocks below each
row's length, and return the online-softmax state ``(max, denominator, unnormalised output)``
so the caller merges it with the new tokens' dense block by log-sum-exp.

* :func:`prefix_state_gpu` (Triton through Pallas): one program per (row, kv head, split of
  the slots), a loop over the split's live blocks; splits are merged afterwards (flash-decoding:
  with batch 1 and 32 kv heads, splitting the slots is what fills an H200's 132 SMs).
* :func:`prefix_state_tpu` (Mosaic): grid (row, kv head, block) with the lengths prefetched as
  scalars; a block past a row's length maps to the row's last live block (the pipeline issues
  no new copy for a repeated block index) and is skipped, as the ragged/paged TPU kernels do.

Off their hardware both run in Pallas interpret mode (the CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30


def query_rows(T: int, G: int) -> int:
    """Rows of the folded query block: ``G * T`` padded to a power of two >= 16 (the smallest
    matrix a Triton dot takes; a multiple of 8 sublanes on a TPU)."""
    return max(16, 1 << max(G * T - 1, 0).bit_length())


def _fold(q, K):
    """``q: [B, T, N, H]`` -> ``[B, K, Tq, H]`` (rows g-major: row ``g * T + t``), padded."""
    B, T, N, H = q.shape
    G = N // K
    qf = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    Tq = query_rows(T, G)
    return jnp.pad(qf, ((0, 0), (0, 0), (0, Tq - G * T), (0, 0)))


def _unfold(x, T, G):
    """``[B, K, Tq, ...]`` -> ``[B, K, G, T, ...]`` (drops the padding rows)."""
    B, K = x.shape[:2]
    return x[:, :, : G * T].reshape(B, K, G, T, *x.shape[3:])


def _online(q, kb, vb, valid, scale, m, denom, acc):
    """One K/V block of the online softmax on ``[Tq, C]`` scores (shared by both kernels)."""
    s = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [Tq, C]
    s = jnp.where(valid, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jax.lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [Tq, H]
    return m_new, denom * corr + p.sum(axis=-1), acc * corr[:, None] + pv


# ------------------------------------------------------------------------------------ GPU
def _gpu_kernel(layer_ref, lim_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, block: int,
                split_len: int, scale: float):
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, limit = layer_ref[0], lim_ref[b]
    lo = sp * split_len
    n = jnp.clip(pl.cdiv(limit - lo, block), 0, split_len // block)
    q = q_ref[...]  # [Tq, H]
    Tq, H = q.shape

    def body(i, carry):
        start = lo + i * block
        kb = k_ref[layer, b, h, pl.ds(start, block), :]  # [C, H]
        vb = v_ref[layer, b, h, pl.ds(start, block), :]
        valid = (start + jnp.arange(block))[None, :] < limit
        return _online(q, kb.astype(q.dtype), vb.astype(q.dtype), valid, scale, *carry)

    init = (jnp.full((Tq,), _NEG, jnp.float32), jnp.zeros((Tq,), jnp.float32),
            jnp.zeros((Tq, H), jnp.float32))
    m, denom, acc = jax.lax.fori_loop(0, n, body, init)
    m_ref[...], l_ref[...], o_ref[...] = m, denom, acc


def gpu_splits(S: int, block: int, B: int, K: int, target_programs: int = 128) -> int:
    """Slot splits per (row, kv head): enough programs for the GPU's SMs, each split a whole
    number of blocks (a divisor of ``S // block``)."""
    blocks = S // block
    want = max(1, target_programs // max(B * K, 1))
    return max(d for d in range(1, blocks + 1) if blocks % d == 0 and d <= want)


@functools.partial(jax.jit, static_argnames=("T", "G", "block", "splits", "interpret"))
def prefix_state_gpu(q, k_cache, v_cache, layer, limit, *, T: int, G: int, block: int,
                     splits: int | None = None, interpret: bool = False):
    """``q: [B, T, N, H]``, caches ``[L, B, K, S, H]``, ``layer`` scalar, ``limit: [B]`` slots
    visible per row. Returns ``(m, denom, acc)`` as ``[B, K, G, T]``, same, ``[B, K, G, T, H]``
    (float32), the prefix's online-softmax state."""
    from jax.experimental.pallas import triton as plgpu

    L, B, K, S, H = k_cache.shape
    if S % block:
        raise ValueError(f"prefix block {block} does not divide the cache length {S}")
    splits = splits or gpu_splits(S, block, B, K)
    split_len = S // splits
    qf = _fold(q, K)
    Tq = qf.shape[2]
    whole = pl.BlockSpec()
    kern = functools.partial(_gpu_kernel, block=block, split_len=split_len,
                             scale=1.0 / math.sqrt(H))
    m, denom, acc = pl.pallas_call(
        kern,
        grid=(B, K, splits),
        in_specs=[whole, whole,  # whole arrays: the scalars, and the caches read in place
                  pl.BlockSpec((None, None, Tq, H), lambda b, h, s: (b, h, 0, 0)),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, Tq), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, Tq), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, Tq, H), lambda b, h, s: (b, h, s, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, splits, Tq), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, Tq), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, Tq, H), jnp.float32)],
        # Triton compiler parameters select the Triton backend (the default is Mosaic GPU)
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="medusa_prefix_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), limit.astype(jnp.int32), qf, k_cache, v_cache)
    # merge the splits (log-sum-exp): an empty split has max _NEG and contributes nothing
    mx = m.max(axis=2)
    corr = jnp.exp(m - mx[:, :, None])
    denom = (denom * corr).sum(axis=2)
    acc = (acc * corr[..., None]).sum(axis=2)
    return _unfold(mx, T, G), _unfold(denom, T, G), _unfold(acc, T, G)


# ------------------------------------------------------------------------------------ TPU
_LANES = 128


def _tpu_kernel(layer_ref, lim_ref, q_ref, k_ref, v_ref, m_out, l_out, o_out, m_sc, l_sc, acc_sc,
                *, block: int, scale: float):
    del layer_ref  # used by the index maps only
    b, j = pl.program_id(0), pl.program_id(2)
    limit = lim_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block < limit)
    def _block():
        q = q_ref[...]
        valid = (j * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)) < limit
        m, denom, acc = _online(q, k_ref[...].astype(q.dtype), v_ref[...].astype(q.dtype),
                                valid, scale, m_sc[:, 0], l_sc[:, 0], acc_sc[...])
        m_sc[...] = jnp.broadcast_to(m[:, None], m_sc.shape)
        l_sc[...] = jnp.broadcast_to(denom[:, None], l_sc.shape)
        acc_sc[...] = acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _out():
        m_out[...], l_out[...], o_out[...] = m_sc[...], l_sc[...], acc_sc[...]


@functools.partial(jax.jit, static_argnames=("T", "G", "block", "interpret"))
def prefix_state_tpu(q, k_cache, v_cache, layer, limit, *, T: int, G: int, block: int,
                     interpret: bool = False):
    """As :func:`prefix_state_gpu`, as a Mosaic TPU kernel (grid over blocks, scalar-prefetched
    lengths; dead blocks are neither copied nor computed)."""
    from jax.experimental.pallas import tpu as pltpu

    L, B, K, S, H = k_cache.shape
    if S % block:
        raise ValueError(f"prefix block {block} does not divide the cache length {S}")
    qf = _fold(q, K)
    Tq = qf.shape[2]

    def kv_map(b, h, j, layer_ref, lim_ref):
        last = jnp.maximum(pl.cdiv(lim_ref[b], block) - 1, 0)
        return layer_ref[0], b, h, jnp.minimum(j, last), 0

    def row_map(b, h, j, layer_ref, lim_ref):
        return b, h, 0, 0

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, S // block),
        in_specs=[pl.BlockSpec((None, None, Tq, H), row_map),
                  pl.BlockSpec((None, None, None, block, H), kv_map),
                  pl.BlockSpec((None, None, None, block, H), kv_map)],
        out_specs=[pl.BlockSpec((None, None, Tq, _LANES), row_map),
                   pl.BlockSpec((None, None, Tq, _LANES), row_map),
                   pl.BlockSpec((None, None, Tq, H), row_map)],
        scratch_shapes=[pltpu.VMEM((Tq, _LANES), jnp.float32),
                        pltpu.VMEM((Tq, _LANES), jnp.float32),
                        pltpu.VMEM((Tq, H), jnp.float32)],
    )
    m, denom, acc = pl.pallas_call(
        functools.partial(_tpu_kernel, block=block, scale=1.0 / math.sqrt(H)),
        grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct((B, K, Tq, _LANES), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, Tq, _LANES), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, Tq, H), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="medusa_prefix_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), limit.astype(jnp.int32), qf, k_cache, v_cache)
    return _unfold(m[..., 0], T, G), _unfold(denom[..., 0], T, G), _unfold(acc, T, G)
