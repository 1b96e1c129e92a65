"""The train state and the jitted, optionally sharded, train steps for Medusa-1 and Medusa-2.

Parameters are ``{"base": ..., "medusa": ...}``. The optimizer state covers the *trainable*
part only: ``{"medusa": ...}`` in Medusa-1, everything in Medusa-2.

* Medusa-1: the base forward runs outside the differentiated function (and its hidden states
  go through ``stop_gradient``); ``jax.grad`` is taken with respect to the heads alone, so no
  backward pass through the base exists and the base parameters pass through the step
  untouched (bit-identical, and aliased to the output buffers by donation).
* Medusa-2: ``L = L_LM (or KL vs the frozen original base) + heads_coef · Σ_k decay^k CE_k``,
  gradients for both groups.

Batches are dicts of ``[B, T]`` int32 arrays: ``input_ids``, ``loss_mask`` and optionally
``segment_ids`` (packed rows: attention and targets stay within a segment) and ``positions``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.model import llama
from medusa_jax.model.heads import (
    head_logits,
    heads_module,
    heads_param_axes,
    init_medusa_params,
    path_embeddings,
    vocab_to_draft,
)
from medusa_jax.model.llama import LlamaModel, lm_head_weight
from medusa_jax.sharding import (
    batch_sharding,
    check_batch_size,
    mesh_context,
    param_shardings,
)
from medusa_jax.training.losses import kd_loss, lm_loss, medusa_loss_from_hidden
from medusa_jax.training.optimizer import learning_rates, make_optimizer, skipped_updates
from medusa_jax.training.run_config import TrainConfig

MEDUSA_LM_HEAD_AXES = ("medusa_heads", "embed", "vocab")


@struct.dataclass
class TrainState:
    """``step``: int32 scalar (steps taken, skipped ones included); ``params``: the full
    ``{"base", "medusa"}`` tree; ``opt_state``: over the trainable subtree; ``rng``: a key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def trainable(tcfg: TrainConfig, tree: dict) -> dict:
    """The part of a ``{"base", "medusa"}``-shaped tree the optimizer sees."""
    return {"medusa": tree["medusa"]} if tcfg.mode == "medusa1" else dict(tree)


# ------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------


def model_init_fn(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, medusa_scale: float = 0.0
) -> Callable[[jax.Array], dict]:
    """``rng -> {"base", "medusa"}`` with every leaf boxed in ``nn.LogicallyPartitioned``
    (logical axis names), the input :func:`medusa_jax.sharding.sharded_init` expects. ``medusa_scale > 0``
    draws random ResBlock weights (tests)."""
    medusa_cfg.check_compatible(model_cfg)
    model = LlamaModel(model_cfg)
    head_axes = heads_param_axes(medusa_cfg)
    head_axes["lm_head"] = MEDUSA_LM_HEAD_AXES

    def init(rng):
        rb, rm = jax.random.split(rng)
        base = model.init(rb, jnp.zeros((1, 1), jnp.int32))["params"]
        own = None if medusa_cfg.shared_lm_head else lm_head_weight(nn.meta.unbox(base), model_cfg)
        medusa = init_medusa_params(medusa_cfg, own, rm, medusa_scale)
        return {
            "base": base,
            "medusa": {k: nn.LogicallyPartitioned(v, head_axes[k]) for k, v in medusa.items()},
        }

    return init


def abstract_params(model_cfg: ModelConfig, medusa_cfg: MedusaConfig) -> dict:
    """Shapes and logical axes of the full parameter tree (boxed ``ShapeDtypeStruct`` leaves):
    the target for sharding and checkpoint restore, computed without allocating anything."""
    return jax.eval_shape(model_init_fn(model_cfg, medusa_cfg), jax.random.PRNGKey(0))


def state_shardings(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig, mesh: Mesh
) -> TrainState:
    """``NamedSharding`` for every leaf of the train state: parameters by their logical axes,
    optimizer moments like their parameters, counters and the RNG key replicated."""
    boxed = abstract_params(model_cfg, medusa_cfg)
    p_sh = param_shardings(boxed, mesh)
    train = trainable(tcfg, nn.meta.unbox(boxed))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(make_optimizer(tcfg).init, train)
    opt_sh = _mirror_shardings(abstract_opt, trainable(tcfg, p_sh), train, replicated)
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh, rng=replicated)


def _mirror_shardings(tree, p_sh, p_abstract, default):
    """Shardings for a tree whose leaves mirror parameters (optimizer moments): a leaf whose
    key path ends with a parameter's path and has its shape takes that parameter's sharding;
    anything else (counters) gets ``default``."""
    by_path = {}
    for (path, sh), leaf in zip(
        jax.tree_util.tree_leaves_with_path(p_sh), jax.tree.leaves(p_abstract), strict=True
    ):
        by_path[tuple(path)] = (sh, leaf.shape)

    def one(path, leaf):
        for i in range(len(path)):
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return default

    return jax.tree_util.tree_map_with_path(one, tree)


def init_train_state(
    model_cfg: ModelConfig,
    medusa_cfg: MedusaConfig,
    tcfg: TrainConfig,
    params: dict,
    mesh: Mesh | None = None,
) -> TrainState:
    """A fresh state around ``params`` (already placed, e.g. by ``sharded_init`` or
    ``shard_params``, when a mesh is given). The optimizer state is created in its shards."""
    tx = make_optimizer(tcfg)
    rng = jax.random.PRNGKey(tcfg.seed)
    step = jnp.zeros((), jnp.int32)
    if mesh is None:
        return TrainState(
            step=step, params=params, opt_state=tx.init(trainable(tcfg, params)), rng=rng
        )
    sh = state_shardings(model_cfg, medusa_cfg, tcfg, mesh)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(trainable(tcfg, params))
    return TrainState(
        step=jax.device_put(step, sh.step),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(rng, sh.rng),
    )


# ------------------------------------------------------------------------------------------
# Forward pieces
# ------------------------------------------------------------------------------------------


def _chunk_mask(batch):
    seg = batch.get("segment_ids")
    return None if seg is None else seg[:, :, None] == seg[:, None, :]  # [B, T, T]


def base_hidden(model: LlamaModel, base_params, batch):
    """The base model's final-normed hidden states ``[B, T, D]`` for a training batch."""
    hidden, _ = llama.forward(model.cfg, base_params, batch["input_ids"], batch.get("positions"),
                              chunk_mask=_chunk_mask(batch))
    return hidden


def next_tokens(tokens, n: int):
    """``tokens: [B, T]`` -> ``[B, T, n]``: tokens t+1 .. t+n at every position, -1 past the
    row's end. (Across a packed segment boundary they are another segment's tokens; the
    targets there are invalid, so no loss reads them.)"""
    B, T = tokens.shape
    pad = jnp.concatenate([tokens, jnp.full((B, n), -1, tokens.dtype)], axis=1)
    return jnp.stack([pad[:, j + 1: j + 1 + T] for j in range(n)], axis=-1)


def heads_loss(model, heads, tcfg, base_params, medusa_params, hidden, batch):
    """``(Σ_k decay^k CE_k, per-head metrics)`` of the heads on the base's hidden states
    ``hidden: [B, T, D]``, one head at a time (the training loss; the evaluation reads its
    per-head statistics)."""
    mcfg = heads.cfg
    inputs = [hidden]
    if mcfg.is_hydra:  # teacher-forced path: tokens t+1 .. t+M of the row (none past the end)
        inputs.append(path_embeddings(base_params["embed"]["embedding"],
                                      next_tokens(batch["input_ids"], mcfg.num_heads)))
    head_hidden = heads.apply(
        {"params": {k: v for k, v in medusa_params.items() if k != "lm_head"}}, *inputs
    )  # [B, T, M, D]

    def base_logits(h):
        return llama.logits(model.cfg, base_params, h)

    lm = lm_head_weight(base_params, model.cfg) if mcfg.draft_ids is not None else None

    def logits_fn(k, h):  # h: [B, T, D] -> [B, T, V] (V' with a draft vocabulary)
        own = {"lm_head": medusa_params["lm_head"][k : k + 1]} if "lm_head" in medusa_params else {}
        return head_logits(mcfg, own, h[..., None, :], base_logits, lm)[..., 0, :]

    tokens, loss_mask = batch["input_ids"], batch["loss_mask"]
    if mcfg.draft_ids is not None:  # targets as draft columns; tokens outside it are no targets
        cols = vocab_to_draft(mcfg, tokens)
        tokens, loss_mask = jnp.maximum(cols, 0), loss_mask * (cols >= 0).astype(loss_mask.dtype)
    return medusa_loss_from_hidden(
        head_hidden,
        logits_fn,
        tokens,
        loss_mask,
        tcfg.decay,
        batch.get("segment_ids"),
    )


class _Steps:
    """The pure (unjitted) step functions for one configuration."""

    def __init__(self, model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig):
        medusa_cfg.check_compatible(model_cfg)
        self.tcfg = tcfg
        self.model = LlamaModel(model_cfg)
        self.heads = heads_module(medusa_cfg, dtype=model_cfg.dtype)
        self.tx = make_optimizer(tcfg)

    def _apply(self, state: TrainState, grads, metrics, batch):
        tcfg = self.tcfg
        train = trainable(tcfg, state.params)
        lrs = learning_rates(tcfg, state.opt_state)  # the rates this update uses
        updates, opt_state = self.tx.update(grads, state.opt_state, train)
        params = {**state.params, **optax.apply_updates(train, updates)}
        skipped, consecutive = skipped_updates(opt_state)
        metrics = {
            **metrics,
            **lrs,
            "grad_norm": optax.tree.norm(grads),
            "update_skipped": jnp.logical_not(opt_state.last_finite).astype(jnp.int32),
            "skipped_updates": skipped,
            "nonfinite_consecutive": consecutive,
            "num_tokens": jnp.sum(batch["loss_mask"] > 0).astype(jnp.int32),
        }
        rng, _ = jax.random.split(state.rng)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new, metrics

    def medusa1_from_hidden(self, state: TrainState, hidden, batch):
        """Medusa-1 update from base hidden states ``[B, T, D]``."""
        hidden = jax.lax.stop_gradient(hidden)
        base = state.params["base"]

        def loss_fn(medusa):
            return heads_loss(self.model, self.heads, self.tcfg, base, medusa, hidden, batch)

        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params["medusa"])
        return self._apply(state, {"medusa": g}, {"loss": loss, **metrics}, batch)

    def medusa1(self, state: TrainState, batch):
        return self.medusa1_from_hidden(
            state, base_hidden(self.model, state.params["base"], batch), batch
        )

    def medusa2(self, state: TrainState, batch, frozen_base=None):
        tcfg, model = self.tcfg, self.model
        seg = batch.get("segment_ids")

        teacher = None
        if tcfg.kd:  # the original model's logits, outside the differentiated function
            teacher_hidden = base_hidden(model, frozen_base, batch)
            teacher = llama.logits(model.cfg, frozen_base, teacher_hidden)

        def loss_fn(train):
            base = train["base"]
            hidden = base_hidden(model, base, batch)
            logits = llama.logits(model.cfg, base, hidden)  # [B, T, V]
            if tcfg.kd:
                lm, lm_metrics = kd_loss(logits, teacher, batch["loss_mask"], seg)
                lm_metrics = {"kd_loss": lm, **lm_metrics}
            else:
                lm, lm_metrics = lm_loss(logits, batch["input_ids"], batch["loss_mask"], seg)
                lm_metrics = {"lm_loss": lm, **lm_metrics}
            heads_total, head_metrics = heads_loss(
                model, self.heads, tcfg, base, train["medusa"], hidden, batch
            )
            loss = lm + tcfg.heads_coef * heads_total
            return loss, {"loss": loss, "heads_loss": heads_total, **lm_metrics, **head_metrics}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return self._apply(state, grads, metrics, batch)


# ------------------------------------------------------------------------------------------
# Jitted entry points
# ------------------------------------------------------------------------------------------


def _wrap(jitted, mesh):
    if mesh is None:
        return jitted

    def call(*args):
        # Tracing happens on the first call, inside the mesh and the logical rules, so the
        # model's activation constraints bind to this mesh.
        with mesh_context(mesh):
            return jitted(*args)

    return call


def jitted_train_step(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig, mesh: Mesh | None = None
):
    """The ``jax.jit`` of the Medusa-1 or Medusa-2 step, ``(state, batch[, frozen_base]) ->
    (state, metrics)``, ``state`` donated: what :func:`make_train_step` calls, and what an
    ahead-of-time compile lowers. With ``mesh``: explicit shardings for the state
    (:func:`state_shardings`), the batch (rows over ``data`` x ``fsdp``), ``frozen_base``
    (with ``kd``, like ``params["base"]``) and the replicated metrics. Trace it inside
    ``mesh_context(mesh)``, so the model's activation constraints bind to the mesh."""
    steps = _Steps(model_cfg, medusa_cfg, tcfg)
    kd = tcfg.mode == "medusa2" and tcfg.kd
    fn = steps.medusa1 if tcfg.mode == "medusa1" else steps.medusa2
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    check_batch_size(tcfg.batch_size, mesh)
    sh = state_shardings(model_cfg, medusa_cfg, tcfg, mesh)
    in_sh = (sh, batch_sharding(mesh)) + ((sh.params["base"],) if kd else ())
    return jax.jit(fn, in_shardings=in_sh, out_shardings=(sh, sh.step), donate_argnums=(0,))


def make_train_step(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig, mesh: Mesh | None = None
):
    """``train_step(state, batch, frozen_base=None) -> (state, metrics)``, jitted, donating
    ``state``. ``frozen_base`` (the original base parameters, sharded like ``params["base"]``)
    is required with ``tcfg.kd`` and ignored otherwise.

    With ``mesh``: explicit shardings for the state (:func:`state_shardings`), the batch
    (rows over ``data`` x ``fsdp``) and the replicated metrics. Metrics: ``loss``,
    ``lm_loss``/``kd_loss`` and ``heads_loss`` (Medusa-2), ``head_loss``/``head_top1``/
    ``head_top5``/``head_count`` (``[M]``), ``lr_base``, ``lr_heads``, ``grad_norm`` (before
    clipping), ``update_skipped``, ``skipped_updates``, ``nonfinite_consecutive``,
    ``num_tokens``.
    """
    kd = tcfg.mode == "medusa2" and tcfg.kd
    call = _wrap(jitted_train_step(model_cfg, medusa_cfg, tcfg, mesh), mesh)

    def train_step(state: TrainState, batch: dict, frozen_base=None):
        if not kd:
            return call(state, batch)
        if frozen_base is None:
            raise ValueError("kd=True: pass the frozen original base parameters as frozen_base")
        return call(state, batch, frozen_base)

    return train_step


def make_medusa1_step_from_hidden(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig, mesh: Mesh | None = None
):
    """``step(state, hidden, batch) -> (state, metrics)``: a Medusa-1 update from precomputed
    base hidden states ``hidden: [B, T, D]`` (see :func:`make_hidden_fn`), so a dataset's
    hidden states can be computed once and the heads trained many epochs on them. Same loss
    and metrics as :func:`make_train_step` in Medusa-1."""
    if tcfg.mode != "medusa1":
        raise ConfigError(
            f"training from cached hidden states needs mode='medusa1', got {tcfg.mode!r}"
        )
    steps = _Steps(model_cfg, medusa_cfg, tcfg)
    if mesh is None:
        return jax.jit(steps.medusa1_from_hidden, donate_argnums=(0,))
    check_batch_size(tcfg.batch_size, mesh)
    sh = state_shardings(model_cfg, medusa_cfg, tcfg, mesh)
    jitted = jax.jit(
        steps.medusa1_from_hidden,
        in_shardings=(sh, batch_sharding(mesh, 3), batch_sharding(mesh)),
        out_shardings=(sh, sh.step),
        donate_argnums=(0,),
    )
    return _wrap(jitted, mesh)


def make_hidden_fn(model_cfg: ModelConfig, mesh: Mesh | None = None):
    """``hidden_fn(base_params, batch) -> [B, T, D]``: the base's final hidden states, to cache
    for :func:`make_medusa1_step_from_hidden`."""
    model = LlamaModel(model_cfg)

    def fn(base_params, batch):
        return base_hidden(model, base_params, batch)

    if mesh is None:
        return jax.jit(fn)
    p_sh = param_shardings(
        jax.eval_shape(
            LlamaModel(model_cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)
        )["params"],
        mesh,
    )
    jitted = jax.jit(
        fn, in_shardings=(p_sh, batch_sharding(mesh)), out_shardings=batch_sharding(mesh, 3)
    )
    return _wrap(jitted, mesh)
