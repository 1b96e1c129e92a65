"""The decode loop's precomputed projections (``with_decode_projections``): on the CPU a tied
model's verification logits go through a ``[D, V]`` copy of the embedding, heads with a draft
vocabulary project through their columns gathered once. Same numbers in another layout: the
logits match, the drafted trees are identical, greedy Medusa still equals greedy vanilla, and
the loop gives the same tokens and acceptance with and without them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.api import MedusaLM
from medusa_jax.config import MedusaConfig, tiny_config
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.medusa import (
    PROJ_KEY,
    hydra_proposer,
    make_settings,
    medusa_generate,
    verify_logits,
    with_decode_projections,
)
from medusa_jax.decoding.vanilla import generate
from medusa_jax.model import init_params, llama
from medusa_jax.model.heads import init_medusa_params

G = GenerationSettings(max_new_tokens=16)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [4, 8, 15, 16, 23, 42, 4, 8]]
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.fixture(scope="module")
def tied():
    cfg = tiny_config(scan_layers=False, tie_word_embeddings=True)
    return cfg, init_params(cfg, jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def hydra(tied):
    cfg, base = tied
    mcfg = MedusaConfig.for_model(cfg, num_heads=3, head_type="hydra",
                                  draft_ids=tuple(range(1, cfg.vocab_size, 2)))
    p = init_medusa_params(mcfg, rng=jax.random.PRNGKey(5), scale=0.3)
    # the tiny embeddings are ~0.02: scale the path inputs up so the drafts depend on them
    return mcfg, {"base": base, "medusa": dict(p, in_embed=p["in_embed"] * 40.0)}


def test_projections_are_the_lm_head_in_another_layout(tied, hydra):
    cfg, _ = tied
    mcfg, params = hydra
    out = with_decode_projections(cfg, mcfg, params, backend="cpu")
    emb = np.asarray(params["base"]["embed"]["embedding"])  # [V, D]
    np.testing.assert_array_equal(np.asarray(out[PROJ_KEY]["verify"]), emb.T)
    np.testing.assert_array_equal(np.asarray(out[PROJ_KEY]["draft"]),
                                  emb[np.asarray(mcfg.draft_ids)].T)
    assert out["base"] is params["base"] and out["medusa"] is params["medusa"]
    assert with_decode_projections(cfg, mcfg, out) is out  # made once
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.hidden_size))
    got, want = verify_logits(cfg, out, h), llama.logits(cfg, params["base"], h)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got).argmax(-1), np.asarray(want).argmax(-1))


def test_projections_only_where_they_help(tied, hydra, tiny_cfg, tiny_params):
    cfg, _ = tied
    mcfg, params = hydra
    # accelerators lay out their dots themselves: no second copy of the embedding there
    assert "verify" not in with_decode_projections(cfg, mcfg, params, backend="gpu")[PROJ_KEY]
    # an untied model's LM head is already [D, V]; heads without a draft vocabulary: nothing
    plain = MedusaConfig.for_model(tiny_cfg, num_heads=2)
    p = {"base": tiny_params, "medusa": init_medusa_params(plain)}
    assert with_decode_projections(tiny_cfg, plain, p, backend="cpu") is p


def test_hydra_drafts_the_same_tree_with_the_draft_columns(tied, hydra):
    cfg, _ = tied
    mcfg, params = hydra
    propose = jax.jit(hydra_proposer(mcfg, cfg, tuple(map(tuple, TREE))))
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    hidden = jax.random.normal(k1, (3, cfg.hidden_size))
    root = jax.random.randint(k2, (3,), 0, cfg.vocab_size, jnp.int32)
    want = np.asarray(propose(params, hidden, None, root))
    got = np.asarray(propose(with_decode_projections(cfg, mcfg, params), hidden, None, root))
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[:, 1:])) > 3  # the heads really draft


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_with_projections_equals_vanilla_and_the_plain_loop(tied, hydra, rows):
    cfg, base = tied
    mcfg, _ = hydra
    # near-fresh heads (about the base LM head) accept on the tiny model's repetitive output,
    # so the drafted nodes' logits decide tokens too, not only the root's
    params = {"base": base, "medusa": init_medusa_params(mcfg, rng=jax.random.PRNGKey(5),
                                                         scale=0.05)}
    st = make_settings(TREE, mcfg.num_heads, G)
    want = generate(cfg, base, PROMPTS[:rows], G)["tokens"]
    with_p = medusa_generate(cfg, mcfg, params, PROMPTS[:rows], st)
    without = medusa_generate(cfg, mcfg, params, PROMPTS[:rows], st, projections=False)
    assert with_p["tokens"] == want == without["tokens"]
    np.testing.assert_array_equal(with_p["accept_hist"], without["accept_hist"])
    assert max(with_p["mean_accepted"]) > 1.0  # the comparison covers accepted drafts


def test_medusa_lm_makes_them_once_and_again_for_new_heads(tied, hydra):
    cfg, base = tied
    mcfg, params = hydra
    lm = MedusaLM(cfg, base, mcfg=mcfg, medusa_params=params["medusa"])
    first = lm._decode_params()
    assert PROJ_KEY in first and lm._decode_params() is first
    other = dataclasses.replace(mcfg, draft_ids=tuple(range(0, cfg.vocab_size, 4)))
    lm.set_heads(other, params["medusa"])
    again = lm._decode_params()
    assert again is not first
    np.testing.assert_array_equal(
        np.asarray(again[PROJ_KEY]["draft"]),
        np.asarray(base["embed"]["embedding"])[np.asarray(other.draft_ids)].T)
    lm.set_heads(None)
    assert PROJ_KEY in lm._decode_params() and "draft" not in lm._decode_params()[PROJ_KEY]
