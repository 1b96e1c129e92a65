"""A perfect draft ("oracle") proposer: it proposes the true continuation, so every step accepts
the tree's full depth. For tests (cache compaction at its longest) and for measuring the
full-acceptance speedup of a tree on random weights, where real heads accept nothing.

    ref = vanilla greedy continuation of the prompts, [B, R] (R >= max_new_tokens + depth)
    res = medusa_generate(cfg, mcfg, with_reference(params, ref), prompts, settings,
                          propose=oracle_proposer(depth, topk))
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def with_reference(params: dict, reference) -> dict:
    """``params`` with the reference continuation ``[B, R]`` (token ids) the oracle reads."""
    return dict(params, oracle=jnp.asarray(np.asarray(reference, np.int32)))


@functools.lru_cache(maxsize=16)
def oracle_proposer(num_heads: int = 8, topk: int = 16):
    """A proposer ``(params, hidden, state) -> [B, num_heads, topk]``: head m's rank-0 guess is
    the reference token m + 2 places after the last accepted one (the root is the first), read
    from ``params["oracle"]: [B, R]``; other ranks are wrong on purpose. The guesses are only
    right if ``hidden`` is the base hidden state at the last accepted token (its LM-head argmax
    must be the root, else every guess is made wrong). Cached, so the jitted loop's static
    argument is the same function every call."""

    def propose(params, hidden, state):
        ref, base = params["oracle"], params["base"]
        w = base["lm_head"] if "lm_head" in base else base["embed"]["embedding"].T  # [D, V]
        V = w.shape[1]
        idx = state.n_out[:, None] + jnp.arange(num_heads + 1)[None, :]  # [B, M + 1]
        tok = jnp.take_along_axis(ref, jnp.clip(idx, 0, ref.shape[1] - 1), axis=1)
        root_ok = jnp.argmax(hidden @ w.astype(hidden.dtype), axis=-1) == tok[:, 0]  # [B]
        tok = jnp.where(root_ok[:, None], tok[:, 1:], (tok[:, 1:] + 1) % V)
        ranks = jnp.arange(topk)[None, None, :]
        return ((tok[..., None] + ranks) % V).astype(jnp.int32)  # [B, M, K]

    return propose
