"""Compile the Medusa-1/2 train step (:func:`medusa_jax.training.step.jitted_train_step`: the
loss, the gradients and the optimizer update, sharded by our logical axis rules, the state
donated) for a TPU topology from abstract sharded inputs, and say what would make a step that
does not fit fit."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from medusa_jax.aot.flops import train_flops
from medusa_jax.aot.report import (
    AOTError,
    AOTReport,
    GiB,
    compile_into,
    device_bytes,
    model_info,
    not_fit_message,
    with_shardings,
)
from medusa_jax.aot.topology import Topology, get_topology, topology_mesh
from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.sharding import MeshConfig, ShardingError, batch_sharding, check_batch_size


def abstract_train_inputs(cfg: ModelConfig, mcfg: MedusaConfig, tcfg, mesh: Mesh,
                          packed: bool = True):
    """``(state, batch, frozen_base or None)`` as sharded ``ShapeDtypeStruct`` trees (what
    :func:`medusa_jax.training.step.make_train_step` is called with), and the state's
    shardings."""
    from medusa_jax.training.optimizer import make_optimizer
    from medusa_jax.training.step import TrainState, abstract_params, state_shardings, trainable

    try:
        sh = state_shardings(cfg, mcfg, tcfg, mesh)
        check_batch_size(tcfg.batch_size, mesh)
    except ShardingError as e:
        raise AOTError(f"{e}") from e
    params = nn.meta.unbox(abstract_params(cfg, mcfg))
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(make_optimizer(tcfg).init, trainable(tcfg, params)),
        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    )
    state = with_shardings(state, sh)
    bs = batch_sharding(mesh)
    keys = ("input_ids", "loss_mask") + (("segment_ids", "positions") if packed else ())
    batch = {
        k: jax.ShapeDtypeStruct((tcfg.batch_size, tcfg.seq_len), jnp.int32, sharding=bs)
        for k in keys
    }
    frozen = state.params["base"] if tcfg.mode == "medusa2" and tcfg.kd else None
    return state, batch, frozen, sh


def compile_train(cfg: ModelConfig, mcfg: MedusaConfig, tcfg, topology: str | Topology,
                  mesh_cfg: MeshConfig | None = None, *, packed: bool = True,
                  check: bool = False) -> AOTReport:
    """Compile the Medusa-1/2 train step for ``topology`` with abstract sharded inputs.

    Returns the report whether or not the step fits (``fits``, ``error`` and ``suggestions``
    say); with ``check=True`` a step that does not fit raises :class:`AOTError`."""
    topo = get_topology(topology) if isinstance(topology, str) else topology
    mesh = topology_mesh(topo, mesh_cfg or MeshConfig())
    try:
        mcfg.check_compatible(cfg)
    except ConfigError as e:
        raise AOTError(str(e)) from e
    if tcfg.seq_len > cfg.max_position_embeddings:
        raise AOTError(f"train.seq_len={tcfg.seq_len} exceeds the model's "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    state, batch, frozen, _ = abstract_train_inputs(cfg, mcfg, tcfg, mesh, packed)
    rep = AOTReport(
        kind="train", topology=topo.name, chip=topo.chip, num_devices=topo.num_devices,
        num_hosts=topo.num_hosts, mesh=dict(mesh.shape), model=model_info(cfg, mcfg),
        hbm_bytes=topo.hbm_bytes, fits=True, compile_s=0.0,
        param_bytes=device_bytes(state.params), opt_state_bytes=device_bytes(state.opt_state),
        batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
        tokens_per_step=tcfg.batch_size * tcfg.seq_len,
        model_flops=train_flops(cfg, mcfg, tcfg), peak_flops=topo.peak_flops,
        hbm_bandwidth=topo.hbm_bandwidth,
        extra={"mode": tcfg.mode, "kd": tcfg.kd, "packed": packed,
               "frozen_base_bytes": device_bytes(frozen) if frozen is not None else 0},
    )
    from medusa_jax.training.step import jitted_train_step

    jitted = jitted_train_step(cfg, mcfg, tcfg, mesh)  # what make_train_step(..., mesh) calls
    args = (state, batch) + ((frozen,) if frozen is not None else ())
    compile_into(rep, jitted, args, mesh)
    if not rep.fits:
        rep.suggestions = _train_suggestions(rep, cfg, mcfg, tcfg, mesh)
        what = f"the {tcfg.mode} train step"
        state = _sharded_state_bytes(rep)
        if state >= (rep.extra.get("usable_bytes") or 0.98 * rep.hbm_bytes):
            what += (f" (parameters, gradients, Adam moments and teacher alone: "
                     f"{state / GiB:.2f} GiB per chip)")
        rep.error = not_fit_message(rep, what, rep.suggestions)
        if check:
            raise AOTError(rep.error, rep)
    return rep


def _sharded_state_bytes(rep: AOTReport) -> int:
    """Per chip: parameters, gradients (one per trainable parameter: half the Adam moments), the
    moments and a kd teacher, the part that shrinks with the chips that shard it."""
    return (rep.param_bytes + rep.opt_state_bytes * 3 // 2
            + rep.extra.get("frozen_base_bytes", 0))


def _train_suggestions(rep: AOTReport, cfg, mcfg, tcfg, mesh: Mesh) -> list[str]:
    fsdp, data, tensor = mesh.shape["fsdp"], mesh.shape["data"], mesh.shape["tensor"]
    need = rep.needed_bytes
    usable = rep.extra.get("usable_bytes") or int(0.98 * rep.hbm_bytes)
    sharded = _sharded_state_bytes(rep)
    # the rest (activations of this per-chip batch, all-gathered layer weights) stays per chip
    rest = max((need or 0) - sharded, 0)
    state = []  # what shrinks the sharded state
    if need:
        room = 0.9 * usable - rest
        grow = _next_pow2(sharded / room) if room > 0 else None
        if grow is not None and grow <= 16:
            state.append(
                f"a slice about {max(2, grow)}x larger ({rep.num_devices * max(2, grow)} "
                f"{rep.chip} chips, FSDP over all of them: mesh.fsdp=-1, same rows per chip)"
            )
    if data > 1:
        state.append(f"FSDP instead of data parallelism (mesh.data={data} -> 1, mesh.fsdp=-1)")
    if cfg.param_dtype == "float32":
        state.append("model.param_dtype=bfloat16 (no fp32 master weights: halves parameters, "
                     "gradients and Adam moments)")
    if tcfg.mode == "medusa2" and tcfg.kd:
        state.append("train.kd=false (drops the frozen teacher copy of the base)")
    if sharded >= usable:  # no activation saving can help
        return state
    acts = []  # what shrinks the activations
    per_row = tcfg.batch_size // max(data * fsdp, 1)
    if per_row > 1:
        acts.append(f"a smaller global batch (train.batch_size={tcfg.batch_size} is "
                    f"{per_row} rows per data shard)")
    if cfg.remat_policy != "full":
        acts.append(f"model.remat_policy=full (now {cfg.remat_policy})")
    if cfg.dtype == "float32":
        acts.append("model.dtype=bfloat16 (bf16 compute: halves activations)")
    if tensor == 1 and cfg.num_heads % 2 == 0:
        acts.append("tensor parallelism (mesh.tensor=2 or 4) to split the activations too")
    return acts + state if rest > sharded else state + acts


def _next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))
