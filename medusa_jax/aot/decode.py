"""Compile the Medusa decoding loop (:func:`medusa_jax.decoding.medusa.medusa_decode`: the whole
``lax.while_loop`` of verification steps over a KV cache of ``cache_len`` slots) for a TPU
topology from abstract sharded inputs, and say what would make a loop that does not fit fit."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medusa_jax.aot.flops import decode_flops
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
from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.errors import MedusaError
from medusa_jax.sharding import MeshConfig, ShardingError, param_shardings

DEFAULT_TREE = "mc_sim_7b_63"  # 63 paths + the root: 64 nodes, depth 4


def _decode_settings(tree, num_heads: int, max_new_tokens: int):
    """Settings for ``tree``; ``None``: :data:`DEFAULT_TREE`, cut to the paths ``num_heads``
    heads can propose."""
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings
    from medusa_jax.tree import get_tree

    if tree is None:
        tree = [p for p in get_tree(DEFAULT_TREE) if len(p) <= num_heads]
    return make_settings(tree, num_heads, GenerationSettings(max_new_tokens=max_new_tokens))


def abstract_decode_inputs(cfg: ModelConfig, mcfg: MedusaConfig, mesh: Mesh, settings,
                           batch_size: int, cache_len: int):
    """``(params, state, stop_step)`` of ``medusa_decode`` as sharded ``ShapeDtypeStruct``:
    parameters by the logical-axis rules, the KV cache ``[L, B, K, S, H]`` (or its per-layer
    buffers ``[B, K, S, H]``) with its rows over
    ``data`` x ``fsdp`` (when the batch divides) and its KV heads over ``tensor``."""
    from medusa_jax.decoding.medusa import abstract_medusa_state
    from medusa_jax.training.step import abstract_params

    boxed = abstract_params(cfg, mcfg)
    try:
        p_sh = param_shardings(boxed, mesh)
    except ShardingError as e:
        raise AOTError(str(e)) from e
    params = with_shardings(nn.meta.unbox(boxed), p_sh)
    n_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = ("data", "fsdp") if batch_size % n_rows == 0 else None
    heads = "tensor" if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
    state = abstract_medusa_state(nn.meta.unbox(boxed), batch_size, cache_len, cfg=cfg,
                                  settings=settings)

    def spec(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.split("/")[:2] in (["cache", "k"], ["cache", "v"]):
            if x.ndim == 4:  # one buffer per layer (unrolled layers): [B, K, S, H]
                return PartitionSpec(rows, heads, None, None)
            return PartitionSpec(None, rows, heads, None, None)  # [L, B, K, S, H]
        if x.ndim >= 1 and x.shape[0] == batch_size and name != "rng":
            return PartitionSpec(rows, *([None] * (x.ndim - 1)))
        return PartitionSpec()

    st_sh = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), state)
    state = with_shardings(state, st_sh)
    stop = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return params, state, stop


def compile_decode(cfg: ModelConfig, mcfg: MedusaConfig, topology: str | Topology,
                   mesh_cfg: MeshConfig | None = None, *, batch_size: int = 1,
                   cache_len: int = 2048, tree=None, max_new_tokens: int = 256,
                   weight_layout: str = "default", check: bool = False) -> AOTReport:
    """Compile the Medusa decoding loop (``medusa_decode``: verification steps in a
    ``while_loop`` over a ``cache_len``-slot KV cache, the heads proposing, ``tree`` verified
    each step; None: :data:`DEFAULT_TREE`, cut to the heads' depth) for ``topology``. The KV cache is in the compute dtype (``cfg.dtype``)."""
    from medusa_jax.decoding.medusa import heads_proposer, medusa_decode

    topo = get_topology(topology) if isinstance(topology, str) else topology
    mesh = topology_mesh(topo, mesh_cfg or MeshConfig())
    try:
        mcfg.check_compatible(cfg)
        settings = _decode_settings(tree, mcfg.num_heads, max_new_tokens)
    except MedusaError as e:
        raise AOTError(str(e)) from e
    tree_b = settings.tree
    params, state, stop = abstract_decode_inputs(cfg, mcfg, mesh, settings, batch_size,
                                                 cache_len)
    kv_total = 2 * math.prod(state.cache.dims) * jnp.dtype(jax.tree.leaves(state.cache.k)[0].dtype).itemsize
    rep = AOTReport(
        kind="decode", topology=topo.name, chip=topo.chip, num_devices=topo.num_devices,
        num_hosts=topo.num_hosts, mesh=dict(mesh.shape), model=model_info(cfg, mcfg),
        hbm_bytes=topo.hbm_bytes, fits=True, compile_s=0.0,
        param_bytes=device_bytes(params),
        kv_cache_bytes=device_bytes((state.cache.k, state.cache.v)),
        kv_cache_total_bytes=kv_total, batch_size=batch_size, seq_len=cache_len,
        tokens_per_step=batch_size * tree_b.num_nodes,
        model_flops=decode_flops(cfg, mcfg, batch_size, cache_len, tree_b.num_nodes),
        peak_flops=topo.peak_flops, hbm_bandwidth=topo.hbm_bandwidth,
        extra={"tree_nodes": tree_b.num_nodes, "tree_depth": tree_b.depth,
               "max_new_tokens": max_new_tokens,
               "tree": tree if isinstance(tree, str) or tree is None else "custom"},
    )
    # a verification step reads every weight and the whole cache once: the HBM-bound floor
    rep.extra["min_step_s"] = (rep.param_bytes + rep.kv_cache_bytes) / topo.hbm_bandwidth
    propose = heads_proposer(mcfg, cfg, tree_b.topk, tree_b.depth)
    rep.extra["weight_layout"] = weight_layout
    if weight_layout == "default":
        jitted = _Lowerable(medusa_decode, dict(cfg=cfg, settings=settings, propose=propose))
    elif weight_layout == "auto":
        from jax.experimental.layout import Format, Layout

        def loop(p, s, stop_step):
            return medusa_decode(p, s, stop_step, cfg=cfg, settings=settings, propose=propose)

        p_fmt = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), params)
        s_sh = jax.tree.map(lambda x: x.sharding, state)
        jitted = jax.jit(loop, in_shardings=(p_fmt, s_sh, stop.sharding), donate_argnums=(1,))
    else:
        raise AOTError(f"weight_layout={weight_layout!r} must be 'default' or 'auto'")
    compile_into(rep, jitted, (params, state, stop), mesh)
    if rep.fits and cfg.scan_layers and cfg.num_layers > 1 and rep.xla_flops is not None:
        # the cost analysis counts the scanned layer loop's body once: count one and two
        # unrolled layers and extrapolate (the layers are identical)
        one, two = (compile_decode(
            dataclasses.replace(cfg, num_layers=n, scan_layers=False), mcfg, topo, mesh_cfg,
            batch_size=batch_size, cache_len=cache_len, tree=tree, max_new_tokens=max_new_tokens,
            weight_layout=weight_layout).xla_flops for n in (1, 2))
        if one is not None and two is not None:
            rep.extra["xla_flops_as_counted_scanned"] = rep.xla_flops
            rep.xla_flops = one + (cfg.num_layers - 1) * (two - one)
    if not rep.fits:
        rep.suggestions = _decode_suggestions(rep, cfg, mesh, batch_size, cache_len)
        rep.error = not_fit_message(rep, "the Medusa decoding loop", rep.suggestions)
        if check:
            raise AOTError(rep.error, rep)
    return rep


class _Lowerable:
    """``.lower(*args)`` of a jitted function with its static keyword arguments bound."""

    def __init__(self, jitted, kw: dict):
        self.jitted, self.kw = jitted, kw

    def lower(self, *args):
        return self.jitted.lower(*args, **self.kw)


def _decode_suggestions(rep: AOTReport, cfg, mesh: Mesh, batch_size: int, cache_len: int):
    tries = []
    if rep.extra.get("weight_layout") == "default":
        tries.append("weights placed in the compiler's layouts (weight_layout='auto', "
                     "--weight-layout auto): no relayout copies of the q/k/v weights")
    tensor = mesh.shape["tensor"]
    if cfg.num_kv_heads % (2 * tensor) == 0:
        tries.append(f"tensor parallelism over {2 * tensor}+ chips (mesh.tensor={2 * tensor}, "
                     "a larger slice): splits the weights and the KV cache")
    if cfg.param_dtype == "float32":
        tries.append("bf16 weights (model.param_dtype=bfloat16)")
    if cfg.dtype == "float32":
        tries.append("a bf16 KV cache and compute (model.dtype=bfloat16)")
    if cache_len > 2048:
        tries.append(f"a shorter KV cache (cache_len={cache_len} -> {cache_len // 2}: "
                     f"saves {rep.kv_cache_bytes / 2 / GiB:.2f} GiB per chip)")
    if batch_size > 1:
        tries.append(f"fewer rows (batch {batch_size} -> {batch_size // 2})")
    tries.append("int8 weights or an int8 KV cache (not implemented here)")
    return tries
