"""What one decode step costs as the compiler sees it: FLOPs, bytes accessed, copies of
cache-sized arrays, the HBM traffic and the roofline time, for a vanilla step and a Medusa verification step.

The programs compiled are the real decode loops (``vanilla_decode``, ``medusa_decode``: a
``while_loop`` of steps, the cache donated), with unrolled layers (with ``scan_layers`` the
compiler's cost analysis counts the layer loop's body once) and, for TPUs, compiler-chosen
weight layouts. The cost analysis counts every loop body once: the decode loop's body is one
step, as wanted; the attention's prefix loop (:mod:`medusa_jax.model.attention`) really runs
``ceil(live / block)`` times, so its other trips are added as the bytes and FLOPs of the K/V
blocks they read (``prefix_extra``).

    rep = step_cost(cfg, mcfg, "v5p:1x1x1", tree="mc_sim_7b_63", batch=1, cache_len=2048)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import hlo
from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.errors import MedusaError
from medusa_jax.model.attention import prefix_block_size

# bf16 dense peak FLOP/s and HBM bandwidth (bytes/s) per chip, for the roofline.
ROOFLINE_CHIPS = {
    "v5e": (197e12, 819e9),
    "v5p": (459e12, 2765e9),
    "h200": (790e12, 4.3e12),  # the same flops and bytes as compiled for v5p, a GPU's limits
}


class StepCostError(MedusaError):
    """A step the report cannot compile (tree too large for the cache, bad batch, ...)."""


# ------------------------------------------------------------------------------------ HLO
_FUSION_CALLS_RE = re.compile(r" fusion\(.*?calls=%([\w.\-]+)")
_PURE_MOVES = {"parameter", "copy", "transpose", "bitcast"}
# instructions that move no bytes of their own (aliases, control flow, constants)
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
               "conditional", "call", "after-all"}
# asynchronous slices into VMEM (v5e): the cost analysis does not count them (calibrated: with
# them left out, a 2-layer 7B-width step's HBM bytes agree between v5e and v5p within 1%)
_UNCOUNTED_ASYNC = {"slice-start", "slice-done"}


def on_chip_bytes(hlo_text: str) -> int:
    """Bytes of on-chip (``S(1)``, VMEM) operands and results in an optimised TPU module, as
    the compiler's cost analysis counts them in its "bytes accessed".

    The TPU compiler prefetches weights into VMEM with ``copy-start``/``copy-done``, and its
    cost analysis then counts such a weight five times: the copy's read and write, the
    copy-done's operand and result, and the consumer's read, although HBM sees it once. Taking
    these VMEM accesses out of "bytes accessed" leaves the HBM traffic: for a one-layer
    projection chain it equals the weights' bytes (``tests/test_step_cost.py``). Instructions
    inside fusions are not counted (the fusion's operands and result are), as in the cost
    analysis; ``copy-start`` counts its destination only (its source is the HBM read)."""
    comps = hlo.computations(hlo_text)
    fused = hlo.fused_computations(hlo_text)
    types = {ins.name: ins.type for instrs in comps.values() for ins in instrs}
    total = 0
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        for ins in instrs:
            if ins.op in _NO_TRAFFIC or ins.op in _UNCOUNTED_ASYNC:
                continue
            if ins.op == "copy-start":  # (destination, source, context)
                arrs = hlo.arrays(ins.type)[:1]
            else:
                arrs = hlo.arrays(ins.type) + [a for x in hlo.operands(ins) if x in types
                                               for a in hlo.arrays(types[x])]
            total += sum(hlo.nbytes(dt, dims) for dt, dims, chip in arrs if chip)
    return total


def relayout_copies(hlo_text: str, min_bytes: int = 0, shape: tuple | None = None) -> list[dict]:
    """Relayout copies in an optimised HLO module: instructions outside fused computations
    that are a ``copy``/``transpose``, or a ``fusion`` whose computation only moves data
    (parameter/copy/transpose/bitcast), with an output of at least ``min_bytes`` or, given
    ``shape``, with exactly that shape's dimensions in any order (a cache-sized array)."""
    comps = hlo.computations(hlo_text)
    fused = set(_FUSION_CALLS_RE.findall(hlo_text))  # tuple-shaped fusions included
    pure = {name for name in fused
            if all(ins[3] in _PURE_MOVES for ins in comps.get(name, [("", "", (), "x", "", "")]))}
    want = None if shape is None else sorted(shape)
    out = []
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        for name, dt, dims, op, line, _ in instrs:
            is_move = op in ("copy", "transpose")
            if op == "fusion":
                called = hlo.CALLS_RE.findall(line)
                is_move = bool(called) and called[0] in pure
            if not is_move:
                continue
            nbytes = hlo.nbytes(dt, dims)
            if (want is not None and sorted(dims) == want) or (want is None and nbytes >= min_bytes):
                out.append({"name": name, "computation": cname, "dims": dims, "bytes": nbytes})
    return out


# ------------------------------------------------------------------------------- programs
@dataclasses.dataclass
class StepCost:
    kind: str  # "vanilla" | "medusa"
    target: str  # "cpu" or a TPU topology
    batch: int
    cache_len: int
    live: int  # committed tokens per row the roofline assumes
    tree_nodes: int  # 1 for vanilla
    flops: float
    bytes: float  # bytes accessed, the prefix loop's extra trips included
    prefix_extra_bytes: float
    on_chip_bytes: float  # of ``bytes``, accesses to on-chip (VMEM) arrays: see on_chip_bytes
    weight_bytes: float  # the base weights a step reads (no heads; the embedding table if tied)
    live_kv_bytes: float  # K and V of the ``live`` committed slots of every row
    cache_copies: list
    big_copies: list  # other relayout copies >= 32 MB
    compile_s: float
    hlo: str = dataclasses.field(default="", repr=False)  # the optimised HLO, for inspection

    @property
    def hbm_bytes(self) -> float:
        """Off-chip traffic: bytes accessed less the on-chip (VMEM) accesses."""
        return self.bytes - self.on_chip_bytes

    def roofline_s(self, chip: str) -> float:
        peak, bw = ROOFLINE_CHIPS[chip]
        return max(self.flops / peak, self.hbm_bytes / bw)


def _prefix_extra(cfg: ModelConfig, batch: int, cache_len: int, live: int, T: int,
                  in_prefix: bool) -> tuple[float, float]:
    """Bytes and FLOPs of the prefix loop's trips past the first (the cost analysis counts one):
    per layer and trip, one ``[B, block, K, H]`` block of K and of V, and their q.k and p.v."""
    C = prefix_block_size(cache_len)
    trips = math.ceil((live + (T if in_prefix else 0)) / C)
    extra = max(trips - 1, 0)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kv = 2 * batch * C * cfg.num_kv_heads * cfg.head_dim * itemsize
    flops = 4 * batch * T * C * cfg.num_heads * cfg.head_dim
    return cfg.num_layers * extra * kv, cfg.num_layers * extra * flops


def _target(target: str):
    """``(devices, sharding)`` for ``"cpu"``, ``"gpu"`` (the first local GPU) or a TPU topology
    name (via libtpu)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from medusa_jax.aot import AOTError, get_topology, topology_mesh
    from medusa_jax.sharding import MeshConfig

    if target in ("cpu", "gpu"):
        mesh = jax.sharding.Mesh(np.asarray(jax.devices(target)[:1]).reshape(1, 1, 1),
                                 ("data", "fsdp", "tensor"))
    else:
        try:
            topo = get_topology(target)
            mesh = topology_mesh(topo, MeshConfig(data=1, fsdp=1, tensor=1))
        except AOTError as e:
            raise StepCostError(str(e)) from None
    return mesh, NamedSharding(mesh, PartitionSpec())


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compile(fn, args, target: str, auto_weights: bool):
    from jax.experimental.layout import Format, Layout

    params, state, stop = args
    if auto_weights and target not in ("cpu", "gpu"):
        p_in = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), params)
    else:
        p_in = jax.tree.map(lambda x: x.sharding, params)
    s_in = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(fn, in_shardings=(p_in, s_in, stop.sharding), donate_argnums=(1,))
    t = time.perf_counter()
    compiled = jitted.lower(params, state, stop).compile()
    return compiled, time.perf_counter() - t


def step_cost(cfg: ModelConfig, mcfg: MedusaConfig | None, target: str, *, tree=None,
              batch: int = 1, cache_len: int = 2048, live: int | None = None,
              auto_weights: bool = True) -> StepCost:
    """Compile one vanilla step (``mcfg=None`` or ``tree=None``) or one Medusa verification
    step over ``tree`` for ``target`` (``"cpu"``, ``"gpu"`` or a TPU topology such as
    ``v5p:1x1x1``) and
    read its cost. ``live``: committed tokens per row (default half the cache)."""
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import (
        abstract_medusa_state,
        heads_proposer,
        make_settings,
        medusa_decode,
    )
    from medusa_jax.decoding.vanilla import abstract_vanilla_state, vanilla_decode
    from medusa_jax.model.heads import init_medusa_params
    from medusa_jax.model.llama import LlamaModel

    if batch < 1:
        raise StepCostError(f"batch must be >= 1, got {batch}")
    if cache_len < 64 or cache_len % 64:
        raise StepCostError(f"cache length must be a positive multiple of 64, got {cache_len}")
    cfg = dataclasses.replace(cfg, scan_layers=False)
    live = cache_len // 2 if live is None else live
    gen = GenerationSettings(max_new_tokens=16)
    kind = "vanilla" if tree is None or mcfg is None else "medusa"
    T = 1
    if kind == "medusa":
        settings = make_settings(tree, mcfg.num_heads, gen)
        T = settings.tree.num_nodes
    if live + T + 16 > cache_len:
        raise StepCostError(f"{live} live tokens + a {T}-node tree do not fit a cache of "
                            f"{cache_len} slots: use a longer cache or a smaller tree")
    mesh, rep = _target(target)
    base = jax.eval_shape(lambda: LlamaModel(cfg).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 1), jnp.int32)))["params"]
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(cfg.param_dtype)),
                        _unbox(base))
    stop = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    if kind == "vanilla":
        state = abstract_vanilla_state(base, batch, cache_len, cfg=cfg, settings=gen)
        args = (_abstract(base, rep), _abstract(state, rep), stop)

        def fn(p, s, st):
            return vanilla_decode(p, s, st, cfg=cfg, settings=gen)
    else:
        heads = jax.eval_shape(lambda: init_medusa_params(mcfg))
        params = {"base": base, "medusa": heads}
        state = abstract_medusa_state(params, batch, cache_len, cfg=cfg, settings=settings)
        args = (_abstract(params, rep), _abstract(state, rep), stop)
        propose = heads_proposer(mcfg, cfg, settings.tree.topk, settings.tree.depth)

        def fn(p, s, st):
            return medusa_decode(p, s, st, cfg=cfg, settings=settings, propose=propose)

    with mesh:
        try:
            compiled, compile_s = _compile(fn, args, target, auto_weights)
        except Exception as e:  # the compiler's own words: out of HBM, mostly
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise StepCostError(f"does not fit one {target} chip: "
                                f"{str(e).split('RESOURCE_EXHAUSTED: ')[-1].splitlines()[0]}") from None
    itemsize = jnp.dtype(cfg.dtype).itemsize
    # what a step reads of the weights: all but the embedding table, of which it gathers a
    # row per token, unless that table is also the LM head
    weight_bytes = sum(x.size * x.dtype.itemsize for k, v in base.items()
                       if k != "embed" or cfg.tie_word_embeddings for x in jax.tree.leaves(v))
    live_kv = 2 * cfg.num_layers * batch * live * cfg.num_kv_heads * cfg.head_dim * itemsize
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    cache_shape = state.cache.buffer_shape
    extra_b, extra_f = _prefix_extra(cfg, batch, cache_len, live, T, kind == "vanilla")
    copies = relayout_copies(hlo, shape=cache_shape)
    big = [c for c in relayout_copies(hlo, min_bytes=32 << 20)
           if sorted(c["dims"]) != sorted(cache_shape)]
    return StepCost(kind=kind, target=target, batch=batch, cache_len=cache_len, live=live,
                    tree_nodes=T, flops=float(cost.get("flops", 0.0)) + extra_f,
                    bytes=float(cost.get("bytes accessed", 0.0)) + extra_b,
                    prefix_extra_bytes=extra_b, on_chip_bytes=float(on_chip_bytes(hlo)),
                    weight_bytes=float(weight_bytes), live_kv_bytes=float(live_kv),
                    cache_copies=copies, big_copies=big,
                    compile_s=compile_s, hlo=hlo)


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)
