"""Medusa candidate trees: predefined trees, validation, and the static buffers tree decoding uses.

A tree is a list of paths ("choices"). Path ``[a, b, c]`` is the node reached by taking rank ``a``
of head 0's top-k, then rank ``b`` of head 1, then rank ``c`` of head 2, all read at the last
accepted position. The root (node 0) is the token the base model itself predicts; a node whose
path has length d sits at depth d. (With Hydra heads a rank is the rank among the parent node's
candidates instead: head d runs on each depth-d node's own path; the ``TreeBuffers`` fields
``ancestors``, ``expand_nodes``, ``level_topk``, ``level_indices`` serve that.) Everything here is plain numpy so the buffers can be built once
on the host and handed to jitted code as constants.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medusa_jax.errors import MedusaError

_ASSET = Path(__file__).parent / "assets" / "medusa_trees.json"
DEFAULT_TREE = "mc_sim_7b_63"

TreePath = tuple[int, ...]


class TreeError(MedusaError):
    """A tree spec or tree is invalid; the message names the problem and the offending path."""


def _normalize(choices: object, where: str = "tree") -> list[TreePath]:
    """Turn a list of paths into a list of int tuples, rejecting non-list entries and empty paths."""
    if not isinstance(choices, (list, tuple)):
        raise TreeError(f"{where} must be a list of paths, got {type(choices).__name__}")
    out: list[TreePath] = []
    for entry in choices:
        if not isinstance(entry, (list, tuple)):
            raise TreeError(f"{where}: path {entry!r} is not a list of ranks")
        if len(entry) == 0:
            raise TreeError(f"{where}: empty path [] (the root is implicit, do not list it)")
        # bool is an int subclass; a True in a path is almost surely a data error.
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in entry):
            raise TreeError(f"{where}: path {list(entry)!r} contains a non-integer rank")
        out.append(tuple(int(r) for r in entry))
    return out


def load_tree_json(path: str | Path | None = None) -> dict[str, list[list[int]]]:
    """Load a ``{name: [path, ...]}`` JSON file; by default the nine trees shipped in the package."""
    path = Path(path) if path is not None else _ASSET
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TreeError(f"cannot read tree file {path}: {e}") from e
    if not isinstance(data, dict):
        raise TreeError(f"tree file {path} must hold a JSON object of name -> list of paths")
    return {k: [list(p) for p in _normalize(v, f"{path}[{k!r}]")] for k, v in data.items()}


PREDEFINED_TREES: dict[str, list[list[int]]] = load_tree_json()


def get_tree(spec: str | Path | Sequence[Sequence[int]]) -> list[list[int]]:
    """Resolve a tree spec to a list of paths.

    ``spec`` is a predefined tree name (see ``PREDEFINED_TREES``), a path to a JSON file holding
    either a list of paths or an object with key ``"choices"`` or ``"tree"``, or a list of paths.
    """
    if isinstance(spec, (str, Path)):
        if isinstance(spec, str) and spec in PREDEFINED_TREES:
            return [list(p) for p in PREDEFINED_TREES[spec]]
        file = Path(spec)
        if not file.is_file():
            names = ", ".join(sorted(PREDEFINED_TREES))
            raise TreeError(
                f"unknown tree {str(spec)!r}: not a predefined name ({names}) nor an existing file"
            )
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TreeError(f"tree file {file} is not valid JSON: {e}") from e
        if isinstance(data, dict):
            key = next((k for k in ("choices", "tree") if k in data), None)
            if key is None:
                raise TreeError(f"tree file {file}: JSON object needs a 'choices' or 'tree' key")
            data = data[key]
        return [list(p) for p in _normalize(data, f"tree file {file}")]
    return [list(p) for p in _normalize(spec)]


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Static buffers for one tree, all computed once by ``build_tree``; arrays are read-only.

    Nodes are ordered root first, then by (depth, path lexicographically); ``paths[i]`` is node
    i's path (``()`` for the root). With T nodes, P leaves, D = ``depth``, K = ``topk``:

    - ``attn_mask`` bool [T, T]: node i may attend to node j iff j is i or an ancestor of i.
    - ``tree_indices`` int32 [T]: index of each node's token in the flat candidate vector
      ``[root, head0_top0..head0_top(K-1), head1_top0.., ...]`` (length 1 + D*K); a node with
      path p of length d takes ``1 + (d-1)*K + p[-1]``, the root takes 0.
    - ``depth_offsets`` int32 [T]: depth of each node (added to the position id of the root).
    - ``retrieve_indices`` int32 [P, D+1]: one row per leaf (rows in node order of the leaf),
      node indices root -> leaf, padded with -1. ``retrieve_lengths`` int32 [P]: valid entries.
    - ``parent`` int32 [T]: parent node index, -1 for the root.
    - ``rank`` int32 [T]: last element of the path (the top-k rank in its head), -1 for the root.
    - ``num_children`` int32 [T]: number of children of each node (0 for leaves).

    For depth-by-depth drafting (Hydra heads: a node's rank is its rank among its parent's
    candidates), with depth d = 1..D in entry d-1 of each tuple:

    - ``ancestors`` int32 [T, D+1]: node indices root -> node (the node last), padded with -1.
    - ``expand_nodes`` tuple of int32 [P_d]: the nodes at depth d-1 that have children, in node
      order (head d-1 runs once over these).
    - ``level_topk`` tuple of int: how many candidates each of those nodes needs (max rank at
      depth d, plus one).
    - ``level_indices`` int32 [T]: a depth-d node's index into that depth's flat candidates
      ``[P_d * level_topk]`` (its parent's slot in ``expand_nodes`` times ``level_topk`` plus
      its rank); 0 for the root. Depth d's nodes are the contiguous ``level_slice(d)``.
    """

    paths: tuple[TreePath, ...]
    num_nodes: int
    depth: int
    topk: int
    attn_mask: np.ndarray
    tree_indices: np.ndarray
    depth_offsets: np.ndarray
    retrieve_indices: np.ndarray
    retrieve_lengths: np.ndarray
    parent: np.ndarray
    rank: np.ndarray
    num_children: np.ndarray
    ancestors: np.ndarray
    expand_nodes: tuple[np.ndarray, ...]
    level_topk: tuple[int, ...]
    level_indices: np.ndarray

    def level_slice(self, d: int) -> slice:
        """The nodes at depth ``d`` (contiguous: nodes are ordered by depth)."""
        lo = int(np.searchsorted(self.depth_offsets, d, side="left"))
        hi = int(np.searchsorted(self.depth_offsets, d, side="right"))
        return slice(lo, hi)

    @property
    def num_paths(self) -> int:
        """Number of root-to-leaf paths P (rows of ``retrieve_indices``)."""
        return int(self.retrieve_indices.shape[0])


def _validate(paths: list[TreePath], num_heads: int | None, topk: int | None) -> None:
    """Raise TreeError for negative/too-large ranks, duplicates, orphans, or too few heads."""
    if topk is not None and topk < 1:
        raise TreeError(f"top-k must be >= 1, got {topk}")
    for p in paths:
        for r in p:
            if r < 0:
                raise TreeError(f"negative rank {r} in path {list(p)}")
            if topk is not None and r >= topk:
                raise TreeError(f"rank {r} in path {list(p)} is >= top-k {topk}")
    seen: set[TreePath] = set()
    for p in paths:
        if p in seen:
            raise TreeError(f"duplicate path {list(p)}")
        seen.add(p)
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise TreeError(f"orphan path {list(p)}: its parent {list(p[:-1])} is not in the tree")
    depth = max((len(p) for p in paths), default=0)
    if num_heads is not None and depth > num_heads:
        raise TreeError(
            f"tree depth {depth} needs at least {depth} Medusa heads, the model has {num_heads}"
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def build_tree(
    choices: Sequence[Sequence[int]], num_heads: int | None = None, topk: int | None = None
) -> TreeBuffers:
    """Validate ``choices`` (list of paths) and compute its ``TreeBuffers``.

    ``num_heads``: if given, the tree depth must not exceed it. ``topk``: if given, every rank must
    be below it and it sets the flat-vector stride; otherwise the stride is max rank + 1.
    """
    paths = _normalize(choices)
    _validate(paths, num_heads, topk)
    order: list[TreePath] = [()] + sorted(paths, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(order)}
    t = len(order)
    depth = max((len(p) for p in paths), default=0)
    k = topk if topk is not None else max((r for p in paths for r in p), default=0) + 1

    parent = np.array([-1] + [index[p[:-1]] for p in order[1:]], dtype=np.int32)
    rank = np.array([-1] + [p[-1] for p in order[1:]], dtype=np.int32)
    depth_offsets = np.array([len(p) for p in order], dtype=np.int32)
    tree_indices = np.array([0] + [1 + (len(p) - 1) * k + p[-1] for p in order[1:]], dtype=np.int32)
    num_children = np.bincount(parent[1:], minlength=t).astype(np.int32)

    # Ancestors are prefixes of the path; a node's row is its parent's row plus itself, and node
    # order puts parents first, so one pass fills the mask.
    mask = np.zeros((t, t), dtype=bool)
    mask[0, 0] = True
    for i in range(1, t):
        mask[i] = mask[parent[i]]
        mask[i, i] = True

    leaves = [i for i in range(t) if num_children[i] == 0]
    retrieve = np.full((len(leaves), depth + 1), -1, dtype=np.int32)
    lengths = np.zeros(len(leaves), dtype=np.int32)
    for row, leaf in enumerate(leaves):
        chain = [index[order[leaf][:d]] for d in range(len(order[leaf]) + 1)]
        retrieve[row, : len(chain)] = chain
        lengths[row] = len(chain)

    ancestors = np.full((t, depth + 1), -1, dtype=np.int32)
    for i, p in enumerate(order):
        ancestors[i, : len(p) + 1] = [index[p[:j]] for j in range(len(p) + 1)]
    expand, level_topk = [], []
    level_indices = np.zeros(t, dtype=np.int32)
    for d in range(1, depth + 1):
        nodes = [i for i in range(t) if len(order[i]) == d]
        parents = sorted({int(parent[i]) for i in nodes})
        slot = {q: j for j, q in enumerate(parents)}
        kd = max(int(rank[i]) for i in nodes) + 1
        for i in nodes:
            level_indices[i] = slot[int(parent[i])] * kd + int(rank[i])
        expand.append(_frozen(np.asarray(parents, dtype=np.int32)))
        level_topk.append(kd)

    return TreeBuffers(
        paths=tuple(order),
        num_nodes=t,
        depth=depth,
        topk=k,
        attn_mask=_frozen(mask),
        tree_indices=_frozen(tree_indices),
        depth_offsets=_frozen(depth_offsets),
        retrieve_indices=_frozen(retrieve),
        retrieve_lengths=_frozen(lengths),
        parent=_frozen(parent),
        rank=_frozen(rank),
        num_children=_frozen(num_children),
        ancestors=_frozen(ancestors),
        expand_nodes=tuple(expand),
        level_topk=tuple(level_topk),
        level_indices=_frozen(level_indices),
    )


def trim_tree(choices: Sequence[Sequence[int]], max_nodes: int) -> list[list[int]]:
    """The first paths of ``choices`` (in their order, which for the published trees is their
    expected value) that keep every kept path's parent, up to ``max_nodes`` nodes with the
    root: a smaller tree of the same shape, e.g. for a larger batch."""
    if max_nodes < 1:
        raise TreeError(f"max_nodes must be >= 1, got {max_nodes}")
    kept: list[list[int]] = []
    have: set[tuple[int, ...]] = {()}
    for path in _normalize(choices):
        if 1 + len(kept) >= max_nodes:
            break
        if tuple(path[:-1]) in have:
            kept.append(list(path))
            have.add(tuple(path))
    return kept


def chain_tree(depth: int) -> list[list[int]]:
    """A single chain of top-1 guesses: ``[[0], [0, 0], ...]`` with ``depth`` nodes."""
    if depth < 0:
        raise TreeError(f"chain depth must be >= 0, got {depth}")
    return [[0] * d for d in range(1, depth + 1)]


def topk_tree(k: int) -> list[list[int]]:
    """Head 0's top-k only: ``[[0], [1], ..., [k-1]]`` (a depth-1 tree)."""
    if k < 0:
        raise TreeError(f"top-k must be >= 0, got {k}")
    return [[r] for r in range(k)]


def _check_accuracies(accuracies: object) -> np.ndarray:
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 2:
        raise TreeError(f"accuracies must be [num_heads, topk], got shape {acc.shape}")
    if not np.all((acc >= 0) & (acc <= 1)):
        raise TreeError("accuracies must be probabilities in [0, 1]")
    return acc


def best_nodes_tree(accuracies: object, n: int) -> list[list[int]]:
    """Pick the ``n`` parent-closed nodes of highest value under the independence model.

    ``accuracies`` [num_heads, topk]: ``accuracies[h][r]`` is the probability that head h's rank-r
    guess is right. A node's value is the product of accuracies along its path. Because values
    never grow along a path, best-first expansion from the root's children yields the optimal set.
    Returns paths in pick order (highest value first; ties broken by lexicographic path).
    """
    acc = _check_accuracies(accuracies)
    heads, k = acc.shape
    total = sum(k**d for d in range(1, heads + 1))
    if not 0 <= n <= total:
        raise TreeError(f"n={n} nodes requested; a {heads}-head top-{k} tree has {total} at most")
    frontier: list[tuple[float, TreePath]] = [(-float(acc[0, r]), (r,)) for r in range(k)]
    heapq.heapify(frontier)
    picked: list[list[int]] = []
    while len(picked) < n:
        neg_value, path = heapq.heappop(frontier)
        picked.append(list(path))
        if len(path) < heads:
            h = len(path)
            for r in range(k):
                heapq.heappush(frontier, (neg_value * float(acc[h, r]), path + (r,)))
    return picked


def expected_accept_length(choices: Sequence[Sequence[int]], accuracies: object) -> float:
    """Expected tokens accepted per step: 1 (the root) + sum of node values (independence model).

    ``accuracies`` [num_heads, topk] as in ``best_nodes_tree``; every path must fit inside it.
    """
    acc = _check_accuracies(accuracies)
    total = 1.0
    for p in _normalize(choices):
        if len(p) > acc.shape[0] or max(p) >= acc.shape[1] or min(p) < 0:
            raise TreeError(f"path {list(p)} is outside accuracies of shape {acc.shape}")
        total += float(np.prod(acc[np.arange(len(p)), list(p)]))
    return total
