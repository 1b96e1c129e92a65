"""Acceptance rules: which root-to-leaf path of the tree a verification step keeps, and which
token starts the next step.

A rule is a small frozen (hashable) dataclass, passed inside the static settings of the jitted
loop, with two methods:

- ``first_root(logits [B, V], key, sampling) -> [B]``: the first step's root token, from the
  base model's logits after the prompt;
- ``accept(tree_tokens [B, T], logits [B, T, V], tree, sampling, key) -> (best, n, next_root)``:
  ``best [B]`` (a row of ``tree.retrieve_indices``), ``n [B]`` (accepted tokens, root included,
  1..depth+1) and ``next_root [B]`` (the token after the accepted path: the next step's root).

``logits[:, i]`` are the base model's logits *at* node ``i`` (its prediction for the node's
children). Adding a rule means adding a class here and a name in :data:`RULES`.

- :class:`Greedy`: a node is accepted iff it is the argmax at its parent: exactly greedy decoding.
- :class:`Typical`: the Medusa paper's typical acceptance (changes the output distribution).
- :class:`Lossless`: tree speculative sampling for deterministic drafts (EAGLE-2 / Sequoia style):
  the tokens produced have exactly the distribution of sampling from the base model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.decoding.sampling import SamplingConfig, filter_logits, sample
from medusa_jax.errors import MedusaError
from medusa_jax.tree import TreeBuffers


class AcceptanceError(MedusaError):
    """An unknown rule name or a rule parameter outside its range."""


# ------------------------------------------------------------------------- shared pieces
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


def _leaf(tree: TreeBuffers, best, n):
    """Node index of the last accepted token ``[B]``."""
    path = jnp.take(np.asarray(tree.retrieve_indices), best, axis=0)  # [B, D+1]
    return jnp.take_along_axis(path, (n - 1)[:, None], axis=1)[:, 0]


def _at(x, node):
    """``x [B, T, ...]`` at ``node [B]`` -> ``[B, ...]``."""
    return jnp.take_along_axis(x, node.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _TreeTables:
    """Static per-node tables the lossless walk needs (numpy, built once per tree)."""

    children: np.ndarray  # [T, C] child node indices in tree order, -1 padded
    node_row: np.ndarray  # [T] a retrieve row passing through the node


def _tables(tree: TreeBuffers) -> _TreeTables:
    T = tree.num_nodes
    kids: list[list[int]] = [[] for _ in range(T)]
    for i, p in enumerate(np.asarray(tree.parent)):
        if p >= 0:
            kids[p].append(i)
    C = max(1, max(len(k) for k in kids))
    children = np.full((T, C), -1, np.int32)
    for i, k in enumerate(kids):
        children[i, : len(k)] = k
    ridx = np.asarray(tree.retrieve_indices)
    node_row = np.zeros((T,), np.int32)
    for i in range(T):
        node_row[i] = int(np.argmax((ridx == i).any(axis=1)))
    return _TreeTables(children, node_row)


# --------------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Greedy:
    """Accept a node iff its token is the argmax at its parent; the longest such path wins
    (the first on ties). Output equals plain greedy decoding; the sampling settings are unused."""

    name = "greedy"

    def first_root(self, logits, key, sampling: SamplingConfig):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def accept(self, tree_tokens, logits, tree: TreeBuffers, sampling: SamplingConfig, key):
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
        parent = np.maximum(np.asarray(tree.parent), 0)
        node_ok = tree_tokens == jnp.take(pred, parent, axis=1)
        lengths = _path_lengths(node_ok, tree)
        best = jnp.argmax(lengths, axis=-1)
        n = jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
        return best, n, _at(pred, _leaf(tree, best, n))


@dataclasses.dataclass(frozen=True)
class Typical:
    """The Medusa paper's typical acceptance. With ``p = softmax(logits / T)`` at the parent and
    ``H(p) = -sum p log p`` (natural log), a node's token ``x`` is accepted iff
    ``p(x) > min(threshold, alpha * exp(-H(p)))``. The longest accepted prefix wins, ties broken
    by the accepted tokens' total log-likelihood; the next root is sampled from the base model's
    (temperature, top-k, top-p filtered) distribution after the path. At temperature 0: greedy.

    ``threshold`` (epsilon, default 0.09) caps the bar for peaked distributions; ``alpha``
    (delta, default 0.3) scales it down as the entropy grows, so flat distributions accept more
    candidates. Lower values accept more (longer steps, further from the base distribution)."""

    threshold: float = 0.09
    alpha: float = 0.3
    name = "typical"

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise AcceptanceError(f"typical acceptance threshold (posterior_threshold, epsilon) "
                                  f"must be in (0, 1], got {self.threshold!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise AcceptanceError(f"typical acceptance alpha (posterior_alpha, delta) must be a "
                                  f"finite number > 0, got {self.alpha!r}")

    def first_root(self, logits, key, sampling: SamplingConfig):
        return sample(logits, key, sampling)

    def accept(self, tree_tokens, logits, tree: TreeBuffers, sampling: SamplingConfig, key):
        if sampling.greedy:
            return Greedy().accept(tree_tokens, logits, tree, sampling, key)
        plog = jax.nn.log_softmax(_parent_logits(logits, tree).astype(jnp.float32)
                                  / sampling.temperature, axis=-1)  # [B, T, V]
        entropy = -jnp.sum(jnp.exp(plog) * plog, axis=-1)  # [B, T]
        tok_logp = jnp.take_along_axis(plog, tree_tokens[..., None], axis=-1)[..., 0]  # [B, T]
        bar = jnp.minimum(self.threshold, self.alpha * jnp.exp(-entropy))
        node_ok = jnp.exp(tok_logp) > bar
        lengths = _path_lengths(node_ok, tree)  # [B, P]
        ridx = np.asarray(tree.retrieve_indices)
        steps = np.arange(ridx.shape[1])[None, None, :]
        lp = jnp.take(tok_logp, np.where(ridx >= 0, ridx, 0), axis=1)  # [B, P, D+1]
        lp = jnp.where((steps >= 1) & (steps < lengths[..., None]), lp, 0.0).sum(-1)
        # the longest paths, and among them the likeliest (first on exact ties)
        longest = lengths == jnp.max(lengths, axis=-1, keepdims=True)
        best = jnp.argmax(jnp.where(longest, lp, -jnp.inf), axis=-1)
        n = jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
        return best, n, sample(_at(logits, _leaf(tree, best, n)), key, sampling)


@dataclasses.dataclass(frozen=True)
class Lossless:
    """Tree speculative sampling for deterministic drafts: output distributed exactly as
    sampling from the base model (temperature, top-k and top-p as vanilla sampling uses them).

    At a node with target distribution ``p`` and children ``x_1 .. x_m`` (tree order): start with
    ``r = p``; accept ``x_i`` with probability ``r(x_i)``, and on acceptance descend into it; on
    rejection set ``r(x_i) = 0`` and renormalise. When every child is rejected (or the node is a
    leaf) the next token is drawn from ``r`` and becomes the next step's root. Drafts of one node
    are distinct tokens, so ``r(x_i) = p(x_i) / (1 - p(x_1) - .. - p(x_{i-1}))``: every node's
    decisions are computed at once, then the walk follows them from the root. At temperature 0
    this is greedy."""

    name = "lossless"

    def first_root(self, logits, key, sampling: SamplingConfig):
        return sample(logits, key, sampling)

    def accept(self, tree_tokens, logits, tree: TreeBuffers, sampling: SamplingConfig, key):
        if sampling.greedy:
            return Greedy().accept(tree_tokens, logits, tree, sampling, key)
        tab = _tables(tree)
        B, T = tree_tokens.shape
        probs = jax.nn.softmax(filter_logits(logits, sampling), axis=-1)  # [B, T, V]
        kids = tab.children  # [T, C]
        has = kids >= 0
        kid_tok = jnp.take(tree_tokens, np.where(has, kids, 0), axis=1)  # [B, T, C]
        pk = jnp.take_along_axis(probs, kid_tok, axis=-1) * has  # p(x_i) at each parent
        before = jnp.cumsum(pk, axis=-1) - pk  # mass of the earlier (rejected) siblings
        q = jnp.clip(pk / jnp.maximum(1.0 - before, 1e-30), 0.0, 1.0)
        k_u, k_draw = jax.random.split(key)
        u = jax.random.uniform(k_u, pk.shape)
        ok = (u < q) & has
        first = jnp.argmax(ok, axis=-1)  # [B, T]
        kid_at = jnp.take_along_axis(jnp.asarray(kids)[None], first[..., None], axis=-1)[..., 0]
        chosen = jnp.where(ok.any(-1), kid_at, -1)  # [B, T] the child taken at each node
        node = jnp.zeros((B,), jnp.int32)
        for _ in range(tree.depth):
            nxt = _at(chosen, node)
            node = jnp.where(nxt >= 0, nxt, node)
        n = jnp.take(np.asarray(tree.depth_offsets), node) + 1
        best = jnp.take(tab.node_row, node)
        # residual at the last accepted node: its children (all rejected) removed
        p = _at(probs, node)  # [B, V]
        V = p.shape[-1]
        idx = jnp.where(jnp.asarray(has)[node], _at(kid_tok, node), V)  # [B, C], V = no child
        drop = jnp.zeros(p.shape, bool).at[jnp.arange(B)[:, None], idx].set(True, mode="drop")
        r = jnp.where(drop, 0.0, p)
        mass = r.sum(-1, keepdims=True)
        r = jnp.where(mass > 1e-12, r, p)  # all mass on rejected children: a null event
        next_root = jax.random.categorical(k_draw, jnp.log(r), axis=-1).astype(jnp.int32)
        return best, n, next_root


RULES = {"greedy": Greedy, "typical": Typical, "lossless": Lossless}
Rule = Greedy | Typical | Lossless


def get_rule(acceptance, threshold: float | None = None, alpha: float | None = None):
    """A rule object from a name (``greedy``, ``typical``, ``lossless``) or a rule; ``threshold``
    and ``alpha`` configure :class:`Typical` given by name."""
    if isinstance(acceptance, tuple(RULES.values())):
        return acceptance
    if not isinstance(acceptance, str) or acceptance not in RULES:
        raise AcceptanceError(f"unknown acceptance rule {acceptance!r}: use one of "
                              f"{', '.join(RULES)}")
    if acceptance == "typical":
        kw = {k: v for k, v in (("threshold", threshold), ("alpha", alpha)) if v is not None}
        return Typical(**kw)
    return RULES[acceptance]()

