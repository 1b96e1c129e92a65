"""Acceptance rules: pick, per row, the longest acceptable root-to-leaf path of the tree.

Inputs share one layout: ``tree_tokens [B, T]`` (node tokens in tree order), ``logits [B, T, V]``
(the base model's logits *at* each node, i.e. its prediction for the node's children) and the
static tree buffers. Outputs: ``best [B]`` (row of ``retrieve_indices``) and ``n [B]`` (accepted
tokens, root included, 1..depth+1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.tree import TreeBuffers


def _path_lengths(node_ok: jax.Array, tree: TreeBuffers) -> jax.Array:
    """``node_ok [B, T]`` (node's token accepted given its parent) -> accepted prefix length of
    every retrieve path ``[B, P]`` (root always counts)."""
    ridx = np.asarray(tree.retrieve_indices)  # [P, D+1]
    valid = ridx >= 0
    ok = jnp.take(node_ok, np.where(valid, ridx, 0), axis=1) & valid  # [B, P, D+1]
    ok = ok.at[:, :, 0].set(True)
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)  # [B, P]


def _parent_logits(logits: jax.Array, tree: TreeBuffers) -> jax.Array:
    parent = np.maximum(np.asarray(tree.parent), 0)
    return jnp.take(logits, parent, axis=1)  # [B, T, V]


def greedy_accept(tree_tokens, logits, tree: TreeBuffers):
    """A node is accepted iff its token is the argmax at its parent; longest path wins (first
    on ties). Equivalent to plain greedy decoding."""
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
    parent = np.maximum(np.asarray(tree.parent), 0)
    node_ok = tree_tokens == jnp.take(pred, parent, axis=1)
    lengths = _path_lengths(node_ok, tree)
    best = jnp.argmax(lengths, axis=-1)
    return best, jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]


def typical_accept(tree_tokens, logits, tree: TreeBuffers, temperature: float,
                   posterior_threshold: float, posterior_alpha: float):
    """The paper's typical acceptance: with ``p = softmax(logits / T)`` at the parent, accept
    ``x`` if ``p(x) > min(eps, delta * exp(-H(p)))``. Longest accepted prefix wins, ties broken
    by the accepted tokens' total log-likelihood."""
    plog = jax.nn.log_softmax(_parent_logits(logits, tree) / temperature, axis=-1)  # [B, T, V]
    entropy = -jnp.sum(jnp.exp(plog) * plog, axis=-1)  # [B, T]
    tok_logp = jnp.take_along_axis(plog, tree_tokens[..., None], axis=-1)[..., 0]  # [B, T]
    threshold = jnp.minimum(posterior_threshold, posterior_alpha * jnp.exp(-entropy))
    node_ok = jnp.exp(tok_logp) > threshold
    lengths = _path_lengths(node_ok, tree)  # [B, P]
    ridx = np.asarray(tree.retrieve_indices)
    steps = np.arange(ridx.shape[1])[None, None, :]
    lp = jnp.take(tok_logp, np.where(ridx >= 0, ridx, 0), axis=1)  # [B, P, D+1]
    lp = jnp.where((steps >= 1) & (steps < lengths[..., None]), lp, 0.0).sum(-1)
    # length dominates, likelihood only breaks ties (lp <= 0 and bounded by depth * max|logp|)
    score = lengths.astype(jnp.float32) * 1e6 + lp
    best = jnp.argmax(score, axis=-1)
    return best, jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
