"""Medusa heads: ``head_m(h) = W_vocab · ResBlock^N(h)``, ``ResBlock(x) = x + SiLU(W x + b)``.

Parameters are stacked over heads so all M heads run as one einsum: ``res_kernel [M, N, D, D]``
(input -> output), ``res_bias [M, N, D]`` and, without a shared LM head, ``lm_head [M, D, V]``.
Every ResBlock has its own weights. W and b start at zero, so a fresh head equals the base LM
head (it predicts the next token, not the one after: training moves it).

Hydra heads (``head_type="hydra"``, sequentially dependent) also read the tokens on their path:
head m (0-based) guesses token t+m+2 from h_t and the base model's input embeddings
``e_1 .. e_{m+1}`` of tokens t+1 .. t+m+1 (t+1 is the base model's own prediction, the others
were drafted by the heads before it). Its input is a per-head projection of the concatenation
``[h_t; e_1; ...; e_{m+1}]`` to D, ``x = W_h h_t + sum_j W_e[j] e_j + b``, then the same
ResBlocks: ``in_hidden [M, D, D]``, ``in_embed [M, M, E, D]`` (slot j of head m is used for
j <= m only), ``in_bias [M, D]``. The Hydra paper runs its ResBlocks on the concatenation; the
projection first keeps a head's cost that of a Medusa head plus one ``[E, D]`` product per path
token. ``W_h`` starts as the identity and ``W_e`` at zero, so a fresh Hydra head equals a fresh
Medusa head, and training starts from the base LM head's guess.
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
        w = self.param("res_kernel", nn.with_logical_partitioning(
            _fresh(c, "res_kernel"), ("medusa_heads", "medusa_layers", "embed", "embed_out")))
        b = self.param("res_bias", nn.with_logical_partitioning(
            _fresh(c, "res_bias"), ("medusa_heads", "medusa_layers", "embed_out")))
        x = jnp.broadcast_to(hidden[..., None, :], (*hidden.shape[:-1], M, D)).astype(dt)
        for j in range(N):
            x = x + jax.nn.silu(jnp.einsum("...md,mde->...me", x, w[:, j].astype(dt)) + b[:, j].astype(dt))
        return x


def hydra_hidden(mcfg: MedusaConfig, params, hidden, embeds, head: int | None = None,
                 dtype=None):
    """Hydra heads' hidden states, ready for :func:`head_logits`.

    ``head=None`` (training, teacher-forced): ``hidden: [..., D]``, ``embeds: [..., M, E]`` (the
    embeddings of tokens t+1 .. t+M) -> ``[..., M, D]``; head m reads ``embeds[..., :m+1]``.
    ``head=m`` (drafting): ``hidden: [..., D]``, ``embeds: [..., m+1, E]`` -> ``[..., D]``."""
    dt = jnp.dtype(dtype) if dtype is not None else hidden.dtype
    h, e = hidden.astype(dt), embeds.astype(dt)
    M, N = mcfg.num_heads, mcfg.num_layers
    if head is None:
        w_e = params["in_embed"].astype(dt) * np.tril(np.ones((M, M), np.float32))[:, :, None, None]
        x = (jnp.einsum("...d,mde->...me", h, params["in_hidden"].astype(dt))
             + jnp.einsum("...je,mjed->...md", e, w_e) + params["in_bias"].astype(dt))  # [..., M, D]
        for j in range(N):
            x = x + jax.nn.silu(jnp.einsum("...md,mde->...me", x, params["res_kernel"][:, j].astype(dt))
                                + params["res_bias"][:, j].astype(dt))
        return x
    m = head
    x = (h @ params["in_hidden"][m].astype(dt)
         + jnp.einsum("...je,jed->...d", e, params["in_embed"][m, : m + 1].astype(dt))
         + params["in_bias"][m].astype(dt))  # [..., D]
    for j in range(N):
        x = x + jax.nn.silu(x @ params["res_kernel"][m, j].astype(dt) + params["res_bias"][m, j].astype(dt))
    return x


class HydraHeads(nn.Module):
    """Parameter declarations (logical axes; values from :func:`fresh_medusa_params`) of Hydra
    heads; ``__call__`` is the teacher-forced forward of :func:`hydra_hidden`."""

    cfg: MedusaConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, hidden, embeds):
        """``hidden: [..., D]``, ``embeds: [..., M, E]`` -> ``[..., M, D]``."""
        c = self.cfg
        axes = {
            "in_hidden": ("medusa_heads", "embed", "embed_out"),
            "in_embed": ("medusa_heads", "medusa_path", "embed", "embed_out"),
            "in_bias": ("medusa_heads", "embed_out"),
            "res_kernel": ("medusa_heads", "medusa_layers", "embed", "embed_out"),
            "res_bias": ("medusa_heads", "medusa_layers", "embed_out"),
        }
        p = {k: self.param(k, nn.with_logical_partitioning(_fresh(c, k), a))
             for k, a in axes.items()}
        return hydra_hidden(c, p, hidden, embeds, dtype=self.dtype)


def heads_module(mcfg: MedusaConfig, dtype: str = "float32") -> nn.Module:
    """The module of ``mcfg.head_type``: ``MedusaHeads`` (called with ``hidden``) or
    ``HydraHeads`` (``hidden, embeds``)."""
    return (HydraHeads if mcfg.is_hydra else MedusaHeads)(mcfg, dtype=dtype)


def heads_param_axes(mcfg: MedusaConfig) -> dict[str, tuple[str, ...]]:
    """Logical axis names of every head parameter (without the own ``lm_head``)."""
    mod = heads_module(mcfg)
    args = [jnp.zeros((1, mcfg.hidden_size))]
    if mcfg.is_hydra:
        args.append(jnp.zeros((1, mcfg.num_heads, mcfg.embed_size)))
    shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), *args)["params"]
    return {k: tuple(v.names) for k, v in shapes.items()}


def path_embeddings(embedding, tokens):
    """Teacher-forced Hydra inputs: ``embedding: [V, E]`` (the base model's input table),
    ``tokens: [..., M]`` (tokens t+1 .. t+M; entries < 0 mean none and give zeros) ->
    ``[..., M, E]``."""
    e = jnp.take(embedding, jnp.maximum(tokens, 0), axis=0)
    return jnp.where((tokens >= 0)[..., None], e, 0)


def head_logits(mcfg: MedusaConfig, medusa_params, head_hidden, base_logits_fn, base_lm_head=None,
                draft_proj=None):
    """Per-head logits ``[..., M, V]`` float32 from ``head_hidden: [..., M, D]``; with a shared
    LM head ``base_logits_fn`` (the base model's projection) is applied to every head.

    With ``mcfg.draft_ids`` the logits cover the draft vocabulary only (``[..., M, V']``, column
    ``j`` is token ``draft_ids[j]``; map back with :func:`draft_to_vocab`), projected through
    those rows of ``base_lm_head: [D, V]`` (or through ``draft_proj: [D, V']``, those columns
    gathered beforehand)."""
    if mcfg.draft_ids is not None and draft_proj is not None:
        return (head_hidden @ draft_proj.astype(head_hidden.dtype)).astype(jnp.float32)
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


def fresh_medusa_params(mcfg: MedusaConfig, base_lm_head=None, xp=np) -> dict:
    """The one definition of a fresh head set: zero ResBlocks (a fresh head is the base LM
    head), for Hydra heads the input projection ``h_t`` alone (``in_hidden`` the identity,
    ``in_embed`` and ``in_bias`` zero) and, without a shared LM head, copies of ``base_lm_head:
    [D, V]`` (the original recipe; left out when it is None). In ``mcfg.param_dtype``.

    ``xp=np`` (host arrays; the LM head copies are read-only broadcast views, no memory) for a
    trainer to shard; ``xp=jnp`` inside traced code (the modules' initialisers,
    :func:`init_medusa_params`)."""
    M, N, D = mcfg.num_heads, mcfg.num_layers, mcfg.hidden_size
    dt = np.dtype(jnp.dtype(mcfg.param_dtype))
    p = {"res_kernel": xp.zeros((M, N, D, D), dt), "res_bias": xp.zeros((M, N, D), dt)}
    if mcfg.is_hydra:
        p["in_hidden"] = xp.broadcast_to(xp.eye(D, dtype=dt), (M, D, D)).copy()
        p["in_embed"] = xp.zeros((M, M, mcfg.embed_size, D), dt)
        p["in_bias"] = xp.zeros((M, D), dt)
    if not mcfg.shared_lm_head and base_lm_head is not None:
        lm = xp.asarray(base_lm_head, dt)
        p["lm_head"] = xp.broadcast_to(lm[None], (M, *lm.shape))
    return p


def _fresh(mcfg: MedusaConfig, name: str):
    """A flax initialiser giving parameter ``name`` its :func:`fresh_medusa_params` value."""
    return lambda key: fresh_medusa_params(mcfg, xp=jnp)[name]


def init_medusa_params(mcfg: MedusaConfig, base_lm_head=None, rng=None, scale: float = 0.0) -> dict:
    """Fresh head parameters (:func:`fresh_medusa_params`) as jax arrays. ``scale > 0`` adds
    random ResBlock weights (and, for Hydra heads, input projections), for tests. Own LM heads
    start as copies of ``base_lm_head: [D, V]`` when given, else random."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    M, N, D = mcfg.num_heads, mcfg.num_layers, mcfg.hidden_size
    pdt = jnp.dtype(mcfg.param_dtype)
    k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
    p = fresh_medusa_params(mcfg, base_lm_head, xp=jnp)
    if not mcfg.shared_lm_head and base_lm_head is None:
        p["lm_head"] = (0.02 * jax.random.normal(k3, (M, D, mcfg.vocab_size))).astype(pdt)
    if scale:
        noise = {"res_kernel": jax.random.normal(k1, (M, N, D, D)),
                 "res_bias": jax.random.normal(k2, (M, N, D))}
        if mcfg.is_hydra:
            tril = np.tril(np.ones((M, M), np.float32))[:, :, None, None]  # unused slots stay 0
            noise["in_hidden"] = jax.random.normal(k4, (M, D, D))
            noise["in_embed"] = tril * jax.random.normal(k5, (M, M, mcfg.embed_size, D))
        for k, n in noise.items():
            p[k] = (p[k] + scale * n).astype(pdt)
    return p
