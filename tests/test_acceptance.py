"""The acceptance rules against references that follow their definitions literally.

- Lossless: on a tiny model with a 32-token vocabulary the first three tokens of >= 20,000
  lossless Medusa samples (imperfect drafts, a depth-2 tree with several children per node)
  have the distribution of plain sampling, enumerated exactly from the model's probabilities.
- Typical: a plain-Python reference of the paper's rule (``p = softmax(logits / T)`` at the
  parent, ``H(p)`` in nats, accept ``x`` iff ``p(x) > min(eps, delta * exp(-H))``, longest
  accepted prefix, ties by total log-likelihood) on hand-built logits, and step by step against
  the jitted loop's accepted lengths on the tiny model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.config import MedusaConfig, tiny_config
from medusa_jax.decoding.acceptance import Typical
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.medusa import make_settings, medusa_generate
from medusa_jax.decoding.sampling import SamplingConfig, filter_logits
from medusa_jax.model import init_params, llama
from medusa_jax.model.heads import init_medusa_params
from medusa_jax.tree import build_tree

V = 32
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]  # depth 2, up to 3 children
PROMPT = [3, 17, 9, 25]
HOT = SamplingConfig(temperature=0.9, top_k=4, top_p=0.95)


@pytest.fixture(scope="module")
def small():
    cfg = tiny_config(vocab_size=V, eos_token_ids=(), scan_layers=False)
    return cfg, init_params(cfg, jax.random.PRNGKey(3))


def imperfect_propose(params, hidden, state):
    """Drafts in the model's support but for the wrong position: head m ranks the base model's
    top-4 at the last accepted position, likeliest first, rotated by m (head 1 should have
    looked one token further). A likely first child means a rejection moves a lot of mass, so
    accepting a later child with p instead of the renormalised r shows. Module-level so the
    static argument hashes the same every call."""
    lg = hidden @ params["base"]["lm_head"]  # [B, V]
    top = jax.lax.top_k(lg, 4)[1]  # [B, 4]
    return jnp.stack([jnp.roll(top, -m, axis=-1) for m in range(2)], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _last_probs(cfg, params, tokens):
    h, _ = llama.forward(cfg, params, tokens)
    logits = llama.logits(cfg, params, h[:, -1])
    return jax.nn.softmax(filter_logits(logits, HOT), axis=-1)


def exact_first3(cfg, params) -> np.ndarray:
    """``P[t1, t2, t3]`` of plain sampling with ``HOT``, from the model's own probabilities."""
    p1 = np.asarray(_last_probs(cfg, params, jnp.asarray([PROMPT])))[0]
    seq2 = np.array([PROMPT + [a] for a in range(V)], np.int32)
    p2 = np.asarray(_last_probs(cfg, params, jnp.asarray(seq2)))  # [V, V]
    seq3 = np.array([PROMPT + [a, b] for a in range(V) for b in range(V)], np.int32)
    p3 = np.asarray(_last_probs(cfg, params, jnp.asarray(seq3))).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def lossless_first3(cfg, params, rows: int, seeds: range) -> np.ndarray:
    mcfg = MedusaConfig.for_model(cfg, num_heads=2)
    full = {"base": params, "medusa": init_medusa_params(mcfg)}
    gen = GenerationSettings(max_new_tokens=3, sampling=HOT)
    st = make_settings(TREE, 2, gen, acceptance="lossless")
    counts = np.zeros((V, V, V), np.int64)
    accepted = []
    for seed in seeds:
        res = medusa_generate(cfg, mcfg, full, [PROMPT] * rows, st, seed=seed,
                              propose=imperfect_propose)
        toks = np.array(res["tokens"])
        assert toks.shape == (rows, 3)
        np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
        accepted.append(np.mean(res["mean_accepted"]))
    return counts, float(np.mean(accepted))


def test_lossless_samples_have_the_models_distribution(small):
    cfg, params = small
    exact = exact_first3(cfg, params)
    assert abs(exact.sum() - 1) < 1e-4
    counts, mean_accepted = lossless_first3(cfg, params, rows=64, seeds=range(320))
    n = counts.sum()
    assert n >= 20_000

    def tv_and_bound(exact, counts):
        # E[TV] <= 0.5 * sum sqrt(p (1 - p) / n) (Cauchy-Schwarz per outcome), and one sample
        # moves TV by at most 1/n, so by McDiarmid P(TV > E + t) <= exp(-2 n t^2): t for 1e-4
        tv = 0.5 * np.abs(counts / n - exact).sum()
        return tv, (0.5 * np.sqrt(exact * (1 - exact) / n).sum()
                    + math.sqrt(math.log(1e4) / (2 * n)))

    tv, bound = tv_and_bound(exact, counts)  # the joint law of the three tokens
    assert tv < bound, (tv, bound)
    # each token's own law (32 outcomes: a tighter bound, so a smaller error shows; accepting
    # later children with p instead of r shifts the third token's law most)
    for pos, other in enumerate([(1, 2), (0, 2), (0, 1)]):
        tv, bound = tv_and_bound(exact.sum(axis=other), counts.sum(axis=other))
        assert tv < bound, (pos, tv, bound)
    assert mean_accepted > 1.3  # the tree's drafts are really accepted (and rejected) often
    # the three tokens really vary (the test would be weak on a near-deterministic model)
    assert (exact > 0.01).sum() >= 8


# ------------------------------------------------------------------------ typical, reference
def typical_reference(tree_tokens, logits, choices, temperature, eps, delta):
    """Accepted path (node indices, root first) and its length, following the paper's rule
    literally in plain Python, for one row. ``logits[i]``: the model's logits at node ``i``."""
    buf = build_tree(choices)
    paths = [list(buf.paths[i]) for i in range(buf.num_nodes)]
    index = {tuple(p): i for i, p in enumerate(paths)}

    def accepted(node):  # node's token accepted given its parent
        parent = index[tuple(paths[node][:-1])]
        z = [x / temperature for x in logits[parent]]
        m = max(z)
        e = [math.exp(x - m) for x in z]
        s = sum(e)
        p = [x / s for x in e]
        h = -sum(q * math.log(q) for q in p if q > 0)
        return p[tree_tokens[node]] > min(eps, delta * math.exp(-h)), math.log(p[tree_tokens[node]])

    best, best_key = None, None
    for leaf in range(buf.num_nodes):
        if any(tuple(paths[j][: len(paths[leaf])]) == tuple(paths[leaf]) and j != leaf
               for j in range(buf.num_nodes)):
            continue  # not a leaf
        nodes = [0] + [index[tuple(paths[leaf][:d])] for d in range(1, len(paths[leaf]) + 1)]
        length, ll = 1, 0.0
        for node in nodes[1:]:
            ok, lp = accepted(node)
            if not ok:
                break
            length += 1
            ll += lp
        key = (length, ll)
        if best_key is None or key > best_key:
            best, best_key = nodes[:length], key
    return best, best_key[0]


def _jitted_path(tree_tokens, logits, choices, temperature, eps, delta):
    buf = build_tree(choices)
    rule = Typical(eps, delta)
    best, n, _ = rule.accept(jnp.asarray(tree_tokens), jnp.asarray(logits, jnp.float32), buf,
                             SamplingConfig(temperature=temperature), jax.random.PRNGKey(0))
    out = []
    for b in range(len(tree_tokens)):
        row = np.asarray(buf.retrieve_indices)[int(best[b])]
        out.append(([int(x) for x in row[: int(n[b])]], int(n[b])))
    return out


def _peaked(top, others=-4.0, vocab=8):
    x = np.full((vocab,), others)
    x[top] = 4.0
    return x


SMALL = [[0], [1], [0, 0], [0, 1], [1, 0]]  # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0]


def _cases():
    flat = np.zeros((8,))
    cases = {}
    # peaked parent (low entropy): eps binds; node [0] holds the argmax token, [1] a poor one
    lg = np.stack([_peaked(2), _peaked(5), _peaked(6), flat, flat, flat])
    cases["peaked"] = ([0, 2, 7, 5, 1, 3], lg)
    # flat parent (high entropy: delta*exp(-H) = 0.3/8 binds below eps): every token passes
    # p = 1/8 > 0.0375, so the longest path wins by likelihood among equals
    lg = np.stack([flat, np.log(np.array([.3, .3, .1, .1, .05, .05, .05, .05])), flat,
                   flat, flat, flat])
    cases["flat"] = ([0, 4, 5, 0, 3, 1], lg)
    # two accepted paths of equal length, different likelihoods: [0,1] (token 1, p=.3) beats
    # [0,0] (token 6, p=.05) although [0,0] comes first
    cases["tie_by_likelihood"] = ([0, 4, 5, 6, 1, 2], lg)
    # a path that breaks after its first node: [0] accepted, both children rejected
    lg = np.stack([_peaked(2), _peaked(5), flat, flat, flat, flat])
    cases["breaks_after_first"] = ([0, 2, 7, 0, 1, 3], lg)
    # entropy regime where eps and delta*exp(-H) are close: ln vs log2 matters
    mid = np.log(np.array([.5, .2, .1, .08, .06, .03, .02, .01]))
    lg = np.stack([mid, mid, mid, mid, mid, mid])
    cases["entropy_base"] = ([0, 3, 4, 1, 5, 6], lg)
    # rows where node [0] is accepted under the rule and rejected by a plausible slip (or the
    # other way round); its child [0, 0] (token 5 under a peaked node) then always follows, so
    # the accepted length is 3 or 1. Probabilities at the root, T = 1 / T = 0.7:
    flat2 = np.log(np.array([.3, .3, .1, .1, .05, .05, .05, .05]))
    for name, root, x in [
            # p(3) = .08 at T=1: above min(eps, .067), below max(eps, .067) = eps
            ("between_bounds_T1", mid, 3),
            # p(2) = .076 at T=0.7: above min(eps, .065), below eps
            ("between_bounds_T07", flat2, 2),
            # p(4) = .06 at T=1: below delta*exp(-H) in nats (.067), above it in bits (.035)
            ("entropy_nats_T1", mid, 4),
            # p(2) = .066 at T=0.7: below min(eps, .098) = eps in nats, above .06 in bits
            ("entropy_nats_T07", mid, 2)]:
        lg = np.stack([root, _peaked(5), flat, flat, flat, flat])
        cases[name] = ([0, x, 7, 5, 0, 1], lg)
    # two one-token paths whose likelihoods differ by less than float32 resolves next to a
    # length scaled by 1e6: p = .28 ([0], first in order) vs .30 ([1]); [1] must win
    near = np.log(np.array([.28, .30] + [.07] * 6))
    lg = np.stack([near, _peaked(5), _peaked(5), flat, flat, flat])
    cases["near_tie_by_likelihood"] = ([0, 0, 1, 0, 1, 0], lg)
    return cases


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_typical_matches_the_literal_rule(temperature):
    cases = _cases()
    toks = np.array([c[0] for c in cases.values()], np.int32)
    logits = np.stack([c[1] for c in cases.values()])
    got = _jitted_path(toks, logits, SMALL, temperature, 0.09, 0.3)
    lengths = []
    for b, name in enumerate(cases):
        want = typical_reference(toks[b].tolist(), logits[b].tolist(), SMALL, temperature, 0.09, 0.3)
        assert got[b] == want, (name, got[b], want)
        lengths.append(want[1])
    assert len(set(lengths)) > 1  # the batch rows differ in outcome


def test_typical_cases_cover_both_bounds():
    """The hand-built cases really exercise both sides of the min (guards the test itself)."""
    cases = _cases()

    def bounds(lg):
        p = np.exp(lg - lg.max())
        p /= p.sum()
        h = -(p * np.log(p)).sum()
        return 0.09, 0.3 * math.exp(-h)

    eps, d = bounds(cases["peaked"][1][0])
    assert eps < d  # eps binds
    eps, d = bounds(cases["flat"][1][0])
    assert d < eps  # delta exp(-H) binds


def test_typical_loop_agrees_with_the_reference_step_by_step(small):
    """The jitted loop's accepted lengths equal the reference run on the same verification
    logits: replay each step on the host from the loop's own tokens."""
    cfg, params = small
    mcfg = MedusaConfig.for_model(cfg, num_heads=2)
    heads = init_medusa_params(mcfg, rng=jax.random.PRNGKey(4), scale=0.3)
    full = {"base": params, "medusa": heads}
    sampling = SamplingConfig(temperature=0.8)
    gen = GenerationSettings(max_new_tokens=12, sampling=sampling)
    st = make_settings(TREE, 2, gen, acceptance="typical")
    prompts = [[3, 4, 5], [9, 1, 30, 2], [7]]
    res = medusa_generate(cfg, mcfg, full, prompts, st, seed=1)
    buf = st.tree
    from medusa_jax.decoding.medusa import heads_proposer

    propose = heads_proposer(mcfg, cfg, buf.topk, buf.depth)
    checked = 0
    for b, (prompt, out) in enumerate(zip(prompts, res["tokens"], strict=True)):
        pos, steps = 0, 0
        while pos < len(out):
            ctx = jnp.asarray([prompt + out[:pos]])
            h, _ = llama.forward(cfg, params, ctx)
            root = out[pos]
            cand = np.asarray(propose(full, h[:, -1], None))[0]  # [depth, k]
            flat = np.concatenate([[root], cand[:, : buf.topk].reshape(-1)])
            tree_toks = flat[np.asarray(buf.tree_indices)]
            # logits at every node: forward over context + the node's path
            node_logits = []
            for i in range(buf.num_nodes):
                path = [int(tree_toks[j]) for j in _ancestors(buf, i)]
                hh, _ = llama.forward(cfg, params, jnp.asarray([prompt + out[:pos] + path]))
                node_logits.append(np.asarray(llama.logits(cfg, params, hh[0, -1])))
            best, n = typical_reference(tree_toks.tolist(), [x.tolist() for x in node_logits],
                                        TREE, 0.8, 0.09, 0.3)
            # the loop emitted exactly the accepted tokens of this step
            want = [int(tree_toks[j]) for j in best]
            assert out[pos: pos + n] == want[: len(out) - pos], (b, steps)
            pos += n
            steps += 1
            checked += 1
        assert steps == res["steps"][b]
    assert checked >= 8


def _ancestors(buf, i):
    chain = []
    while i >= 0:
        chain.append(i)
        i = int(buf.parent[i])
    return chain[::-1]

