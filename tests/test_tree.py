"""Tests for medusa_jax.tree: predefined trees, static buffers, generated trees, validation."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from medusa_jax.tree import (
    DEFAULT_TREE,
    PREDEFINED_TREES,
    TreeError,
    best_nodes_tree,
    build_tree,
    chain_tree,
    expected_accept_length,
    get_tree,
    load_tree_json,
    topk_tree,
)

TREE_NAMES = sorted(PREDEFINED_TREES)


def test_nine_trees_shipped():
    assert len(PREDEFINED_TREES) == 9
    assert DEFAULT_TREE in PREDEFINED_TREES
    assert load_tree_json() == PREDEFINED_TREES


def test_module_does_not_import_jax():
    # The tree module must stay host-only; a fresh interpreter shows what it pulls in.

    code = "import sys, medusa_jax.tree; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", TREE_NAMES)
def test_predefined_tree_buffers(name):
    tb = build_tree(get_tree(name), num_heads=4, topk=10)
    t = tb.num_nodes
    assert t == 64 and len(tb.paths) == 64
    assert tb.depth <= 4 and tb.topk == 10
    paths = tb.paths
    assert paths[0] == ()
    assert list(paths[1:]) == sorted(paths[1:], key=lambda p: (len(p), p))

    # Brute-force ancestor relation from the paths.
    brute = np.array([[paths[i][: len(paths[j])] == paths[j] for j in range(t)] for i in range(t)])
    np.testing.assert_array_equal(tb.attn_mask, brute)
    assert tb.attn_mask.dtype == bool and tb.attn_mask.shape == (t, t)
    assert np.all(np.diag(tb.attn_mask))
    assert not np.any(np.triu(tb.attn_mask, k=1))

    # tree_indices decode back to (head, rank) = (len(p) - 1, p[-1]).
    assert tb.tree_indices.dtype == np.int32 and tb.tree_indices[0] == 0
    for i in range(1, t):
        head, rank = divmod(int(tb.tree_indices[i]) - 1, tb.topk)
        assert (head, rank) == (len(paths[i]) - 1, paths[i][-1])
    assert tb.tree_indices.max() < 1 + tb.depth * tb.topk

    np.testing.assert_array_equal(tb.depth_offsets, [len(p) for p in paths])
    for i in range(1, t):
        assert paths[tb.parent[i]] == paths[i][:-1]
        assert tb.rank[i] == paths[i][-1]
    assert tb.parent[0] == -1

    ri = tb.retrieve_indices
    assert ri.dtype == np.int32 and ri.shape == (tb.num_paths, tb.depth + 1)
    covered = set()
    leaves = []
    for row, length in zip(ri, tb.retrieve_lengths, strict=True):
        valid = row[row >= 0]
        assert len(valid) == length and np.all(row[length:] == -1)
        assert valid[0] == 0
        for a, b in itertools.pairwise(valid):
            assert tb.parent[b] == a
        assert tb.num_children[valid[-1]] == 0
        leaves.append(int(valid[-1]))
        covered.update(int(x) for x in valid)
    assert covered == set(range(t))
    assert leaves == sorted(leaves) == [i for i in range(t) if tb.num_children[i] == 0]


def test_buffers_read_only():
    tb = build_tree(chain_tree(2))
    with pytest.raises(ValueError):
        tb.attn_mask[0, 1] = True


def test_chain_tree_buffers():
    assert chain_tree(3) == [[0], [0, 0], [0, 0, 0]]
    tb = build_tree(chain_tree(3))
    assert (tb.num_nodes, tb.depth, tb.topk) == (4, 3, 1)
    np.testing.assert_array_equal(tb.attn_mask, np.tril(np.ones((4, 4), dtype=bool)))
    np.testing.assert_array_equal(tb.tree_indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(tb.depth_offsets, [0, 1, 2, 3])
    np.testing.assert_array_equal(tb.retrieve_indices, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(tb.parent, [-1, 0, 1, 2])


def test_topk_tree_buffers():
    assert topk_tree(3) == [[0], [1], [2]]
    tb = build_tree(topk_tree(3))
    assert (tb.num_nodes, tb.depth, tb.topk) == (4, 1, 3)
    expected = np.eye(4, dtype=bool)
    expected[:, 0] = True
    np.testing.assert_array_equal(tb.attn_mask, expected)
    np.testing.assert_array_equal(tb.tree_indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(tb.depth_offsets, [0, 1, 1, 1])
    np.testing.assert_array_equal(tb.retrieve_indices, [[0, 1], [0, 2], [0, 3]])
    np.testing.assert_array_equal(tb.num_children, [3, 0, 0, 0])


def test_stride_and_order_small_tree():
    tb = build_tree([[1], [0], [0, 2], [1, 0]], topk=5)
    assert tb.paths == ((), (0,), (1,), (0, 2), (1, 0))
    np.testing.assert_array_equal(tb.tree_indices, [0, 1, 2, 1 + 5 + 2, 1 + 5 + 0])
    np.testing.assert_array_equal(tb.retrieve_indices, [[0, 1, 3], [0, 2, 4]])


def test_best_nodes_tree_closed_and_sized():
    rng = np.random.default_rng(0)
    acc = np.sort(rng.uniform(0.05, 0.9, size=(4, 6)), axis=1)[:, ::-1]
    for n in (1, 10, 63):
        tree = best_nodes_tree(acc, n)
        assert len(tree) == n and len({tuple(p) for p in tree}) == n
        build_tree(tree, num_heads=4, topk=6)  # raises on orphans / duplicates


def test_best_nodes_tree_optimal_small():
    acc = np.array([[0.6, 0.3], [0.5, 0.4]])
    # Values: [0]=.6 [1]=.3 [0,0]=.3 [0,1]=.24 [1,0]=.15 [1,1]=.12
    assert best_nodes_tree(acc, 1) == [[0]]
    assert best_nodes_tree(acc, 3) == [[0], [0, 0], [1]]  # tie .3 broken lexicographically
    assert best_nodes_tree(acc, 4) == [[0], [0, 0], [1], [0, 1]]
    # Brute force over all parent-closed subsets of size 4.
    nodes = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    best = 0.0
    for subset in itertools.combinations(nodes, 4):
        s = set(subset)
        if all(len(p) == 1 or p[:-1] in s for p in s):
            best = max(best, expected_accept_length([list(p) for p in s], acc))
    got = expected_accept_length(best_nodes_tree(acc, 4), acc)
    assert got == pytest.approx(best) == pytest.approx(1 + 0.6 + 0.3 + 0.3 + 0.24)
    with pytest.raises(TreeError, match="at most"):
        best_nodes_tree(acc, 7)


def test_expected_accept_length_hand():
    acc = [[0.5, 0.2], [0.4, 0.1], [0.3, 0.0]]
    assert expected_accept_length([], acc) == 1.0
    # 1 + .5 + .2 + .5*.4 + .5*.4*.3
    assert expected_accept_length([[0], [1], [0, 0], [0, 0, 0]], acc) == pytest.approx(1.96)
    with pytest.raises(TreeError, match="outside"):
        expected_accept_length([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], acc)


@pytest.mark.parametrize(
    ("choices", "kwargs", "fact"),
    [
        ([[0], [1], [0]], {}, "duplicate path [0]"),
        ([[0], [1, 0]], {}, "orphan path [1, 0]"),
        (
            chain_tree(4),
            {"num_heads": 3},
            "tree depth 4 needs at least 4 Medusa heads, the model has 3",
        ),
        ([[0], [0, 12]], {"topk": 10}, "rank 12 in path [0, 12] is >= top-k 10"),
        ([[0], [-1]], {}, "negative rank -1"),
        ([[0], []], {}, "empty path"),
        ([[0], 3], {}, "path 3 is not a list"),
        ([[0], [0.5]], {}, "non-integer rank"),
    ],
)
def test_validation_errors(choices, kwargs, fact):
    with pytest.raises(TreeError) as e:
        build_tree(choices, **kwargs)
    assert fact in str(e.value)
    assert isinstance(e.value, ValueError)


def test_get_tree_specs(tmp_path):
    assert get_tree(DEFAULT_TREE) == PREDEFINED_TREES[DEFAULT_TREE]
    assert get_tree(DEFAULT_TREE) is not PREDEFINED_TREES[DEFAULT_TREE]  # callers may mutate
    assert get_tree([(0,), (0, 1)]) == [[0], [0, 1]]
    f = tmp_path / "t.json"
    f.write_text(json.dumps([[0], [1]]))
    assert get_tree(str(f)) == [[0], [1]]
    for key in ("choices", "tree"):
        f.write_text(json.dumps({key: [[0], [0, 0]]}))
        assert get_tree(f) == [[0], [0, 0]]


def test_get_tree_errors(tmp_path):
    with pytest.raises(TreeError) as e:
        get_tree("no_such_tree")
    assert "no_such_tree" in str(e.value) and DEFAULT_TREE in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [1")
    with pytest.raises(TreeError, match="bad.json"):
        get_tree(str(bad))
    bad.write_text(json.dumps({"nodes": [[0]]}))
    with pytest.raises(TreeError, match="'choices' or 'tree'"):
        get_tree(bad)
    bad.write_text(json.dumps({"x": [[0], 1]}))
    with pytest.raises(TreeError, match="bad.json"):
        load_tree_json(bad)


def test_trim_tree_keeps_parents_and_the_budget():
    from medusa_jax.tree import trim_tree

    full = get_tree("mc_sim_7b_63")
    for n in (2, 5, 16, 64, 100):
        t = trim_tree(full, n)
        assert 1 + len(t) == min(n, 1 + len(full))
        kept = {tuple(p) for p in t}
        assert all(len(p) == 1 or tuple(p[:-1]) in kept for p in t)
        build_tree(t)  # a valid tree
    assert trim_tree([[0], [0, 0], [1]], 3) == [[0], [0, 0]]


def test_accelerator_tree_shrinks_with_the_batch():
    from medusa_jax.api import ACCELERATOR_ROWS, default_dtype, default_tree
    from medusa_jax.config import MedusaConfig

    mcfg = MedusaConfig(hidden_size=8, vocab_size=32, num_heads=5)
    big = build_tree(get_tree(default_tree(mcfg, backend="gpu", batch=1)))
    small = build_tree(get_tree(default_tree(mcfg, backend="gpu", batch=8)))
    assert big.num_nodes == 64 and small.num_nodes == ACCELERATOR_ROWS // 8
    assert default_tree(mcfg, backend="cpu", batch=8) == default_tree(mcfg, backend="cpu")
    assert default_dtype("cpu") == "float32" and default_dtype("gpu") == default_dtype("tpu") == "bfloat16"
