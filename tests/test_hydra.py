"""Hydra (sequentially dependent) heads: depth-by-depth drafting against a per-node reference,
greedy Medusa with Hydra heads == greedy vanilla, a perfect tree draft, the checkpoint format,
and refusals (heads for another model, a tree deeper than the heads).

Tiny model, ``max_new_tokens=16`` and prompts of at most 16 tokens, as in ``test_decoding``."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.config import ConfigError, MedusaConfig
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.medusa import hydra_proposer, make_settings, medusa_generate
from medusa_jax.decoding.vanilla import generate
from medusa_jax.model import llama
from medusa_jax.model.heads import draft_to_vocab, head_logits, hydra_hidden, init_medusa_params
from medusa_jax.model.llama import lm_head_weight
from medusa_jax.tree import TreeError, build_tree, get_tree, trim_tree
from medusa_jax.weights.medusa_io import export_v1, load_heads, save_heads

MAX_NEW = 16
G = GenerationSettings(max_new_tokens=MAX_NEW)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42]]
SMALL_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]  # 7 nodes with the root
BIG_TREE = trim_tree(get_tree("mc_sim_7b_63"), 26)  # 26 nodes, depth 4, up to 8 children


@pytest.fixture(scope="module")
def hcfg(tiny_cfg):
    return MedusaConfig.for_model(tiny_cfg, num_heads=4, num_layers=1, head_type="hydra")


@pytest.fixture(scope="module")
def hparams(tiny_params, hcfg):
    """Random Hydra heads whose path inputs matter: the tiny model's embeddings are ~0.02, so
    the embedding projections are scaled up to weigh about as much as the hidden state."""
    p = init_medusa_params(hcfg, rng=jax.random.PRNGKey(7), scale=0.3)
    return {"base": tiny_params, "medusa": dict(p, in_embed=p["in_embed"] * 40.0)}


def reference_draft(cfg, mcfg, params, hidden, root, choices):
    """Tree tokens ``[B, T]`` the slow way: for every node with children, run its head once on
    that node's own path (root .. node) and give its child of rank r the rank-r token."""
    tree = build_tree(choices)
    emb = params["base"]["embed"]["embedding"]
    lm = lm_head_weight(params["base"], cfg) if mcfg.draft_ids is not None else None

    def proj(x):
        return llama.logits(cfg, params["base"], x)

    tok = {(): np.asarray(root)}
    for path in tree.paths:
        kids = [p for p in tree.paths if len(p) == len(path) + 1 and p[:-1] == path]
        if not kids:
            continue
        toks = np.stack([tok[path[:j]] for j in range(len(path) + 1)], axis=1)  # [B, d]
        h = hydra_hidden(mcfg, params["medusa"], hidden, jnp.take(emb, toks, axis=0),
                         head=len(path))  # [B, D]
        lg = head_logits(mcfg, params["medusa"], h[:, None, :], proj, lm)[:, 0]  # [B, V']
        order = np.asarray(draft_to_vocab(mcfg, jnp.argsort(-lg, axis=-1)))
        for p in kids:
            tok[p] = order[:, p[-1]]
    return np.stack([tok[p] for p in tree.paths], axis=1)


@pytest.mark.parametrize("draft", [False, True], ids=["full_vocab", "draft_vocab"])
@pytest.mark.parametrize("choices", [SMALL_TREE, BIG_TREE], ids=["7_nodes", "26_nodes"])
def test_batched_drafting_equals_per_node_reference(tiny_cfg, hcfg, hparams, choices, draft):
    import dataclasses

    mcfg = hcfg
    if draft:  # every third token: the draft columns map back to vocabulary ids
        mcfg = dataclasses.replace(hcfg, draft_ids=tuple(range(0, tiny_cfg.vocab_size, 3)))
    B = 3
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    hidden = jax.random.normal(k1, (B, tiny_cfg.hidden_size))
    root = jax.random.randint(k2, (B,), 0, tiny_cfg.vocab_size, jnp.int32)
    propose = hydra_proposer(mcfg, tiny_cfg, tuple(map(tuple, choices)))
    got = np.asarray(jax.jit(propose)(hparams, hidden, None, root))
    want = reference_draft(tiny_cfg, mcfg, hparams, hidden, root, choices)
    assert got.shape == (B, build_tree(choices).num_nodes)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 1:])) > 3  # the heads really draft different tokens
    paths = build_tree(choices).paths  # siblings' first children differ: the path matters
    assert np.any(want[:, paths.index((0, 0))] != want[:, paths.index((1, 0))])


@pytest.fixture(scope="module")
def greedy3(tiny_cfg, tiny_params):
    return generate(tiny_cfg, tiny_params, PROMPTS, G)["tokens"]


@pytest.mark.parametrize("rows", [1, 3])
def test_hydra_greedy_equals_vanilla(tiny_cfg, hcfg, hparams, greedy3, rows):
    res = medusa_generate(tiny_cfg, hcfg, hparams, PROMPTS[:rows], make_settings(SMALL_TREE, 4, G))
    assert res["tokens"] == greedy3[:rows]
    assert np.asarray(res["accept_hist"]).sum(-1).tolist() == res["steps"]


def test_fresh_hydra_heads_equal_fresh_medusa_heads(tiny_cfg, tiny_params):
    """At initialisation a Hydra head ignores its path (W_e = 0, W_h = I): it is a fresh Medusa
    head, so training starts from the base LM head's guess."""
    mh = MedusaConfig.for_model(tiny_cfg, num_heads=3, head_type="hydra")
    p = init_medusa_params(mh)
    h = jax.random.normal(jax.random.PRNGKey(0), (2, tiny_cfg.hidden_size))
    e = jax.random.normal(jax.random.PRNGKey(1), (2, 3, tiny_cfg.hidden_size))
    np.testing.assert_allclose(np.asarray(hydra_hidden(mh, p, h, e)),
                               np.broadcast_to(np.asarray(h)[:, None], (2, 3, h.shape[-1])))


def test_teacher_forced_heads_equal_single_heads(hcfg, hparams):
    """The training forward (all heads, teacher-forced) gives head m what drafting's one-head call
    gives it, and head m reads tokens t+1 .. t+m+1 only (even where its unused slots of
    ``in_embed`` hold weights)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    p = dict(hparams["medusa"])
    p["in_embed"] = jax.random.normal(k4, p["in_embed"].shape)
    h = jax.random.normal(k1, (2, hcfg.hidden_size))
    e = 0.05 * jax.random.normal(k2, (2, hcfg.num_heads, hcfg.embed_size))
    all_heads = np.asarray(hydra_hidden(hcfg, p, h, e))
    for m in range(hcfg.num_heads):
        one = np.asarray(hydra_hidden(hcfg, p, h, e[:, : m + 1], head=m))
        np.testing.assert_allclose(all_heads[:, m], one, rtol=1e-5, atol=1e-5)
        later = e.at[:, m + 1:].add(jax.random.normal(k3, e[:, m + 1:].shape))
        np.testing.assert_allclose(np.asarray(hydra_hidden(hcfg, p, h, later))[:, m], one,
                                   rtol=1e-5, atol=1e-5)
        own = np.asarray(hydra_hidden(hcfg, p, h, e.at[:, m].add(1.0)))[:, m]
        assert np.abs(own - one).max() > 1e-3


TREE_ORACLE = SMALL_TREE


def oracle_tree_propose(params, hidden, state, root):
    """A perfect tree draft: the all-rank-0 chain holds the true greedy continuation (read from
    ``params["oracle"]: [B, R]``), every other node a wrong token. Module-level: the static jit
    argument must hash the same each call."""
    tree = build_tree(TREE_ORACLE)
    ref = params["oracle"]
    V = params["base"]["embed"]["embedding"].shape[0]
    d = np.asarray(tree.depth_offsets)
    chain = np.array([all(r == 0 for r in p) for p in tree.paths])
    idx = jnp.clip(state.n_out[:, None] + d[None, :], 0, ref.shape[1] - 1)
    true = jnp.take_along_axis(ref, idx, axis=1)  # [B, T]
    wrong = (true + 1 + np.asarray(tree.rank)[None, :]) % V
    toks = jnp.where(chain[None, :], true, wrong).astype(jnp.int32)
    return toks.at[:, 0].set(root)


oracle_tree_propose.drafts_tree = True


def test_perfect_tree_draft_accepts_full_depth(tiny_cfg, tiny_params, hcfg, hparams, greedy3):
    long = generate(tiny_cfg, tiny_params, PROMPTS,
                    GenerationSettings(max_new_tokens=MAX_NEW + 8))["tokens"]
    st = make_settings(TREE_ORACLE, 4, G)
    params = dict(hparams, oracle=jnp.asarray(np.array(long, np.int32)))
    res = medusa_generate(tiny_cfg, hcfg, params, PROMPTS, st, propose=oracle_tree_propose)
    assert res["tokens"] == greedy3
    depth = st.tree.depth
    hist, steps = np.asarray(res["accept_hist"]), np.asarray(res["steps"])
    np.testing.assert_array_equal(hist[:, depth + 1], steps)
    np.testing.assert_array_equal(steps, -(-MAX_NEW // (depth + 1)))


def test_checkpoint_round_trip_records_head_type(tmp_path, hcfg, hparams):
    path = save_heads(tmp_path / "h", hcfg, hparams["medusa"])
    d = json.loads(open(os.path.join(path, "medusa_config.json")).read())
    assert d["head_type"] == "hydra" and d["embed_size"] == hcfg.embed_size
    mcfg, params = load_heads(path)
    assert mcfg == hcfg
    assert sorted(params) == sorted(hparams["medusa"])
    for k, v in hparams["medusa"].items():
        np.testing.assert_array_equal(params[k], np.asarray(v))
    # a file from before head_type existed loads as Medusa heads
    mc = MedusaConfig(hidden_size=hcfg.hidden_size, vocab_size=hcfg.vocab_size, num_heads=2)
    old = save_heads(tmp_path / "old", mc, init_medusa_params(mc))
    cfg_path = os.path.join(old, "medusa_config.json")
    d = json.loads(open(cfg_path).read())
    del d["head_type"], d["embed_size"]
    open(cfg_path, "w").write(json.dumps(d))
    assert load_heads(old)[0].head_type == "medusa"
    with pytest.raises(ValueError, match="cannot hold Hydra heads"):
        export_v1(tmp_path / "v1", hcfg, hparams["medusa"])


def test_hydra_checkpoint_missing_tensor_is_refused(tmp_path, hcfg, hparams):
    from medusa_jax.weights.errors import CheckpointError

    path = save_heads(tmp_path / "h", hcfg, hparams["medusa"])
    cfg_path = os.path.join(path, "medusa_config.json")
    d = json.loads(open(cfg_path).read())
    d["embed_size"] = hcfg.embed_size + 1
    open(cfg_path, "w").write(json.dumps(d))
    with pytest.raises(CheckpointError, match="in_embed"):
        load_heads(path)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "embed_size"])
def test_heads_for_another_model_are_refused(tiny_cfg, tiny_params, hcfg, field):
    import dataclasses

    bad = dataclasses.replace(hcfg, **{field: getattr(hcfg, field) + 8})
    params = {"base": tiny_params, "medusa": init_medusa_params(bad)}
    with pytest.raises(ConfigError, match="trained for another model") as e:
        medusa_generate(tiny_cfg, bad, params, PROMPTS[:1], make_settings(SMALL_TREE, 4, G))
    assert str(e.value).count("\n") == 0


def test_tree_deeper_than_heads_is_refused(tiny_cfg, tiny_params):
    from medusa_jax.decoding.common import GenerationError

    shallow = MedusaConfig.for_model(tiny_cfg, num_heads=2, head_type="hydra")
    with pytest.raises(TreeError, match="needs at least 3 Medusa heads"):
        make_settings(SMALL_TREE, shallow.num_heads, G)
    params = {"base": tiny_params, "medusa": init_medusa_params(shallow)}
    with pytest.raises(GenerationError, match="needs at least 3 Medusa heads"):
        medusa_generate(tiny_cfg, shallow, params, PROMPTS[:1], make_settings(SMALL_TREE, 4, G))
    with pytest.raises(ConfigError, match="head_type"):
        MedusaConfig.for_model(tiny_cfg, head_type="eagle")


def test_hydra_heads_with_lossless_sampling(tiny_cfg, hcfg, hparams, greedy3):
    """The lossless rule verifies Hydra-drafted trees too: cold it is greedy; warm, a seed
    reproduces a run and another seed gives another."""
    from medusa_jax.decoding.sampling import SamplingConfig

    cold = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1e-4))
    res = medusa_generate(tiny_cfg, hcfg, hparams, PROMPTS,
                          make_settings(SMALL_TREE, 4, cold, acceptance="lossless"))
    assert res["tokens"] == greedy3
    warm = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(0.9, top_p=0.9))
    st = make_settings(SMALL_TREE, 4, warm, acceptance="lossless")
    a, b, c = (medusa_generate(tiny_cfg, hcfg, hparams, PROMPTS, st, seed=s) for s in (3, 3, 4))
    assert a["tokens"] == b["tokens"] != c["tokens"]
    assert a["tokens"] != greedy3
    assert np.asarray(a["accept_hist"]).sum(-1).tolist() == a["steps"]
