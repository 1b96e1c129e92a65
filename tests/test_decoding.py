"""Decoding loops on a random tiny model: vanilla greedy against a naive full-recompute loop,
sampling, streaming, EOS, Medusa greedy == vanilla greedy, a perfect-draft proposer, typical
acceptance, and input validation.

Compile time dominates on CPU, so every loop runs with the same ``GenerationSettings``
(``max_new_tokens=16``), prompts of at most 16 tokens (one prompt bucket) and batch 1 or 4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.config import ConfigError, MedusaConfig
from medusa_jax.decoding.common import GenerationError, GenerationSettings
from medusa_jax.decoding.medusa import MedusaSettings, make_settings, medusa_generate
from medusa_jax.decoding.oracle import oracle_proposer
from medusa_jax.decoding.sampling import SamplingConfig, filter_logits
from medusa_jax.decoding.vanilla import generate
from medusa_jax.model import llama
from medusa_jax.model.heads import init_medusa_params
from medusa_jax.model.llama import lm_head_weight
from medusa_jax.tree import TreeError, build_tree, chain_tree, get_tree

MAX_NEW = 16
G = GenerationSettings(max_new_tokens=MAX_NEW)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3], [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42]]
CUSTOM_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
TREES = {"mc_sim_7b_63": "mc_sim_7b_63", "custom": CUSTOM_TREE}
NAIVE_WIDTH = 48  # the naive reference recomputes over [B, NAIVE_WIDTH] tokens (one compile)


# ----------------------------------------------------------------------------- helpers


@functools.partial(jax.jit, static_argnums=0)
def _all_logits(cfg, params, tokens):
    h, _ = llama.forward(cfg, params, tokens)
    return llama.logits(cfg, params, h)


def naive_greedy(cfg, params, prompts, n):
    """Full recompute each step, argmax at each row's last token (right padding is invisible to
    a causal forward)."""
    toks = np.zeros((len(prompts), NAIVE_WIDTH), np.int32)
    lens = np.array([len(p) for p in prompts])
    assert lens.max() + n <= NAIVE_WIDTH
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    out = [[] for _ in prompts]
    for _ in range(n):
        lg = np.asarray(_all_logits(cfg, params, jnp.asarray(toks)))
        nxt = lg[np.arange(len(prompts)), lens - 1].argmax(-1)
        for i, t in enumerate(nxt):
            out[i].append(int(t))
            toks[i, lens[i]] = t
        lens = lens + 1
    return out


# the perfect-draft proposer (one function for every call: the jit's static argument hashes alike)
oracle_propose = oracle_proposer(8, 16)


def _check_stats(res, n_rows, depth):
    steps = np.asarray(res["steps"])
    hist = np.asarray(res["accept_hist"])
    assert steps.shape == (n_rows,) and np.all(steps >= 1)
    assert hist.shape == (n_rows, depth + 2)
    np.testing.assert_array_equal(hist.sum(-1), steps)
    assert np.all(hist[:, 0] == 0)  # the root is always accepted
    assert all(m >= 1.0 for m in res["mean_accepted"])
    np.testing.assert_allclose(res["mean_accepted"],
                               (hist * np.arange(depth + 2)).sum(-1) / steps)
    head = np.asarray(res["head_accept"])
    assert head.shape == (n_rows, depth)
    for k in range(depth):  # head k was right whenever more than k + 1 tokens were accepted
        np.testing.assert_array_equal(head[:, k], hist[:, k + 2:].sum(-1))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mcfg(tiny_cfg):
    return MedusaConfig.for_model(tiny_cfg, num_heads=4)


@pytest.fixture(scope="module")
def mparams(tiny_params, mcfg):
    return {"base": tiny_params, "medusa": init_medusa_params(mcfg, scale=0.3)}


@pytest.fixture(scope="module")
def greedy4(tiny_cfg, tiny_params):
    """Vanilla greedy on the 4 ragged prompts."""
    return generate(tiny_cfg, tiny_params, PROMPTS, G)


@pytest.fixture(scope="module")
def greedy_alone(tiny_cfg, tiny_params):
    """Vanilla greedy on each prompt alone (batch 1)."""
    return [generate(tiny_cfg, tiny_params, [p], G)["tokens"][0] for p in PROMPTS]


@pytest.fixture(scope="module")
def naive_long(tiny_cfg, tiny_params):
    """Naive greedy continuation, a few tokens longer than MAX_NEW (for the oracle)."""
    return naive_greedy(tiny_cfg, tiny_params, PROMPTS, MAX_NEW + 8)


# ----------------------------------------------------------------------------- 1. vanilla greedy


def test_vanilla_greedy_equals_naive_loop(greedy4, greedy_alone, naive_long):
    toks = greedy4["tokens"]
    assert [len(t) for t in toks] == [MAX_NEW] * len(PROMPTS)
    assert toks == [r[:MAX_NEW] for r in naive_long]
    assert toks == greedy_alone  # each row decodes as if alone
    assert greedy4["steps"] == MAX_NEW  # 1 from the prefill + 15 decode steps
    assert len({tuple(t) for t in toks}) > 1  # rows really differ


def test_vanilla_steps_stop_at_limit(tiny_cfg, tiny_params):
    """The loop runs no further than max_new_tokens even with a smaller limit per call."""
    res = generate(tiny_cfg, tiny_params, PROMPTS, G, stream_every=100)
    assert [len(t) for t in res["tokens"]] == [MAX_NEW] * len(PROMPTS)


# ----------------------------------------------------------------------------- 2. sampling

HOT = SamplingConfig(temperature=0.8, top_p=0.9)


def test_sampling_seeded(tiny_cfg, tiny_params, greedy4):
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=HOT)
    a = generate(tiny_cfg, tiny_params, PROMPTS, g, seed=3)["tokens"]
    b = generate(tiny_cfg, tiny_params, PROMPTS, g, seed=3)["tokens"]
    c = generate(tiny_cfg, tiny_params, PROMPTS, g, seed=4)["tokens"]
    assert a == b
    assert a != c
    assert a != greedy4["tokens"]
    for row in a + c:
        assert len(row) == MAX_NEW and all(0 <= t < tiny_cfg.vocab_size for t in row)


def test_top_k_1_is_greedy(tiny_cfg, tiny_params, greedy4):
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1.0, top_k=1))
    assert generate(tiny_cfg, tiny_params, PROMPTS, g, seed=7)["tokens"] == greedy4["tokens"]


def test_filter_logits_top_p_top_k():
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)  # unsorted on purpose
    logits = jnp.asarray(np.log(probs))[None].repeat(2, axis=0)  # [2, 4]

    def kept(cfg):
        x = np.asarray(filter_logits(logits, cfg))
        assert np.array_equal(x[0], x[1])
        return set(np.flatnonzero(np.isfinite(x[0])).tolist())

    # top-p keeps the smallest prefix (by probability) whose mass reaches p
    assert kept(SamplingConfig(temperature=1.0, top_p=0.4)) == {1}
    assert kept(SamplingConfig(temperature=1.0, top_p=0.7)) == {1, 3}
    assert kept(SamplingConfig(temperature=1.0, top_p=0.9)) == {0, 1, 3}
    assert kept(SamplingConfig(temperature=1.0, top_p=0.99)) == {0, 1, 2, 3}
    assert kept(SamplingConfig(temperature=1.0, top_p=1e-6)) == {1}  # never empty
    # top-k keeps exactly k
    assert kept(SamplingConfig(temperature=1.0, top_k=1)) == {1}
    assert kept(SamplingConfig(temperature=1.0, top_k=3)) == {0, 1, 3}
    assert kept(SamplingConfig(temperature=1.0, top_k=4)) == {0, 1, 2, 3}
    assert kept(SamplingConfig(temperature=1.0, top_k=2, top_p=0.9)) == {1, 3}
    # temperature divides the kept logits
    x = np.asarray(filter_logits(logits, SamplingConfig(temperature=0.5)))
    np.testing.assert_allclose(x[0], np.log(probs) / 0.5, rtol=1e-6)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked rows: top-16 suffice; flat: the sort runs
def test_top_p_candidates_equal_the_full_sort(scale):
    """The cutoff found among the largest ``candidates`` logits (falling back to a full sort when
    they hold too little mass) keeps exactly the set a full sort keeps."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 512)) * scale
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, top_k=300)
    fast = np.isfinite(np.asarray(filter_logits(logits, cfg, candidates=16)))
    full = np.isfinite(np.asarray(filter_logits(logits, cfg, candidates=512)))
    assert 1 < full.sum(-1).max() < 300  # the cut is not trivial
    assert (full.sum(-1).max() <= 16) == (scale > 1)  # each case takes the branch it names
    np.testing.assert_array_equal(fast, full)


# ----------------------------------------------------------------------------- 3. streaming


def test_streaming_matches(tiny_cfg, tiny_params, greedy4):
    seen = []
    res = generate(tiny_cfg, tiny_params, PROMPTS, G, stream_every=4,
                   on_chunk=lambda out, n: seen.append((out.copy(), n.copy())))
    assert res["tokens"] == greedy4["tokens"]
    assert len(seen) > 1
    ns = [n for _, n in seen]
    assert all(np.all(a <= b) for a, b in zip(ns, ns[1:], strict=False))
    assert ns[0].max() < MAX_NEW and np.all(ns[-1] == MAX_NEW)
    for out, n in seen:  # every partial output is a prefix of the final one
        for b in range(len(PROMPTS)):
            assert out[b, : n[b]].tolist() == greedy4["tokens"][b][: n[b]]


def test_medusa_streaming_matches(tiny_cfg, mcfg, mparams, greedy4):
    st = make_settings(CUSTOM_TREE, 4, G)
    full = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st)
    calls = []
    res = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, stream_every=2,
                          on_chunk=lambda out, n: calls.append(n.copy()))
    assert res["tokens"] == full["tokens"] == greedy4["tokens"]
    assert res["steps"] == full["steps"]
    assert len(calls) > 1


# ----------------------------------------------------------------------------- 4. EOS


@pytest.fixture(scope="module")
def eos_case(greedy4):
    """An EOS token that row r emits mid-way while some other row never emits it."""
    toks = greedy4["tokens"]
    for r, row in enumerate(toks):
        for pos in range(2, MAX_NEW - 4):
            e = row[pos]
            if e not in row[:pos] and any(e not in o for i, o in enumerate(toks) if i != r):
                expect = [o[: o.index(e) + 1] if e in o else o for o in toks]
                return e, r, pos, expect
    pytest.fail("no usable EOS candidate in the greedy outputs")


def test_eos_stops_row(tiny_cfg, tiny_params, eos_case):
    e, r, pos, expect = eos_case
    g = GenerationSettings(max_new_tokens=MAX_NEW, eos_token_ids=(e,))
    res = generate(tiny_cfg, tiny_params, PROMPTS, g)
    assert res["tokens"] == expect
    assert len(res["tokens"][r]) == pos + 1 and res["tokens"][r][-1] == e
    assert max(len(t) for t in res["tokens"]) == MAX_NEW  # another row kept going


def test_medusa_eos_stops_row(tiny_cfg, mcfg, mparams, eos_case):
    e, r, pos, expect = eos_case
    g = GenerationSettings(max_new_tokens=MAX_NEW, eos_token_ids=(e,))
    res = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, make_settings(CUSTOM_TREE, 4, g))
    assert res["tokens"] == expect
    _check_stats(res, len(PROMPTS), 3)


# ----------------------------------------------------------------------------- 5. Medusa greedy


@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
def test_medusa_greedy_equals_vanilla_batch4(tree, tiny_cfg, mcfg, mparams, greedy4):
    st = make_settings(TREES[tree], 4, G)
    res = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st)
    assert res["tokens"] == greedy4["tokens"]
    _check_stats(res, len(PROMPTS), st.tree.depth)
    # each row's steps cover its tokens: sum of accepted lengths >= tokens emitted
    hist = np.asarray(res["accept_hist"])
    assert np.all((hist * np.arange(hist.shape[1])).sum(-1) >= MAX_NEW)


def test_medusa_empty_tree_is_vanilla(tiny_cfg, mcfg, mparams, greedy4):
    """An empty tree (``chain_tree(0)``): root only, one token per step."""
    st = make_settings(chain_tree(0), 4, G)
    res = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st)
    assert res["tokens"] == greedy4["tokens"]
    _check_stats(res, len(PROMPTS), 0)
    assert res["steps"] == [MAX_NEW] * len(PROMPTS)


@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
def test_medusa_greedy_equals_vanilla_batch1(tree, tiny_cfg, mcfg, mparams, greedy_alone):
    st = make_settings(TREES[tree], 4, G)
    for i in (1, 3):
        res = medusa_generate(tiny_cfg, mcfg, mparams, [PROMPTS[i]], st)
        assert res["tokens"] == [greedy_alone[i]]
        _check_stats(res, 1, st.tree.depth)


def test_medusa_greedy_own_lm_heads(tiny_cfg, tiny_params, greedy4):
    mc = MedusaConfig.for_model(tiny_cfg, num_heads=3, num_layers=2, shared_lm_head=False)
    heads = init_medusa_params(mc, rng=jax.random.PRNGKey(5), scale=0.3)
    assert heads["lm_head"].shape == (3, tiny_cfg.hidden_size, tiny_cfg.vocab_size)
    res = medusa_generate(tiny_cfg, mc, {"base": tiny_params, "medusa": heads}, PROMPTS,
                          make_settings(CUSTOM_TREE, 3, G))
    assert res["tokens"] == greedy4["tokens"]
    _check_stats(res, len(PROMPTS), 3)
    # heads copied from the base LM head start as copies of it
    h2 = init_medusa_params(mc, base_lm_head=lm_head_weight(tiny_params, tiny_cfg))
    np.testing.assert_array_equal(np.asarray(h2["lm_head"][2]), np.asarray(tiny_params["lm_head"]))


# ----------------------------------------------------------------------------- 6. perfect draft


@pytest.mark.parametrize("tree", list(TREES), ids=list(TREES))
def test_perfect_draft_accepts_full_depth(tree, tiny_cfg, mcfg, mparams, naive_long, greedy4):
    st = make_settings(TREES[tree], 4, G)
    depth = st.tree.depth
    ref = np.array(naive_long, np.int32)  # [B, MAX_NEW + 8]: beyond MAX_NEW too
    params = dict(mparams, oracle=jnp.asarray(ref))
    res = medusa_generate(tiny_cfg, mcfg, params, PROMPTS, st, propose=oracle_propose)
    assert res["tokens"] == greedy4["tokens"]
    _check_stats(res, len(PROMPTS), depth)
    hist, steps = np.asarray(res["accept_hist"]), np.asarray(res["steps"])
    # every step accepts root + depth tokens (the continuation is known past the limit too)
    np.testing.assert_array_equal(hist[:, depth + 1], steps)
    np.testing.assert_array_equal(steps, -(-MAX_NEW // (depth + 1)))
    np.testing.assert_allclose(res["mean_accepted"], depth + 1)
    np.testing.assert_array_equal(np.asarray(res["head_accept"]), steps[:, None].repeat(depth, 1))


def test_perfect_draft_truncated_reference(tiny_cfg, mcfg, mparams, greedy4):
    """With the reference cut at MAX_NEW the last step may accept less, no other step does."""
    st = make_settings("mc_sim_7b_63", 4, G)
    depth = st.tree.depth
    ref = np.array(greedy4["tokens"], np.int32)
    ref = np.concatenate([ref, np.full((len(PROMPTS), 8), 0, np.int32)], axis=1)
    params = dict(mparams, oracle=jnp.asarray(ref))
    res = medusa_generate(tiny_cfg, mcfg, params, PROMPTS, st, propose=oracle_propose)
    assert res["tokens"] == greedy4["tokens"]
    hist, steps = np.asarray(res["accept_hist"]), np.asarray(res["steps"])
    assert np.all(hist[:, depth + 1] >= steps - 1)
    assert all(m >= depth + 1 - depth / s for m, s in zip(res["mean_accepted"], steps, strict=True))


# ----------------------------------------------------------------------------- 7. typical and lossless, cold


@pytest.mark.parametrize("rule", ["typical", "lossless"])
@pytest.mark.parametrize("temp", [0.0, 1e-4], ids=["T0", "T1e-4"])
def test_sampling_rule_cold_is_greedy(rule, temp, tiny_cfg, mcfg, mparams, greedy4):
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=temp))
    st = make_settings(CUSTOM_TREE, 4, g, acceptance=rule)
    res = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=11)
    assert res["tokens"] == greedy4["tokens"]
    _check_stats(res, len(PROMPTS), 3)


def test_typical_warm_reproducible(tiny_cfg, mcfg, mparams, greedy4):
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=0.7))
    st = make_settings(CUSTOM_TREE, 4, g, acceptance="typical")
    a = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=5)
    b = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=5)
    assert a["tokens"] == b["tokens"]
    np.testing.assert_array_equal(a["accept_hist"], b["accept_hist"])
    assert a["tokens"] != greedy4["tokens"]
    for row in a["tokens"]:
        assert len(row) == MAX_NEW and all(0 <= t < tiny_cfg.vocab_size for t in row)
    _check_stats(a, len(PROMPTS), 3)


# ----------------------------------------------------------------------------- 8. bad input


def test_bad_prompts(tiny_cfg, tiny_params, mcfg, mparams):
    st = make_settings(CUSTOM_TREE, 4, G)
    with pytest.raises(GenerationError, match="empty"):
        generate(tiny_cfg, tiny_params, [[1, 2], []], G)
    with pytest.raises(GenerationError, match="empty"):
        medusa_generate(tiny_cfg, mcfg, mparams, [[]], st)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(tiny_cfg, tiny_params, [], G)
    with pytest.raises(GenerationError, match="no prompts"):
        medusa_generate(tiny_cfg, mcfg, mparams, [], st)
    too_long = [[5] * (tiny_cfg.max_position_embeddings - MAX_NEW + 1)]
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        generate(tiny_cfg, tiny_params, too_long, G)
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        medusa_generate(tiny_cfg, mcfg, mparams, too_long, st)
    with pytest.raises(GenerationError, match="does not fit the KV cache"):
        generate(tiny_cfg, tiny_params, [[5] * 10], G, cache_len=20)
    with pytest.raises(GenerationError, match="tree slots"):
        medusa_generate(tiny_cfg, mcfg, mparams, [[5] * 10], st, cache_len=30)


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-0.1)
    for p in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            SamplingConfig(top_p=p)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    for n in (0, -3):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            GenerationSettings(max_new_tokens=n)


def test_bad_tree_and_heads(tiny_cfg, tiny_params, mparams):
    deep = [[0], [0, 0], [0, 0, 0]]
    with pytest.raises(TreeError, match="depth 3 needs at least 3 Medusa heads"):
        make_settings(deep, 2, G)
    with pytest.raises(TreeError, match="depth 4 needs at least 4 Medusa heads"):
        make_settings("mc_sim_7b_63", 3, G)
    with pytest.raises(TreeError, match="unknown tree"):
        make_settings("no_such_tree", 4, G)
    # settings built for more heads than the model has
    two = MedusaConfig.for_model(tiny_cfg, num_heads=2)
    p2 = {"base": tiny_params, "medusa": init_medusa_params(two, scale=0.3)}
    with pytest.raises((GenerationError, TreeError), match="needs at least 3 Medusa heads"):
        medusa_generate(tiny_cfg, two, p2, PROMPTS, make_settings(deep, 4, G))
    with pytest.raises((GenerationError, TreeError), match="needs at least 3 Medusa heads"):
        medusa_generate(tiny_cfg, two, p2, PROMPTS, MedusaSettings(gen=G, choices=deep))
    with pytest.raises(GenerationError, match="acceptance"):
        make_settings(CUSTOM_TREE, 4, G, acceptance="nucleus")
    # heads trained for another model
    other = MedusaConfig(num_heads=4, hidden_size=32, vocab_size=tiny_cfg.vocab_size)
    with pytest.raises(ConfigError, match="hidden size"):
        medusa_generate(tiny_cfg, other, {"base": tiny_params, "medusa": mparams["medusa"]},
                        PROMPTS, make_settings(CUSTOM_TREE, 4, G))
    other_v = MedusaConfig(num_heads=4, hidden_size=tiny_cfg.hidden_size, vocab_size=99)
    with pytest.raises(ConfigError, match="vocab size"):
        medusa_generate(tiny_cfg, other_v, mparams, PROMPTS, make_settings(CUSTOM_TREE, 4, G))


def test_tree_buffers_used_by_settings():
    """The settings' tree is the validated tree (node order, depth, top-k)."""
    st = make_settings("mc_sim_7b_63", 4, G)
    t = build_tree(get_tree("mc_sim_7b_63"))
    assert st.tree.num_nodes == t.num_nodes == 64 and st.tree.depth == 4 and st.tree.topk == 10
    np.testing.assert_array_equal(st.tree.attn_mask, t.attn_mask)
    assert hash(st) == hash(make_settings("mc_sim_7b_63", 4, G))


def test_eos_ids_given_as_list_are_normalised():
    g = GenerationSettings(max_new_tokens=MAX_NEW, eos_token_ids=[2, 3])
    assert g.eos_token_ids == (2, 3)
    hash(g)


# ----------------------------------------------------------------------------- 8. lossless


def test_lossless_seeded_and_rows_independent(tiny_cfg, mcfg, mparams, greedy4):
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(0.9, top_p=0.9))
    st = make_settings(CUSTOM_TREE, 4, g, acceptance="lossless")
    a = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=5)
    b = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=5)
    c = medusa_generate(tiny_cfg, mcfg, mparams, PROMPTS, st, seed=6)
    assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]
    assert a["tokens"] != greedy4["tokens"]
    _check_stats(a, len(PROMPTS), 3)
    # a row's tokens do not depend on what the other rows hold
    others = [PROMPTS[0], [7, 7, 7, 7, 7, 7, 7], [11], PROMPTS[1][::-1] + [1] * 5]
    d = medusa_generate(tiny_cfg, mcfg, mparams, others, st, seed=5)
    assert d["tokens"][0] == a["tokens"][0]
    assert d["tokens"][1:] != a["tokens"][1:]


def test_lossless_perfect_draft_accepts_full_depth(tiny_cfg, mcfg, mparams, naive_long, greedy4):
    """Drafts that are the argmax under a near-zero temperature are accepted to full depth."""
    g = GenerationSettings(max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1e-3))
    st = make_settings("mc_sim_7b_63", 4, g, acceptance="lossless")
    depth = st.tree.depth
    params = dict(mparams, oracle=jnp.asarray(np.array(naive_long, np.int32)))
    res = medusa_generate(tiny_cfg, mcfg, params, PROMPTS, st, seed=2, propose=oracle_propose)
    assert res["tokens"] == greedy4["tokens"]
    hist, steps = np.asarray(res["accept_hist"]), np.asarray(res["steps"])
    np.testing.assert_array_equal(hist[:, depth + 1], steps)
