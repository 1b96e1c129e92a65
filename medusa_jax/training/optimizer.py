"""The optimizer: AdamW per parameter group, one schedule each, clipping and NaN skipping.

Structure (outermost first)::

    apply_if_finite(                      # a non-finite gradient skips the whole step
        chain(clip_by_global_norm,        # one norm over every trainable parameter
              multi_transform({"base": adamw(base schedule),
                               "medusa": adamw(heads schedule),
                               "frozen": set_to_zero()})))

Groups come from the top-level key of ``{"base": ..., "medusa": ...}``. The train step hands
Medusa-1 only ``{"medusa": ...}``: the base is then no optimizer input at all, so no zero
gradient tree the size of the base is ever built. ``"frozen"`` is there for callers who pass
the full tree in Medusa-1.

Learning rates are pure functions of the number of *applied* updates (skipped steps do not
advance optax's counters); :func:`learning_rates` evaluates them for metrics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from medusa_jax.training.run_config import TrainConfig

# apply_if_finite gives up and applies a non-finite update after this many in a row; we never
# want that (NaNs in the weights end the run), so the loop watches ``nonfinite_consecutive``.
_NEVER = 2**30
_NO_DECAY = ("bias", "scale")  # RMSNorm scales and biases, the usual AdamW exclusions


def warmup_schedule(peak: float, total: int, warmup: int, kind: str) -> optax.Schedule:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to 0 at ``total`` or
    constant. The first step already gets ``peak / warmup`` (no wasted step at lr 0)."""

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (c + 1.0) / max(warmup, 1)) if warmup > 0 else 1.0
        if kind == "constant":
            return peak * warm
        progress = jnp.clip((c - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return peak * jnp.where(c < warmup, warm, cosine)

    return schedule


def heads_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """The heads' learning rate over all ``tcfg.steps``."""
    return warmup_schedule(
        tcfg.peak_heads_lr, tcfg.steps, tcfg.num_warmup_steps(tcfg.steps), tcfg.schedule
    )


def base_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """The base's learning rate: 0 in Medusa-1, and in Medusa-2 0 for the heads-warmup steps,
    then a full warmup + decay schedule over the remaining joint steps. (During the heads
    warmup the base's Adam moments still see its gradients, so joint training starts with
    warm moments; the base itself does not move, AdamW's decay being scaled by the lr too.)"""
    if tcfg.mode == "medusa1":
        return lambda count: jnp.zeros((), jnp.float32)
    hw = tcfg.heads_warmup_steps
    joint = tcfg.steps - hw
    inner = warmup_schedule(tcfg.base_lr, joint, tcfg.num_warmup_steps(joint), tcfg.schedule)

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        return jnp.where(c < hw, 0.0, inner(jnp.maximum(c - hw, 0.0)))

    return schedule


def param_labels(tcfg: TrainConfig, params: dict) -> dict:
    """A tree like ``params`` with each leaf's group: ``"medusa"``, and for the base
    ``"base"`` (Medusa-2) or ``"frozen"`` (Medusa-1)."""
    unknown = set(params) - {"base", "medusa"}
    if unknown:
        raise ValueError(
            f"params must be {{'base': ..., 'medusa': ...}}, got keys {sorted(params)}"
        )
    base_label = "base" if tcfg.mode == "medusa2" else "frozen"
    return {
        k: jax.tree.map(lambda _, k=k: "medusa" if k == "medusa" else base_label, v)
        for k, v in params.items()
    }


def _decay_mask(params):
    def keep(path, _):
        last = path[-1]
        name = str(getattr(last, "key", getattr(last, "name", last)))
        return not any(name.endswith(s) for s in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def _adamw(tcfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        schedule,
        b1=tcfg.adam_b1,
        b2=tcfg.adam_b2,
        eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
        mask=_decay_mask,
    )


def make_optimizer(tcfg: TrainConfig, params: dict | None = None) -> optax.GradientTransformation:
    """The optimizer for a ``{"base"?: ..., "medusa": ...}`` tree. Only the top-level keys of
    ``params`` matter (they pick the groups; leaves are labelled when ``init`` sees the tree);
    the default is what the train step optimizes: ``{"medusa"}`` in Medusa-1, both in
    Medusa-2."""
    keys = (
        set(params)
        if params is not None
        else ({"medusa"} if tcfg.mode == "medusa1" else {"base", "medusa"})
    )
    used = {"medusa"} | (
        {"base" if tcfg.mode == "medusa2" else "frozen"} if "base" in keys else set()
    )
    groups = {
        "base": _adamw(tcfg, base_schedule(tcfg)),
        "medusa": _adamw(tcfg, heads_schedule(tcfg)),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(
        {g: t for g, t in groups.items() if g in used}, lambda p: param_labels(tcfg, p)
    )
    if tcfg.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), tx)
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


def skipped_updates(opt_state) -> tuple[jax.Array, jax.Array]:
    """``(total, consecutive)`` numbers of steps skipped for non-finite gradients."""
    return opt_state.total_notfinite, opt_state.notfinite_count


def learning_rates(tcfg: TrainConfig, opt_state) -> dict[str, jax.Array]:
    """The learning rates the *next* update will use, per group: ``lr_base``, ``lr_heads``.

    Skipped steps leave every group's counters untouched, so the heads' Adam counter is the
    count both schedules see.
    """
    count = _applied_count(opt_state)
    return {"lr_base": base_schedule(tcfg)(count), "lr_heads": heads_schedule(tcfg)(count)}


def _applied_count(opt_state) -> jax.Array:
    # ScaleByAdamState of the "medusa" group: inner chain -> multi_transform -> masked -> adamw.
    multi = opt_state.inner_state
    if not hasattr(multi, "inner_states"):  # chained after clip_by_global_norm
        multi = multi[-1]
    return multi.inner_states["medusa"].inner_state[0].count
