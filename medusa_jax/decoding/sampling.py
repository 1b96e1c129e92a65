"""Sampling settings and logit processing shared by the vanilla and Medusa loops."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medusa_jax.errors import GenerationError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static (hashable) sampling settings. ``temperature == 0`` means greedy.

    ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# top-p looks for its cutoff among this many of the largest logits first: a full sort of a
# 49k-token vocabulary costs XLA:CPU ~15 ms per row, top_k a fraction of that (the sort is the
# fallback, so the result is exact either way)
TOP_P_CANDIDATES = 256


def filter_logits(logits: jax.Array, cfg: SamplingConfig,
                  candidates: int = TOP_P_CANDIDATES) -> jax.Array:
    """Temperature, top-k and top-p applied to ``logits: [..., V]`` (float32). Removed entries
    become -inf. Not used in greedy mode.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (at least the
    best one). Its cutoff is found among the ``candidates`` largest logits; only when those hold
    less than ``top_p`` of the mass in some row is the whole vocabulary sorted, so the kept set
    is the same as with a full sort."""
    x = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)

        def cutoff(top):  # top: the largest logits of each row, descending
            probs = jnp.exp(top - lse)
            cum = jnp.cumsum(probs, axis=-1)
            keep = (cum - probs) < cfg.top_p  # the mass before a token is still short of top_p
            return jnp.min(jnp.where(keep, top, jnp.inf), axis=-1, keepdims=True), cum[..., -1]

        full = lambda: cutoff(jnp.sort(x, axis=-1)[..., ::-1])[0]
        if candidates < x.shape[-1]:
            cut, mass = cutoff(jax.lax.top_k(x, candidates)[0])
            cut = jax.lax.cond(jnp.all(mass >= cfg.top_p), lambda: cut, full)
        else:
            cut = full()
        x = jnp.where(x < cut, -jnp.inf, x)
    return x


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next tokens ``[...]`` int32 from ``logits: [..., V]``."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
