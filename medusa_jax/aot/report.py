"""What one ahead-of-time compile found (:class:`AOTReport`), the error for what does not work
out (:class:`AOTError`), and compiling a program into a report: the compiler's memory figures,
or its out-of-memory numbers when the program does not fit."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from medusa_jax import hlo
from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.errors import MedusaError
from medusa_jax.sharding import MESH_AXES, mesh_context

GiB = 1024**3


class AOTError(MedusaError):
    """The topology, the mesh or the program does not work out; the message says why and, for
    a program that does not fit, what would make it fit."""

    def __init__(self, msg: str, report: AOTReport | None = None):
        super().__init__(msg)
        self.report = report


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


def model_info(cfg: ModelConfig, mcfg: MedusaConfig) -> dict:
    """The report's ``model``: parameter counts (base + heads), sizes, dtypes and layout."""
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


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` (the largest share)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def with_shardings(tree, shardings):
    """``ShapeDtypeStruct`` leaves of ``tree`` (arrays or structs) carrying ``shardings``."""
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


def compile_into(rep: AOTReport, jitted, args, mesh) -> None:
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


def not_fit_message(rep: AOTReport, what: str, tries: list[str]) -> str:
    """``"<what> does not fit on <topology>: needs X GiB per chip, chip has Y GiB; try ..."``."""
    need = rep.needed_bytes
    need_s = f"needs {need / GiB:.2f} GiB per chip" if need else "needs more memory per chip"
    return (
        f"{what} does not fit on {rep.topology}: {need_s}, chip has "
        f"{rep.hbm_bytes / GiB:.2f} GiB; try " + "; or ".join(tries)
    )


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0][:500] if s.strip() else s
