"""Losses for Medusa training: shifted cross entropy per head, the LM loss and distillation.

Shift conventions: the base LM head at position t predicts token t+1; Medusa head k (0-based)
at position t predicts token t+k+2. A target counts when it lies inside the sequence, its
``loss_mask`` (at the *target* position) is 1 and, for packed rows, it belongs to the same
segment as the predicting position.

Memory: head logits ``[B, T, M, V]`` in float32 are large (B=8, T=2048, M=4, V=49152 is 12 GiB,
and the backward pass keeps them). :func:`medusa_loss_from_hidden` therefore projects one head
at a time under ``jax.checkpoint``: peak memory is one ``[B, T, V]`` slab, and the backward
pass recomputes each head's logits instead of storing all of them. :func:`medusa_loss` takes
ready-made logits (tests, small vocabularies).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def shifted_targets(tokens, loss_mask, shift: int, segment_ids=None):
    """Targets ``tokens[t + shift]`` and their validity for every position t.

    ``tokens, loss_mask, segment_ids: [B, T]`` -> ``(targets [B, T] int32, valid [B, T] bool)``.
    Positions whose target falls past the end are invalid (their target is 0).
    """
    B, T = tokens.shape
    s = min(shift, T)
    pad = jnp.zeros((B, s), tokens.dtype)
    targets = jnp.concatenate([tokens[:, s:], pad], axis=1)
    valid = jnp.concatenate([loss_mask[:, s:] > 0, jnp.zeros((B, s), bool)], axis=1)
    if segment_ids is not None:
        later = jnp.concatenate([segment_ids[:, s:], jnp.full((B, s), -1, segment_ids.dtype)], 1)
        valid = valid & (later == segment_ids) & (segment_ids > 0)
    return targets.astype(jnp.int32), valid


def ce_stats(logits, targets, valid):
    """Summed cross entropy and top-1/top-5 hit counts over the valid positions.

    ``logits: [..., V]`` (any float dtype; computed in float32), ``targets, valid: [...]``.
    Returns scalars ``(ce_sum, top1_hits, top5_hits, count)``. A target's rank is the number
    of logits above it (ties broken towards the lower index, as ``argmax`` does), which costs
    O(V) instead of a sort.
    """
    logits = logits.astype(jnp.float32)
    tgt_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)  # [..., 1]
    ce = jax.nn.logsumexp(logits, axis=-1) - tgt_logit[..., 0]
    idx = jnp.arange(logits.shape[-1])
    above = (logits > tgt_logit) | ((logits == tgt_logit) & (idx < targets[..., None]))
    rank = jnp.sum(above, axis=-1)
    w = valid.astype(jnp.float32)
    return (
        jnp.sum(ce * w),
        jnp.sum((rank < 1) * w),
        jnp.sum((rank < 5) * w),
        jnp.sum(w),
    )


def heads_total(stats, decay: float):
    """Per-head sums (one :func:`ce_stats` tuple per head) -> ``(Σ_k decay^k CE_k, metrics)``
    with ``head_loss``, ``head_top1``, ``head_top5``, ``head_count``, each ``[M]``."""
    ce_sum, top1, top5, count = (jnp.stack(s) for s in zip(*stats, strict=True))
    denom = jnp.maximum(count, 1.0)
    per_head = ce_sum / denom  # [M]
    weights = decay ** jnp.arange(per_head.shape[0], dtype=jnp.float32)
    metrics = {
        "head_loss": per_head,
        "head_top1": top1 / denom,
        "head_top5": top5 / denom,
        "head_count": count,
    }
    return jnp.sum(weights * per_head), metrics


def medusa_loss(head_logits, tokens, loss_mask, decay: float = 0.8, segment_ids=None):
    """``Σ_k decay^k · CE_k`` from ready-made head logits.

    ``head_logits: [B, T, M, V]``, ``tokens, loss_mask (, segment_ids): [B, T]``. ``CE_k`` is
    the mean cross entropy of head k over its valid targets (0 when it has none). Returns
    ``(total, metrics)`` with ``head_loss``, ``head_top1``, ``head_top5``, ``head_count``, each
    ``[M]``.
    """
    M = head_logits.shape[2]
    stats = []
    for k in range(M):
        targets, valid = shifted_targets(tokens, loss_mask, k + 2, segment_ids)
        stats.append(ce_stats(head_logits[:, :, k], targets, valid))
    return heads_total(stats, decay)


def medusa_loss_from_hidden(
    head_hidden,
    logits_fn: Callable[[int, jax.Array], jax.Array],
    tokens,
    loss_mask,
    decay: float = 0.8,
    segment_ids=None,
    remat: bool = True,
):
    """Same as :func:`medusa_loss`, projecting one head at a time.

    ``head_hidden: [B, T, M, D]``; ``logits_fn(k, h)`` maps head k's ``h: [B, T, D]`` to logits
    ``[B, T, V]``. With ``remat`` each head's projection and loss run under ``jax.checkpoint``
    so only one head's logits are alive at a time, forward and backward.
    """
    M = head_hidden.shape[2]
    stats = []
    for k in range(M):
        targets, valid = shifted_targets(tokens, loss_mask, k + 2, segment_ids)

        def head_stats(h, targets, valid, k=k):
            return ce_stats(logits_fn(k, h), targets, valid)

        if remat:
            head_stats = jax.checkpoint(head_stats)
        stats.append(head_stats(head_hidden[:, :, k], targets, valid))
    return heads_total(stats, decay)


def lm_loss(logits, tokens, loss_mask, segment_ids=None):
    """Next-token cross entropy: position t predicts t+1, the mask is read at t+1.

    ``logits: [B, T, V]``, ``tokens, loss_mask: [B, T]``. Returns ``(mean CE, metrics)`` with
    ``lm_top1`` and ``lm_count``.
    """
    targets, valid = shifted_targets(tokens, loss_mask, 1, segment_ids)
    ce_sum, top1, _, count = ce_stats(logits, targets, valid)
    denom = jnp.maximum(count, 1.0)
    return ce_sum / denom, {"lm_top1": top1 / denom, "lm_count": count}


def kd_loss(student_logits, teacher_logits, loss_mask, segment_ids=None):
    """``KL(p_teacher ‖ p_student)`` per position, averaged where the next token is a target.

    ``student_logits, teacher_logits: [B, T, V]``; positions are valid as in :func:`lm_loss`
    (mask at t+1, same segment). The teacher is not differentiated. Returns ``(mean KL,
    metrics)`` with ``kd_count``.
    """
    B, T = loss_mask.shape
    _, valid = shifted_targets(jnp.zeros((B, T), jnp.int32), loss_mask, 1, segment_ids)
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), -1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [B, T]
    w = valid.astype(jnp.float32)
    count = jnp.sum(w)
    return jnp.sum(kl * w) / jnp.maximum(count, 1.0), {"kd_count": count}
