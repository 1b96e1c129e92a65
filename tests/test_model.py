"""Invariants of the base model: cached decoding equals a full forward, batching is row-independent,
layer layouts convert losslessly, dtypes are honoured, and a tree-verification forward gives each
node the logits of a plain forward over its root-to-node path."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.config import tiny_config
from medusa_jax.model import KVCache, LlamaModel, init_params, llama, stack_layers, unstack_layers
from medusa_jax.tree import build_tree, get_tree

CUSTOM_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
REF_WIDTH = 32  # every reference full forward runs on [N, REF_WIDTH] tokens (one compile per N)


@functools.partial(jax.jit, static_argnums=0)
def full_forward(cfg, params, tokens):
    """Plain causal forward without a cache: hidden ``[B, T, D]`` and logits ``[B, T, V]``."""
    h, _ = llama.forward(cfg, params, tokens)
    return h, llama.logits(cfg, params, h)


@functools.partial(jax.jit, static_argnums=0)
def cached_forward(cfg, params, tokens, positions, cache, chunk_mask):
    """Forward through the cache (tokens written at ``cache.lengths``, lengths not advanced)."""
    h, cache = llama.forward(cfg, params, tokens, positions, cache, chunk_mask)
    return h, llama.logits(cfg, params, h), cache


def _pad(rows, width=REF_WIDTH):
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out)


@pytest.fixture(scope="module")
def scan_cfg():
    return tiny_config(scan_layers=True)


@pytest.fixture(scope="module")
def scan_params(tiny_params, tiny_cfg):
    return stack_layers(tiny_params, tiny_cfg.num_layers)


@pytest.fixture(scope="module")
def seq():
    return np.random.default_rng(0).integers(3, 128, size=12).astype(np.int32)


# ----------------------------------------------------------------------------- cache == full


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_cached_steps_equal_full_forward(scan, tiny_cfg, tiny_params, scan_cfg, scan_params, seq):
    """Prefill 5, one single step, a chunk of 3 under an explicit causal chunk mask, then 3 singles:
    every position's hidden state and logits equal one full forward over the 12 tokens."""
    cfg, params = (scan_cfg, scan_params) if scan else (tiny_cfg, tiny_params)
    full_h, full_l = full_forward(cfg, params, jnp.asarray(seq)[None])
    cache = KVCache.init(cfg, 1, 16, per_layer=not scan)  # unrolled: a KV buffer per layer
    pieces = [(0, 5, None), (5, 6, None), (6, 9, np.tril(np.ones((3, 3), bool)))]
    pieces += [(i, i + 1, None) for i in range(9, 12)]
    hs, ls = [], []
    for a, b, cm in pieces:
        assert int(cache.lengths[0]) == a
        h, lg, cache = cached_forward(cfg, params, jnp.asarray(seq[a:b])[None], None, cache,
                                      None if cm is None else jnp.asarray(cm))
        cache = cache.advance(jnp.array([b - a]))
        hs.append(h)
        ls.append(lg)
    h, lg = jnp.concatenate(hs, axis=1), jnp.concatenate(ls, axis=1)
    np.testing.assert_allclose(np.asarray(h), np.asarray(full_h), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(full_l), atol=1e-5, rtol=0)
    assert float(jnp.std(full_l)) > 1e-3  # the logits are not trivially constant
    assert cache.dims == (cfg.num_layers, 1, cfg.num_kv_heads, 16, cfg.head_dim)
    assert cache.per_layer == (not scan)


def test_ragged_batch_rows_are_independent(tiny_cfg, tiny_params):
    """Rows with different prompt lengths (right-padded, one batched prefill) then one more token
    per row through the cache: each row's logits equal running that row alone, unpadded."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (3, 11, 7)]
    nxt = [int(t) for t in rng.integers(3, 128, 3)]
    lens = jnp.array([len(p) for p in prompts], jnp.int32)
    tokens = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cache = KVCache.init(tiny_cfg, 3, 32)
    h, lg, cache = cached_forward(tiny_cfg, tiny_params, jnp.asarray(tokens), None, cache, None)
    last = np.asarray(lg)[np.arange(3), np.asarray(lens) - 1]  # [3, V]
    cache = cache.advance(lens)
    _, lg2, _ = cached_forward(tiny_cfg, tiny_params, jnp.asarray(nxt)[:, None], None, cache, None)
    for i, p in enumerate(prompts):
        _, alone = full_forward(tiny_cfg, tiny_params, jnp.asarray([p + [nxt[i]]]))
        np.testing.assert_allclose(last[i], np.asarray(alone)[0, len(p) - 1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(lg2)[i, 0], np.asarray(alone)[0, len(p)],
                                   atol=1e-5, rtol=0)
    # the rows really differ (a mix-up between rows would be caught)
    assert np.abs(last[0] - last[1]).max() > 1e-3


# ----------------------------------------------------------------------------- layouts, dtypes


def test_stack_unstack_roundtrip(tiny_cfg, tiny_params, scan_cfg, scan_params, seq):
    L = tiny_cfg.num_layers
    assert "layers" in scan_params and not any(k.startswith("layers_") for k in scan_params)
    # same tree structure and shapes as a scan model's own init
    fresh = jax.eval_shape(lambda: init_params(scan_cfg))  # shapes/dtypes only: no compute
    assert jax.tree.structure(fresh) == jax.tree.structure(scan_params)
    for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(scan_params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert scan_params["layers"]["attn"]["q_proj"].shape[0] == L
    back = unstack_layers(scan_params, L)
    assert jax.tree.structure(back) == jax.tree.structure(tiny_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tiny_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # idempotent on the layout they already have
    assert stack_layers(scan_params, L) is scan_params
    assert unstack_layers(tiny_params, L) is tiny_params
    # numpy weights (as loaders produce) stack too
    np_params = jax.tree.map(np.asarray, tiny_params)
    np_stacked = stack_layers(np_params, L)
    np.testing.assert_array_equal(np_stacked["layers"]["mlp"]["up_proj"],
                                  np.asarray(scan_params["layers"]["mlp"]["up_proj"]))
    h1, l1 = full_forward(tiny_cfg, tiny_params, jnp.asarray(seq)[None])
    h2, l2 = full_forward(scan_cfg, scan_params, jnp.asarray(seq)[None])
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-5, rtol=0)


def test_bf16_params_and_activations(tiny_cfg, tiny_params, seq):
    cfg16 = tiny_config(scan_layers=False, param_dtype="bfloat16", dtype="bfloat16")
    fresh = jax.eval_shape(lambda: init_params(cfg16))
    assert {a.dtype for a in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.bfloat16)}
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    h16, l16 = full_forward(cfg16, p16, jnp.asarray(seq)[None])
    _, l32 = full_forward(tiny_cfg, tiny_params, jnp.asarray(seq)[None])
    assert h16.dtype == jnp.bfloat16 and l16.dtype == jnp.float32
    l16, l32 = np.asarray(l16), np.asarray(l32)
    assert np.all(np.isfinite(l16))
    scale = np.abs(l32).max()
    err = np.abs(l16 - l32).max()
    assert err < 0.1 * scale, (err, scale)  # close ...
    assert err > 0  # ... but really computed in bf16
    # the cache follows the compute dtype
    cache = KVCache.init(cfg16, 1, 16)
    assert {a.dtype for a in jax.tree.leaves(cache.k)} == {jnp.dtype(jnp.bfloat16)}
    _, lc, cache = cached_forward(cfg16, p16, jnp.asarray(seq)[None, :5], None, cache, None)
    assert {a.dtype for a in jax.tree.leaves((cache.k, cache.v))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(np.asarray(lc)[0], l16[0, :5], atol=0.1 * scale, rtol=0)


# ----------------------------------------------------------------------------- tree verification


@pytest.mark.parametrize("tree_spec", ["mc_sim_7b_63", CUSTOM_TREE], ids=["mc_sim_7b_63", "custom"])
def test_tree_verification_matches_path_forwards(tree_spec, tiny_cfg, tiny_params):
    """After a prefill of prompts of different lengths (batch 2), one verification forward over
    random tree tokens (positions = length + depth, chunk mask = tree mask) gives every node the
    logits of a full forward over prompt + that node's root-to-node path."""
    tree = build_tree(get_tree(tree_spec))
    T = tree.num_nodes
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 128, n).tolist() for n in (9, 4)]
    B = len(prompts)
    tokens = np.zeros((B, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lens = jnp.array([len(p) for p in prompts], jnp.int32)
    cache = KVCache.init(tiny_cfg, B, 96)
    _, _, cache = cached_forward(tiny_cfg, tiny_params, jnp.asarray(tokens), None, cache, None)
    cache = cache.advance(lens)
    tree_tokens = rng.integers(3, 128, (B, T)).astype(np.int32)
    positions = lens[:, None] + jnp.asarray(tree.depth_offsets)[None]
    _, lg, _ = cached_forward(tiny_cfg, tiny_params, jnp.asarray(tree_tokens), positions, cache,
                              jnp.asarray(tree.attn_mask))
    lg = np.asarray(lg)  # [B, T, V]

    # reference: one batched plain forward, one row per (batch row, node)
    rows, at = [], []
    for b, p in enumerate(prompts):
        for i in range(T):
            chain = [j for j in range(T) if tree.attn_mask[i, j]]  # ancestors + self, in order
            assert len(chain) == tree.depth_offsets[i] + 1
            rows.append(p + [int(tree_tokens[b, j]) for j in chain])
            at.append(len(rows[-1]) - 1)
    _, ref = full_forward(tiny_cfg, tiny_params, _pad(rows))
    ref = np.asarray(ref)[np.arange(len(rows)), at].reshape(B, T, -1)
    np.testing.assert_allclose(lg, ref, atol=1e-4, rtol=0)
    # sanity: siblings see different contexts, so their logits differ
    assert np.abs(lg[:, 1] - lg[:, 2]).max() > 1e-4


def test_tree_verification_batch1(tiny_cfg, tiny_params):
    """Batch 1, the published tree, with the tree mask given per row (``[B, T, T]``)."""
    tree = build_tree(get_tree("mc_sim_7b_63"))
    T = tree.num_nodes
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, 128, 6).tolist()
    cache = KVCache.init(tiny_cfg, 1, 96)
    _, _, cache = cached_forward(tiny_cfg, tiny_params, jnp.asarray([prompt]), None, cache, None)
    cache = cache.advance(jnp.array([6]))
    toks = rng.integers(3, 128, (1, T)).astype(np.int32)
    positions = cache.lengths[:, None] + jnp.asarray(tree.depth_offsets)[None]
    _, lg, _ = cached_forward(tiny_cfg, tiny_params, jnp.asarray(toks), positions, cache,
                              jnp.asarray(tree.attn_mask)[None])
    rows = [prompt + [int(toks[0, j]) for j in range(T) if tree.attn_mask[i, j]] for i in range(T)]
    _, ref = full_forward(tiny_cfg, tiny_params, _pad(rows))
    ref = np.asarray(ref)[np.arange(T), [len(r) - 1 for r in rows]]
    np.testing.assert_allclose(np.asarray(lg)[0], ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- cache compaction


def test_commit_tree_appends_the_accepted_path():
    L, B, K, S, T = 2, 2, 3, 10, 5
    base = np.arange(L * B * K * S, dtype=np.float32).reshape(L, B, K, S, 1)
    tree = 1000 + np.arange(L * B * T * K, dtype=np.float32).reshape(L, B, T, K, 1)
    cache = KVCache(k=jnp.asarray(base), v=jnp.asarray(-base), lengths=jnp.array([2, 3], jnp.int32))
    path = jnp.array([[0, 2, 3], [0, 1, 4]], jnp.int32)
    out = cache.commit_tree(jnp.asarray(tree), jnp.asarray(-tree), path, jnp.array([3, 2], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out.lengths), [5, 5])
    exp = base.copy()
    exp[:, 0, :, 2:5] = tree[:, 0, [0, 2, 3]].transpose(0, 2, 1, 3)
    exp[:, 1, :, 3:6] = tree[:, 1, [0, 1, 4]].transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(np.asarray(out.k), exp)
    np.testing.assert_array_equal(np.asarray(out.v), -exp)


def test_verification_without_writes_equals_the_writing_forward(tiny_cfg, tiny_params):
    """``LlamaModel(write=False)`` leaves the cache alone and returns the tree's K/V; its hidden
    states equal the writing forward's, and its K/V are what that forward wrote."""
    tree = build_tree(get_tree(CUSTOM_TREE))
    rng = np.random.default_rng(5)
    B, T = 2, tree.num_nodes
    cache = KVCache.init(tiny_cfg, B, 64)
    prompt = jnp.asarray(rng.integers(3, 128, (B, 8)).astype(np.int32))
    _, _, cache = cached_forward(tiny_cfg, tiny_params, prompt, None, cache, None)
    cache = cache.advance(jnp.array([8, 5], jnp.int32))
    toks = jnp.asarray(rng.integers(3, 128, (B, T)).astype(np.int32))
    pos = cache.lengths[:, None] + jnp.asarray(tree.depth_offsets)[None]
    mask = jnp.asarray(tree.attn_mask)
    h_w, written = LlamaModel(tiny_cfg).apply({"params": tiny_params}, toks, pos, cache, mask)
    h_v, (same, (tk, tv)) = LlamaModel(tiny_cfg, write=False).apply(
        {"params": tiny_params}, toks, pos, cache, mask)
    np.testing.assert_allclose(np.asarray(h_v), np.asarray(h_w), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(same.k), np.asarray(cache.k))
    for b, n in enumerate((8, 5)):
        wk = np.asarray(written.k)[:, b, :, n: n + T].transpose(0, 2, 1, 3)  # [L, T, K, H]
        wv = np.asarray(written.v)[:, b, :, n: n + T].transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(np.asarray(tk)[:, b], wk)
        np.testing.assert_array_equal(np.asarray(tv)[:, b], wv)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_copies_neither_cache_nor_weights(batch, tiny_cfg, tiny_params):
    """Performance regression, checked on the compiled HLO (no timing): one decode step of the
    unrolled model writes its new K/V into the cache in place, reads each layer's keys and
    values where they are, and reads the projection weights where they are. Before, XLA:CPU copied the whole ``[L, B, S, K, H]`` cache twice per
    layer, plus q_proj and a transposed o_proj, every step: more memory traffic than the
    weights themselves on the default model."""
    cfg = tiny_cfg
    cache = KVCache.init(cfg, batch, 48).replace(lengths=jnp.full((batch,), 5, jnp.int32))

    @functools.partial(jax.jit, donate_argnums=1)  # as in the decode loops: updated in place
    def step(params, cache, tok):
        h, cache = llama.forward(cfg, params, tok, cache=cache)
        return llama.logits(cfg, params, h), cache

    hlo = step.lower(tiny_params, cache, jnp.ones((batch, 1), jnp.int32)).compile().as_text()
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"%(copy[\w.-]*) = \w+\[([\d,]*)\]", line)
        if m:
            shapes.append(tuple(int(d) for d in m.group(2).split(",") if d))
    assert shapes, "expected some (small) copies in the step; the HLO text format changed?"
    sizes = {int(np.prod(s)) for s in shapes}
    cache_size = int(np.prod(cache.dims))
    layer = tiny_params["layers_0"]["attn"]
    weight_sizes = {int(np.prod(np.shape(layer[n]))) for n in ("q_proj", "o_proj")}
    assert cache_size not in sizes, f"the decode step copies the whole KV cache: {shapes}"
    # with more than one row each layer reads its own KV buffer: nothing but the in-place
    # writes makes a layer-sized buffer (from a stacked cache, every layer's slice was copied
    # out before its attention: 23 % of a batch-64 distiller step)
    assert cache.per_layer == (batch > 1)
    if batch > 1:
        layer_size = cache_size // cfg.num_layers
        made = []
        for line in hlo[hlo.index("ENTRY"):].splitlines():
            m = re.search(r"%([\w.-]+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
            if (m and m.group(3) not in ("parameter", "bitcast")
                    and math.prod(int(d) for d in m.group(2).split(",") if d) == layer_size):
                made.append(m.group(1))
        assert made and all("dynamic-update-slice" in n for n in made), \
            f"the decode step copies a layer's keys or values: {made}"
    assert not (weight_sizes & sizes), f"the decode step copies projection weights: {shapes}"
