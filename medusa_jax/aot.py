"""Ahead-of-time compilation for real TPU topologies, on any machine with ``libtpu`` installed.

``jax.experimental.topologies.get_topology_desc("v5e:4x4", platform="tpu")`` describes the
chips of a TPU slice without owning one. A mesh over those devices, shardings from our logical
axis rules and abstract inputs (``jax.ShapeDtypeStruct`` with a sharding: nothing is
materialised) are enough for ``jax.jit(fn).lower(...).compile()`` to run the real TPU compiler
here, on a CPU. The compiled program then reports its per-chip memory, and a program that does
not fit fails with the compiler's own out-of-memory message, which we turn into a
"does not fit: needs X GiB per chip, chip has Y GiB; try ..." :class:`AOTError`.

What is compiled is our real code: the Medusa-1/2 train step (``training.step``: the loss, the
gradients and the optimizer update, sharded by ``sharding.LOGICAL_AXIS_RULES``, the state
donated) and the Medusa tree-decoding loop (``decoding.medusa.medusa_decode``: the whole
``lax.while_loop`` of verification steps over a KV cache of ``cache_len`` slots).

    python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml --model llama2-7b \\
        --topology v5p:2x2x1 train.batch_size=4
    python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml --model llama2-7b \\
        --topology v5e:2x2 --what decode mesh.fsdp=1 mesh.tensor=4 model.param_dtype=bfloat16

A multi-host topology (``v5p:4x4x4``: 16 hosts) compiles from this one process: the devices of
every host are in the description. Run with ``JAX_PLATFORMS=cpu`` so that JAX itself does not try
to start a TPU runtime; the topology API loads ``libtpu`` on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from medusa_jax import hlo
from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.errors import MedusaError
from medusa_jax.sharding import (
    MESH_AXES,
    MeshConfig,
    ShardingError,
    batch_sharding,
    check_batch_size,
    mesh_context,
    param_shardings,
)

GiB = 1024**3

# Per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): HBM capacity, peak dense bf16 matmul throughput and HBM bandwidth. Keyed by the
# ``device_kind`` the topology's devices report. The compiler's own limit is a little lower
# (it reserves some HBM: 15.75 GiB of a v5e's 16), and its out-of-memory errors say so.
CHIPS: dict[str, dict[str, Any]] = {
    "TPU v4": {"name": "v4", "hbm_gib": 32, "bf16_tflops": 275, "hbm_gbs": 1200},
    "TPU v5 lite": {"name": "v5e", "hbm_gib": 16, "bf16_tflops": 197, "hbm_gbs": 819},
    "TPU v5": {"name": "v5p", "hbm_gib": 95, "bf16_tflops": 459, "hbm_gbs": 2765},
    "TPU v6 lite": {"name": "v6e", "hbm_gib": 32, "bf16_tflops": 918, "hbm_gbs": 1640},
}
TOPOLOGY_EXAMPLES = (
    "v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:8x8", "v5e:16x16",
    "v5p:2x2x1", "v5p:2x2x2", "v5p:2x4x4", "v5p:4x4x4", "v4:2x2x1", "v6e:2x2",
)
_TOPOLOGY_RE = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")
# libtpu's default chips per host; a smaller slice (v5e:1x1) must say it has fewer.
_DEFAULT_HOST_BOUNDS = (2, 2, 1)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B / Vicuna-7B (same architecture)
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, max_position_embeddings=4096),
}
MODEL_PRESETS["vicuna-7b"] = MODEL_PRESETS["llama2-7b"]
MODEL_PRESETS["vicuna-13b"] = MODEL_PRESETS["llama2-13b"]


class AOTError(MedusaError):
    """The topology, the mesh or the program does not work out; the message says why and, for
    a program that does not fit, what would make it fit."""

    def __init__(self, msg: str, report: AOTReport | None = None):
        super().__init__(msg)
        self.report = report


# ------------------------------------------------------------------------------------------
# Topology -> devices -> mesh
# ------------------------------------------------------------------------------------------


def libtpu_available() -> bool:
    """Whether ``libtpu`` (the TPU compiler) is installed: ``pip install 'jax[tpu]'``."""
    return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices of a TPU slice named like ``v5e:4x4``, and what each chip has."""

    name: str
    devices: tuple
    device_kind: str
    chip: str  # v5e, v5p, ...
    hbm_bytes: int  # per device
    peak_flops: float  # per device, bf16
    hbm_bandwidth: float  # bytes/s per device
    num_hosts: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _quiet_libtpu() -> None:
    """On a machine without TPU chips, give libtpu the two settings it otherwise warns about at
    length on every load (it looks for the TPU VM's hosts); they change nothing in what the
    topology API returns. Left alone on a TPU VM."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return
    except Exception:  # private API: if it moved, stay quiet about it and skip the nicety
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    # libtpu takes /tmp/libtpu_lockfile so two processes never share chips; with no chips there
    # is nothing to share, and without this a second compiling process (two test runs, a report
    # next to a test) fails to start.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.lru_cache(maxsize=16)
def get_topology(name: str) -> Topology:
    """The devices of the TPU topology ``name`` (``v5e:2x2``, ``v5p:4x4x4``...). Raises
    :class:`AOTError` when libtpu is missing or the name is not a topology libtpu knows."""
    examples = ", ".join(TOPOLOGY_EXAMPLES)
    if not libtpu_available():
        raise AOTError(
            "libtpu is not installed, so no TPU topology can be compiled for: "
            f"pip install 'jax[tpu]=={jax.__version__}' (the TPU compiler; no TPU needed)"
        )
    m = _TOPOLOGY_RE.match(name)
    if m is None:
        raise AOTError(
            f"unknown TPU topology {name!r}: expected <chip>:<AxB> or <chip>:<AxBxC> "
            f"(examples: {examples})"
        )
    dims = [int(d) for d in m.group(2).split("x")]
    kw = {}
    bounds = _DEFAULT_HOST_BOUNDS[: len(dims)] + (1,) * (3 - len(dims))
    if any(d < b for d, b in zip(dims, bounds)):
        kw["chips_per_host_bounds"] = tuple(min(d, b) for d, b in zip(dims + [1] * 3, bounds))
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
    except Exception as e:  # libtpu's own words (JaxRuntimeError: INVALID_ARGUMENT ...)
        if "INVALID_ARGUMENT" not in str(e):  # libtpu did not start: not the name's fault
            raise AOTError(f"libtpu could not describe TPU topology {name!r}: {e}") from e
        raise AOTError(f"unknown TPU topology {name!r}: {e} (examples: {examples})") from e
    devices = tuple(desc.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise AOTError(
            f"topology {name!r} has devices of kind {kind!r}, for which the chip table "
            f"(medusa_jax.aot.CHIPS: {', '.join(CHIPS)}) has no HBM size"
        )
    chip = CHIPS[kind]
    # v4's description lists each TensorCore as a device: share the chip between them.
    per_chip = len(devices) // len({tuple(d.coords) for d in devices})
    return Topology(
        name=name,
        devices=devices,
        device_kind=kind,
        chip=chip["name"],
        hbm_bytes=int(chip["hbm_gib"] * GiB) // per_chip,
        peak_flops=chip["bf16_tflops"] * 1e12 / per_chip,
        hbm_bandwidth=chip["hbm_gbs"] * 1e9 / per_chip,
        num_hosts=len({d.process_index for d in devices}),
    )


def topology_mesh(topo: Topology | str, mesh_cfg: MeshConfig) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over the topology's devices, laid out along the
    physical torus (``mesh_utils.create_device_mesh``). A mesh whose size is not the topology's
    device count is an :class:`AOTError`."""
    topo = get_topology(topo) if isinstance(topo, str) else topo
    try:
        sizes = mesh_cfg.resolve(topo.num_devices)
    except ShardingError as e:
        raise AOTError(
            f"the mesh does not match topology {topo.name} ({topo.num_devices} "
            f"{topo.chip} devices): {e}"
        ) from e
    from jax.experimental import mesh_utils

    try:
        grid = mesh_utils.create_device_mesh(sizes, list(topo.devices))
    except Exception:
        try:
            grid = mesh_utils.create_device_mesh(
                sizes, list(topo.devices), allow_split_physical_axes=True
            )
        except Exception:
            grid = np.asarray(topo.devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AOTReport:
    """What one ahead-of-time compile found. Byte counts are per device (chip); ``memory`` holds
    the compiler's ``memory_analysis()``: ``argument``, ``output``, ``alias`` (outputs written
    into donated arguments), ``temp``, ``code``, ``peak`` (the compiler's peak of live bytes,
    what it checks against the HBM), ``total`` (= ``peak``, or the sum of the parts when the
    compiler gives no peak) and ``sum_of_parts`` = argument + output - alias + temp + code (an
    upper bound: temporaries reuse buffers that are free by then)."""

    kind: str  # "train" | "decode"
    topology: str
    chip: str
    num_devices: int
    num_hosts: int
    mesh: dict
    model: dict
    hbm_bytes: int
    fits: bool
    compile_s: float
    memory: dict | None = None
    param_bytes: int = 0
    opt_state_bytes: int = 0
    kv_cache_bytes: int = 0  # decode: this device's share of the cache
    kv_cache_total_bytes: int = 0  # decode: the whole cache
    batch_size: int = 0  # global
    seq_len: int = 0  # train: tokens per row; decode: cache slots
    tokens_per_step: int = 0
    model_flops: float = 0.0  # per step, all devices together
    xla_flops: float | None = None  # the compiler's count for one device (loops counted once)
    peak_flops: float = 0.0  # per device
    hbm_bandwidth: float = 0.0  # per device, bytes/s
    needed_bytes: int | None = None  # from the compiler's out-of-memory message
    error: str | None = None
    suggestions: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int | None:
        if self.memory is not None:
            return self.memory["total"]
        return self.needed_bytes

    def mfu(self, step_time_s: float) -> float:
        """Model FLOPs utilisation of a step that takes ``step_time_s`` seconds."""
        return self.model_flops / (step_time_s * self.num_devices * self.peak_flops)

    def step_time_at_mfu(self, mfu: float) -> float:
        return self.model_flops / (mfu * self.num_devices * self.peak_flops)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        mesh = "x".join(str(self.mesh[a]) for a in MESH_AXES)
        lines = [
            f"{self.kind} on {self.topology} ({self.num_devices} {self.chip} devices, "
            f"{self.num_hosts} host{'s' * (self.num_hosts > 1)}), mesh data x fsdp x tensor = "
            f"{mesh}, {_model_str(self.model, self.kind)}",
            f"  compiled in {self.compile_s:.1f} s: "
            + ("FITS" if self.fits else "DOES NOT FIT"),
        ]
        if self.memory is not None:
            m = self.memory
            lines.append(
                f"  per device: peak {_gib(m['total'])} of {_gib(self.hbm_bytes)} (arguments "
                f"{_gib(m['argument'])}, outputs {_gib(m['output'])}, aliased "
                f"{_gib(m['alias'])}, temporaries {_gib(m['temp'])}, code {_gib(m['code'])}; "
                f"sum {_gib(m['sum_of_parts'])})"
            )
            if self.extra.get("entry_relayout_bytes"):
                lines.append(f"  of the temporaries, {_gib(self.extra['entry_relayout_bytes'])} "
                             "are the compiler re-tiling arguments into its preferred layouts")
        elif self.needed_bytes:
            lines.append(
                f"  per device: needs {_gib(self.needed_bytes)}, has {_gib(self.hbm_bytes)}"
            )
        lines.append(
            f"  parameters {_gib(self.param_bytes)}, optimizer state "
            f"{_gib(self.opt_state_bytes)} per device"
            + (
                f"; KV cache {_gib(self.kv_cache_bytes)} per device "
                f"({_gib(self.kv_cache_total_bytes)} in all)"
                if self.kind == "decode"
                else ""
            )
        )
        unit = "step" if self.kind == "train" else "verification step"
        lines.append(
            f"  model FLOPs per {unit}: {self.model_flops:.3e} "
            f"(global batch {self.batch_size}, {self.tokens_per_step} tokens)"
        )
        if self.kind == "train" and self.model_flops:
            lines.append(
                f"  at 40% MFU a step takes {self.step_time_at_mfu(0.4):.2f} s; "
                f"MFU for a measured step time t: {self.model_flops:.3e} / "
                f"(t x {self.num_devices} x {self.peak_flops:.3e})"
            )
        if self.error:
            lines.append(f"  {self.error}")
        return "\n".join(lines)

    def raise_if_not_fits(self) -> AOTReport:
        if not self.fits:
            raise AOTError(self.error or "does not fit", self)
        return self


def _gib(n) -> str:
    """Bytes in GiB (MiB / KiB below one)."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _model_str(m: dict, kind: str = "train") -> str:
    s = f"{m['params'] / 1e9:.2f}B params, {m['param_dtype']} params / {m['dtype']} compute"
    if kind == "train":
        s += f", remat={m['remat_policy']}"
    return s + f", scan_layers={m['scan_layers']}"


def _model_info(cfg: ModelConfig, mcfg: MedusaConfig) -> dict:
    heads = mcfg.num_heads * mcfg.num_layers * (cfg.hidden_size**2 + cfg.hidden_size)
    if not mcfg.shared_lm_head:
        heads += mcfg.num_heads * cfg.hidden_size * cfg.vocab_size
    return {
        "params": cfg.num_params + heads,
        "base_params": cfg.num_params,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "medusa_param_dtype": mcfg.param_dtype,
        "scan_layers": cfg.scan_layers,
        "remat_policy": cfg.remat_policy,
        "medusa_heads": mcfg.num_heads,
        "medusa_layers": mcfg.num_layers,
    }


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` (the largest share)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


_SIZE = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_OOM_PATTERNS = (
    # "Used 20.51G of 15.75G hbm. Exceeded hbm capacity by 4.76G."
    re.compile(r"Used ([\d.]+)([KMGT]?)B? of ([\d.]+)([KMGT]?)B? hbm", re.I),
    # "the total memory required for HLO temporaries (32.00G) exceeds available HBM (15.75G)"
    re.compile(r"\(([\d.]+)([KMGT]?)B?\) exceeds available HBM \(([\d.]+)([KMGT]?)B?\)", re.I),
)


def parse_oom(msg: str) -> tuple[int, int] | None:
    """``(needed, available)`` bytes from an XLA TPU out-of-memory message, if it says."""
    for pat in _OOM_PATTERNS:
        m = pat.search(msg)
        if m:
            need = float(m.group(1)) * _SIZE[m.group(2).upper()]
            have = float(m.group(3)) * _SIZE[m.group(4).upper()]
            return int(need), int(have)
    return None


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "out of memory" in s.lower()


def _compile(jitted, args, mesh: Mesh):
    """Lower and compile inside the mesh and the logical-axis rules (so the model's activation
    constraints bind). Returns ``(compiled or None, seconds, OOM exception or None)``."""
    t0 = time.perf_counter()
    with mesh_context(mesh):
        lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:
        if _is_oom(e):
            return None, time.perf_counter() - t0, e
        raise
    return compiled, time.perf_counter() - t0, None


def _compile_into(rep: AOTReport, jitted, args, mesh) -> None:
    """Compile ``jitted(*args)`` and record the result in ``rep``: the compiled memory figures,
    or ``fits=False`` with the compiler's out-of-memory numbers and first message line."""
    compiled, rep.compile_s, oom = _compile(jitted, args, mesh)
    if compiled is not None:
        _fill_from_compiled(rep, compiled)
        return
    rep.fits = False
    parsed = parse_oom(str(oom))
    rep.needed_bytes, rep.extra["usable_bytes"] = parsed if parsed else (None, None)
    rep.extra["compiler_message"] = _first_line(str(oom))


def _fill_from_compiled(rep: AOTReport, compiled) -> None:
    ma = compiled.memory_analysis()
    mem = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "code": int(ma.generated_code_size_in_bytes),
    }
    # The sum of the parts over-counts: temporaries are packed into buffers that are free at
    # the time (the donated state's among them). The compiler's simulated peak of live bytes is
    # what it checks against the chip's HBM (it compiled programs whose sum exceeded the HBM).
    mem["sum_of_parts"] = (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                           + mem["code"])
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    mem["peak"] = peak
    mem["total"] = peak or mem["sum_of_parts"]
    rep.memory = mem
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rep.xla_flops = float(cost.get("flops")) if cost and "flops" in cost else None
    except Exception:
        rep.xla_flops = None
    try:
        rep.extra["entry_relayout_bytes"] = entry_relayout_bytes(compiled.as_text())
    except Exception:  # best effort: HLO text is no stable interface
        pass
    if mem["total"] > rep.hbm_bytes:  # the compiler normally refuses first; be sure anyway
        rep.fits = False
        rep.needed_bytes = mem["total"]


def entry_relayout_bytes(hlo_text: str) -> int:
    """Bytes of the entry computation's copies of its own arguments: the compiler re-tiling an
    input into the layout it prefers (the arguments arrive in the default row-major layout).
    Such a copy lives next to the original, so it costs temporaries equal to the argument."""
    entry = hlo.computations(hlo_text)[hlo.entry_name(hlo_text)]
    params = {ins.name for ins in entry if ins.op == "parameter"}
    return sum(hlo.nbytes(ins.dtype, ins.dims) for ins in entry
               if ins.op == "copy" and ins.dtype in hlo.DTYPE_BYTES
               and hlo.operands(ins)[0] in params)


def _not_fit_message(rep: AOTReport, what: str, tries: list[str]) -> str:
    need = rep.needed_bytes
    need_s = f"needs {need / GiB:.2f} GiB per chip" if need else "needs more memory per chip"
    return (
        f"{what} does not fit on {rep.topology}: {need_s}, chip has "
        f"{rep.hbm_bytes / GiB:.2f} GiB; try " + "; or ".join(tries)
    )


def _next_pow2(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------


def _forward_flops_per_token(cfg: ModelConfig, context: int, logits: bool = True) -> float:
    """Matmul FLOPs of one token's base forward attending to ``context`` positions (the
    attention is counted as computed: over all ``context`` slots, masked or not)."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = L * (D * H * (N + 2 * K) + N * H * D + 3 * D * F)
    attn = L * 2 * context * N * H  # q.k and p.v
    return 2.0 * dense + 2.0 * attn + (2.0 * D * V if logits else 0.0)


def _heads_flops_per_token(cfg: ModelConfig, mcfg: MedusaConfig) -> float:
    D, V = cfg.hidden_size, cfg.vocab_size
    return mcfg.num_heads * (mcfg.num_layers * 2.0 * D * D + 2.0 * D * V)


def train_flops(cfg: ModelConfig, mcfg: MedusaConfig, tcfg) -> float:
    """Model FLOPs of one train step (all devices): backward = 2x forward, rematerialisation not
    counted (the usual MFU convention). Medusa-2: base and heads forward + backward, plus the
    frozen teacher's forward with ``kd``. Medusa-1: the base forward only (no logits), the heads
    forward + backward (the shared LM head's weight gets no gradient)."""
    T = tcfg.seq_len
    tokens = tcfg.batch_size * T
    heads = _heads_flops_per_token(cfg, mcfg)
    if tcfg.mode == "medusa2":
        per = 3 * _forward_flops_per_token(cfg, T) + 3 * heads
        if tcfg.kd:
            per += _forward_flops_per_token(cfg, T)
    else:
        D, V = cfg.hidden_size, cfg.vocab_size
        res = mcfg.num_heads * mcfg.num_layers * 2.0 * D * D
        proj = mcfg.num_heads * 2.0 * D * V
        per = _forward_flops_per_token(cfg, T, logits=False) + 3 * res
        per += (3 if not mcfg.shared_lm_head else 2) * proj
    return per * tokens


def decode_flops(cfg: ModelConfig, mcfg: MedusaConfig, batch: int, cache_len: int,
                 tree_nodes: int) -> float:
    """Model FLOPs of one verification step: the base over the ``tree_nodes`` tree tokens
    (attending to the whole cache, as computed) plus the heads' proposal at one position."""
    return batch * (
        tree_nodes * _forward_flops_per_token(cfg, cache_len) + _heads_flops_per_token(cfg, mcfg)
    )


# ------------------------------------------------------------------------------------------
# The train step
# ------------------------------------------------------------------------------------------


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
    state = _abstract(state, sh)
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
        num_hosts=topo.num_hosts, mesh=dict(mesh.shape), model=_model_info(cfg, mcfg),
        hbm_bytes=topo.hbm_bytes, fits=True, compile_s=0.0,
        param_bytes=_device_bytes(state.params), opt_state_bytes=_device_bytes(state.opt_state),
        batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
        tokens_per_step=tcfg.batch_size * tcfg.seq_len,
        model_flops=train_flops(cfg, mcfg, tcfg), peak_flops=topo.peak_flops,
        hbm_bandwidth=topo.hbm_bandwidth,
        extra={"mode": tcfg.mode, "kd": tcfg.kd, "packed": packed,
               "frozen_base_bytes": _device_bytes(frozen) if frozen is not None else 0},
    )
    from medusa_jax.training.step import jitted_train_step

    jitted = jitted_train_step(cfg, mcfg, tcfg, mesh)  # what make_train_step(..., mesh) calls
    args = (state, batch) + ((frozen,) if frozen is not None else ())
    _compile_into(rep, jitted, args, mesh)
    if not rep.fits:
        rep.suggestions = _train_suggestions(rep, cfg, mcfg, tcfg, mesh)
        what = f"the {tcfg.mode} train step"
        state = _sharded_state_bytes(rep)
        if state >= (rep.extra.get("usable_bytes") or 0.98 * rep.hbm_bytes):
            what += (f" (parameters, gradients, Adam moments and teacher alone: "
                     f"{state / GiB:.2f} GiB per chip)")
        rep.error = _not_fit_message(rep, what, rep.suggestions)
        if check:
            raise AOTError(rep.error, rep)
    return rep


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0][:500] if s.strip() else s


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


# ------------------------------------------------------------------------------------------
# The Medusa decoding loop
# ------------------------------------------------------------------------------------------


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
    parameters by the logical-axis rules, the KV cache ``[L, B, K, S, H]`` with its rows over
    ``data`` x ``fsdp`` (when the batch divides) and its KV heads over ``tensor``."""
    from medusa_jax.decoding.medusa import abstract_medusa_state
    from medusa_jax.training.step import abstract_params

    boxed = abstract_params(cfg, mcfg)
    try:
        p_sh = param_shardings(boxed, mesh)
    except ShardingError as e:
        raise AOTError(str(e)) from e
    params = _abstract(nn.meta.unbox(boxed), p_sh)
    n_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = ("data", "fsdp") if batch_size % n_rows == 0 else None
    heads = "tensor" if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
    state = abstract_medusa_state(nn.meta.unbox(boxed), batch_size, cache_len, cfg=cfg,
                                  settings=settings)

    def spec(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name in ("cache/k", "cache/v"):
            return PartitionSpec(None, rows, heads, None, None)  # [L, B, K, S, H]
        if x.ndim >= 1 and x.shape[0] == batch_size and name != "rng":
            return PartitionSpec(rows, *([None] * (x.ndim - 1)))
        return PartitionSpec()

    st_sh = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), state)
    state = _abstract(state, st_sh)
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
    kv_total = 2 * math.prod(state.cache.k.shape) * jnp.dtype(state.cache.k.dtype).itemsize
    rep = AOTReport(
        kind="decode", topology=topo.name, chip=topo.chip, num_devices=topo.num_devices,
        num_hosts=topo.num_hosts, mesh=dict(mesh.shape), model=_model_info(cfg, mcfg),
        hbm_bytes=topo.hbm_bytes, fits=True, compile_s=0.0,
        param_bytes=_device_bytes(params),
        kv_cache_bytes=_device_bytes((state.cache.k, state.cache.v)),
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
    _compile_into(rep, jitted, (params, state, stop), mesh)
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
        rep.error = _not_fit_message(rep, "the Medusa decoding loop", rep.suggestions)
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


# ------------------------------------------------------------------------------------------
# From a training config
# ------------------------------------------------------------------------------------------


def model_from_run_config(run_cfg, model: str | None = None) -> tuple[ModelConfig, MedusaConfig]:
    """The ``ModelConfig`` and ``MedusaConfig`` a run config trains, with its dtypes, scan and
    remat settings, without loading any weight. ``model`` overrides ``model.path``: a preset
    (``llama2-7b``, ``vicuna-7b``, ``llama2-13b``, ``vicuna-13b``, ``tiny``), a ``config.json``
    or a Hugging Face checkpoint directory."""
    from medusa_jax.training.setup import medusa_config, model_config, model_settings

    m = run_cfg.model
    if model in MODEL_PRESETS:
        cfg = ModelConfig(**MODEL_PRESETS[model], **model_settings(run_cfg))
        return cfg, medusa_config(run_cfg, cfg)
    if model == "tiny":
        run_cfg = run_cfg.replace(model=dataclasses.replace(m, tiny=True, path=None))
    elif model is not None:
        run_cfg = run_cfg.replace(model=dataclasses.replace(m, tiny=False, path=model))
    src = run_cfg.model.path
    if not run_cfg.model.tiny:
        path = src if src is None else (
            os.path.join(src, "config.json") if os.path.isdir(src) else src)
        if path is None or not path.endswith(".json") or not os.path.isfile(path):
            raise AOTError(
                f"cannot read the model's shape from {src!r} (model.path): give --model a "
                f"preset ({', '.join([*MODEL_PRESETS, 'tiny'])}), a config.json or a Hugging "
                "Face checkpoint directory"
            )
    cfg = model_config(run_cfg)
    return cfg, medusa_config(run_cfg, cfg)


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m medusa_jax.aot",
        description="Compile the Medusa train step and decoding loop ahead of time for a TPU "
        "topology (no TPU needed: libtpu's compiler runs here) and report per-chip memory, "
        "compile time and model FLOPs.",
    )
    p.add_argument("--config", help="a training config YAML (as for train.py)")
    p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v5p:4x4x4")
    p.add_argument("--model", help="model preset (llama2-7b, vicuna-7b, llama2-13b, "
                   "vicuna-13b, tiny), config.json or HF checkpoint dir; default: the config's "
                   "model.path / model.tiny")
    p.add_argument("--what", choices=("train", "decode", "both"), default="train")
    p.add_argument("--unpacked", action="store_true",
                   help="batches without segment_ids/positions (data.mode=pad)")
    p.add_argument("--decode-batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--cache-len", type=int, default=2048, help="KV cache slots per row")
    p.add_argument("--tree", help="Medusa tree (name or JSON file); default: mc_sim_7b_63 "
                   "(64 nodes), cut to the heads' depth")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--weight-layout", choices=("default", "auto"), default="default",
                   help="decode: weights row-major (default, as medusa_generate passes them) or "
                   "in layouts the compiler picks (auto)")
    p.add_argument("--json", help="also write the report(s) as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. "
                   "mesh.tensor=4 model.remat_policy=full train.batch_size=16")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit 0 when everything fits, 1 when something does not fit (the
    message says what would), 2 for a bad topology, mesh or config."""
    import json

    from medusa_jax.training.run_config import load_run_config

    args = _parse_args(argv)
    if os.environ.get("JAX_PLATFORMS") is None:
        # nothing runs here, only compiles: keep JAX from trying to start a TPU runtime
        jax.config.update("jax_platforms", "cpu")
    try:
        run_cfg = load_run_config(args.config, args.overrides)
        cfg, mcfg = model_from_run_config(run_cfg, args.model)
        topo = get_topology(args.topology)
        reports = []
        if args.what in ("train", "both"):
            reports.append(compile_train(cfg, mcfg, run_cfg.train, topo, run_cfg.mesh,
                                         packed=not args.unpacked))
        if args.what in ("decode", "both"):
            reports.append(compile_decode(cfg, mcfg, topo, run_cfg.mesh,
                                          batch_size=args.decode_batch, cache_len=args.cache_len,
                                          tree=args.tree, max_new_tokens=args.max_new_tokens,
                                          weight_layout=args.weight_layout))
    except MedusaError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(r.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1, default=str)
    bad = [r for r in reports if not r.fits]
    for r in bad:
        print(f"error: {r.error}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
