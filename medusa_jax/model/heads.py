"""Medusa heads: ``head_m(h) = W_vocab · ResBlock^N(h)``, ``ResBlock(x) = x + SiLU(W x + b)``.

Parameters are stacked over heads so all M heads run as one einsum: ``res_kernel [M, N, D, D]``
(input -> output), ``res_bias [M, N, D]`` and, without a shared LM head, ``lm_head [M, D, V]``.
Every ResBlock has its own weights. W and b start at zero, so a fresh head equals the base LM
head (it predicts the next token, not the one after: training moves it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import MedusaConfig


class MedusaHeads(nn.Module):
    cfg: MedusaConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, hidden):
        """``hidden: [..., D]`` (the base model's final-normed hidden state) -> per-head hidden
        states ``[..., M, D]``, ready for a vocab projection (``project``)."""
        c, dt = self.cfg, jnp.dtype(self.dtype)
        M, N, D = c.num_heads, c.num_layers, c.hidden_size
        pdt = jnp.dtype(c.param_dtype)
        w = self.param("res_kernel", nn.with_logical_partitioning(
            nn.initializers.zeros, ("medusa_heads", "medusa_layers", "embed", "embed_out")),
            (M, N, D, D), pdt)
        b = self.param("res_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("medusa_heads", "medusa_layers", "embed_out")), (M, N, D), pdt)
        x = jnp.broadcast_to(hidden[..., None, :], (*hidden.shape[:-1], M, D)).astype(dt)
        for j in range(N):
            x = x + jax.nn.silu(jnp.einsum("...md,mde->...me", x, w[:, j].astype(dt)) + b[:, j].astype(dt))
        return x


def head_logits(mcfg: MedusaConfig, medusa_params, head_hidden, base_logits_fn, base_lm_head=None):
    """Per-head logits ``[..., M, V]`` float32 from ``head_hidden: [..., M, D]``; with a shared
    LM head ``base_logits_fn`` (the base model's projection) is applied to every head.

    With ``mcfg.draft_ids`` the logits cover the draft vocabulary only (``[..., M, V']``, column
    ``j`` is token ``draft_ids[j]``; map back with :func:`draft_to_vocab`), projected through
    those rows of ``base_lm_head: [D, V]``."""
    if mcfg.draft_ids is not None:
        if base_lm_head is None:
            raise ValueError("heads with draft_ids need base_lm_head=[D, V] for their projection")
        w = jnp.take(base_lm_head, np.asarray(mcfg.draft_ids, np.int32), axis=1)  # [D, V']
        return (head_hidden @ w.astype(head_hidden.dtype)).astype(jnp.float32)
    if mcfg.shared_lm_head:
        return base_logits_fn(head_hidden)
    w = medusa_params["lm_head"]  # [M, D, V]
    return jnp.einsum("...md,mdv->...mv", head_hidden, w.astype(head_hidden.dtype)).astype(jnp.float32)


def draft_to_vocab(mcfg: MedusaConfig, idx):
    """Column indices of :func:`head_logits` -> token ids (identity without a draft vocab)."""
    if mcfg.draft_ids is None:
        return idx
    return jnp.take(jnp.asarray(np.asarray(mcfg.draft_ids, np.int32)), idx)


def vocab_to_draft(mcfg: MedusaConfig, tokens):
    """Token ids -> draft columns, ``-1`` for tokens outside the draft vocabulary."""
    if mcfg.draft_ids is None:
        return tokens
    table = np.full((mcfg.vocab_size,), -1, np.int32)
    table[np.asarray(mcfg.draft_ids)] = np.arange(len(mcfg.draft_ids), dtype=np.int32)
    return jnp.take(jnp.asarray(table), tokens)


def init_medusa_params(mcfg: MedusaConfig, base_lm_head=None, rng=None, scale: float = 0.0) -> dict:
    """Fresh head parameters. ``scale > 0`` draws random (non-zero) ResBlock weights, for tests.
    Own LM heads start as copies of ``base_lm_head: [D, V]`` when given (the original recipe)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    M, N, D = mcfg.num_heads, mcfg.num_layers, mcfg.hidden_size
    pdt = jnp.dtype(mcfg.param_dtype)
    k1, k2, k3 = jax.random.split(rng, 3)
    p = {
        "res_kernel": (scale * jax.random.normal(k1, (M, N, D, D))).astype(pdt),
        "res_bias": (scale * jax.random.normal(k2, (M, N, D))).astype(pdt),
    }
    if not mcfg.shared_lm_head:
        if base_lm_head is not None:
            p["lm_head"] = jnp.broadcast_to(jnp.asarray(base_lm_head, pdt)[None], (M, D, mcfg.vocab_size))
        else:
            p["lm_head"] = (0.02 * jax.random.normal(k3, (M, D, mcfg.vocab_size))).astype(pdt)
    return p
