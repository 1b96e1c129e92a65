"""Where a decode step's time goes: a JAX profiler trace of a decode loop, its ops attributed to
the step's phases and parts by the op_name metadata of the executable that ran.

    from medusa_jax import profiling
    prof = profiling.profile(lambda: medusa_generate(...), medusa_decode, steps=lambda r: ...)

The decode steps carry named scopes (``propose``, ``verify``, ``accept``, ``commit``; attention's
``prefix`` and ``new_tokens``), so an op's ``op_name`` says which phase and part it belongs to.
Events come from the device planes of the trace where there are any (GPU: the stream lines'
kernels and copies; TPU: the ``XLA Ops`` line), else from the host threads' XLA op events (CPU,
where two cores' threads overlap: op time is summed over threads, not wall time). An event is
named by its ``hlo_op`` statistic when the trace gives one, else by its own name (GPU kernels are
named after their fusion, ``.`` written ``_``); events of other programs in the trace are left
out by their ``hlo_module`` statistic when there is one.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable

# op_name fragments -> the part of a step an op belongs to (first match wins)
PARTS = [
    ("/attn/prefix/", "attention over the cache (prefix)"),
    ("/attn/new_tokens/", "attention among the new tokens (tree block)"),
    ("/attn/dot_general", "attention projections (q, k, v, o)"),
    ("/attn/", "attention: rope, merge, reshapes"),
    ("/mlp/", "MLP"),
    ("norm/", "RMS norms"),
    ("/embed/", "token embedding"),
    ("MedusaHeads", "heads"),
    ("logits", "LM head"),
    ("verify/dot_general", "LM head"),
    ("top_k", "top-k"),
    ("threefry", "random keys"),
    ("dynamic_update_slice", "cache / output writes"),
    ("scatter", "cache / output writes"),
    ("gather", "gathers"),
]
# the decode steps' named scopes (medusa_jax.decoding.medusa / vanilla)
PHASES = ("propose", "verify", "accept", "commit")
# GPU kernels that are not XLA ops (named by the driver or a library)
COPY_PREFIXES = ("Memcpy", "Memset", "memcpy", "memset")


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its ``op_name`` metadata, from an optimised HLO module's text
    (``Compiled.as_text()``); each name also under its ``_`` spelling (GPU kernel names)."""
    out: dict[str, str] = {}
    inside: dict[str, str] = {}  # computation -> op_name of its root (else of its first op)
    # instruction without metadata -> (the computation it calls, its operands, is it a dot)
    calls: dict[str, tuple[str | None, list[str], bool]] = {}
    dots: set[str] = set()  # computations with a dot (or convolution) in them
    comp = None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            comp = head.group(1)
            continue
        m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if not m:
            continue
        name = m.group(2)
        is_dot = re.search(r"\s(dot|convolution)\(", line) is not None
        if is_dot and comp is not None:
            dots.add(comp)
        op = re.search(r'op_name="([^"]+)"', line)
        if op:
            op = op.group(1).split(";")[0]
            out[name] = op
            if comp is not None and (m.group(1) or comp not in inside):
                inside[comp] = op
        else:
            c = re.search(r"calls=%?([\w.\-]+)", line)
            args = re.search(r"=\s*[^=]*?\b[\w\-]+\(([^)]*)\)", line)
            calls[name] = (c.group(1) if c else None,
                           re.findall(r"%([\w.\-]+)", args.group(1)) if args else [], is_dot)
    # e.g. XLA:CPU's library (ynn) fusions may carry no metadata, inside or out: take the
    # called computation's, else an operand's (a matmul's input is the op before it, often a
    # norm: the matmul is then named as its module's dot, see _dot_after)
    for _ in range(3):
        for name, (c, operands, is_dot) in calls.items():
            if name in out:
                continue
            if c in inside:
                out[name] = inside[c]
            else:
                known = [out[o] for o in operands if o in out]
                if known:
                    dot = is_dot or c in dots
                    out[name] = _dot_after(known[0]) if dot else known[0]
    for name in list(out):
        out.setdefault(_key(name), out[name])
    return out


# a module an unnamed matmul's input comes out of -> the module the matmul belongs to
_DOT_AFTER = [("/attn_norm/", "/attn/"), ("/mlp_norm/", "/mlp/"), ("/final_norm/", "/logits/"),
              ("/attn/", "/attn/"), ("/mlp/", "/mlp/")]


def _dot_after(op_name: str) -> str:
    """The op_name given to a matmul without metadata whose input op is ``op_name``: the
    ``dot_general`` of the module that reads that input (q/k/v after the attention norm,
    gate/up after the MLP norm, o and down inside their modules, the LM head after the final
    norm), else ``op_name``'s scope's."""
    for frag, module in _DOT_AFTER:
        i = op_name.rfind(frag)
        if i >= 0:
            return op_name[:i] + module + "dot_general"
    return op_name.rsplit("/", 1)[0] + "/dot_general"


def _key(name: str) -> str:
    return re.sub(r"[.\-]", "_", name)


def classify(op_name: str | None) -> tuple[str, str]:
    """``(phase, part)`` of an op from its op_name: the phase is the step's named scope the op is
    under (``loop`` for the while loop's own ops, ``unattributed`` without metadata)."""
    if not op_name:
        return "unattributed", "no op_name metadata"
    m = re.search(r"/while/body/(?:[^/]*/)*?(" + "|".join(PHASES) + r")(?:/|$)", op_name)
    if m:
        phase = m.group(1)
    elif "/while/body" in op_name:
        phase = "step (outside the phases)"
    else:
        phase = "loop"
    part = next((label for frag, label in PARTS if frag in op_name), "other")
    return phase, part


@dataclasses.dataclass
class Event:
    name: str  # the HLO instruction (or kernel) name
    module: str | None
    start_ns: float
    dur_ns: float
    line: str


def _stat(stats, key):
    for k, v in stats:
        if k == key:
            return v
    return None


def read_events(path: str) -> tuple[list[Event], str]:
    """The XLA op events of one ``.xplane.pb`` and where they came from (``device`` or
    ``host``)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    device, host = [], []
    for plane in data.planes:
        lines = list(plane.lines)
        if plane.name.startswith("/device:"):
            ops_line = [ln for ln in lines if ln.name == "XLA Ops"]
            use = ops_line or [ln for ln in lines if "Stream" in ln.name]
            for ln in use:
                for e in ln.events:
                    stats = list(e.stats)
                    device.append(Event(str(_stat(stats, "hlo_op") or e.name),
                                        _stat(stats, "hlo_module"), e.start_ns, e.duration_ns,
                                        ln.name))
        elif plane.name.startswith("/host:"):
            for ln in lines:
                for e in ln.events:
                    stats = list(e.stats)
                    op = _stat(stats, "hlo_op")
                    if op is not None:
                        host.append(Event(str(op), _stat(stats, "hlo_module"), e.start_ns,
                                          e.duration_ns, ln.name))
    return (device, "device") if device else (host, "host")


def _busy_ns(events: list[Event]) -> float:
    """Time at least one event runs (the union of their intervals)."""
    busy, end = 0.0, None
    for s, d in sorted((e.start_ns, e.dur_ns) for e in events):
        e = s + d
        if end is None or s >= end:
            busy += d
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def summarize(events: list[Event], names: dict[str, str], steps: int, wall_s: float,
              module: str | None = None, source: str = "device", top: int = 15) -> dict:
    """Per-step figures of a traced decode loop: op time by (phase, part), the ops that cost
    most, the events no HLO name matched. ``module``: keep events of this HLO module (by their
    ``hlo_module`` statistic, where they have one)."""
    if module is not None:
        events = [e for e in events if e.module is None or module in str(e.module)]
    steps = max(int(steps), 1)
    groups: dict = collections.defaultdict(lambda: [0.0, 0])
    ops: dict = collections.defaultdict(lambda: [0.0, 0])
    unmapped: dict = collections.defaultdict(lambda: [0.0, 0])
    copies = [0.0, 0]
    for e in events:
        if e.name.startswith(COPY_PREFIXES):
            copies[0] += e.dur_ns
            copies[1] += 1
            continue
        op = names.get(e.name) or names.get(_key(e.name))
        if op is None:
            unmapped[e.name][0] += e.dur_ns
            unmapped[e.name][1] += 1
            key = ("unattributed", "not in the program's HLO")
        else:
            key = classify(op)
        groups[key][0] += e.dur_ns
        groups[key][1] += 1
        ops[e.name][0] += e.dur_ns
        ops[e.name][1] += 1
    total = sum(v[0] for v in groups.values()) + copies[0]
    per = 1e6 * steps  # ns -> ms per step

    def rows(d, n):
        return sorted(d.items(), key=lambda kv: -kv[1][0])[:n]

    return {
        "source": source, "steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps,
        "op_ms_per_step": total / per, "busy_ms_per_step": _busy_ns(events) / per,
        "ops_per_step": sum(v[1] for v in groups.values()) / steps,
        "copies": {"ms_per_step": copies[0] / per, "per_step": copies[1] / steps},
        "groups": [{"phase": k[0], "part": k[1], "ms_per_step": v[0] / per,
                    "ops_per_step": v[1] / steps} for k, v in rows(groups, len(groups))],
        "top_ops": [{"op": k, "op_name": names.get(k) or names.get(_key(k)),
                     "ms_per_step": v[0] / per, "per_step": v[1] / steps}
                    for k, v in rows(ops, top)],
        "unmapped": [{"name": k[:160], "ms_per_step": v[0] / per, "per_step": v[1] / steps}
                     for k, v in rows(unmapped, 8)],
    }


def phase_totals(summary: dict) -> dict[str, float]:
    """ms per step by phase."""
    out: dict[str, float] = collections.Counter()
    for g in summary["groups"]:
        out[g["phase"]] += g["ms_per_step"]
    return dict(out)


def profile(run: Callable[[], dict], decode_fn, steps: Callable[[dict], int],
            module: str | None = None) -> dict:
    """Trace ``run()`` (a generate call whose decode loop ``decode_fn`` runs through
    :func:`medusa_jax.decoding.common.compiled_call`, compiled already: run it once before),
    then attribute the ops of ``decode_fn``'s executable. ``steps(result)``: the loop's steps;
    the wall time per step is the result's ``decode_seconds`` over them. Events of the
    prefill in the same trace are left out where the trace names their module, else counted
    (one call against the loop's many steps)."""
    import jax

    from medusa_jax.decoding.common import last_executable

    logdir = tempfile.mkdtemp(prefix="medusa_trace_")
    with jax.profiler.trace(logdir):
        res = run()
    t = time.perf_counter()
    exe = last_executable(decode_fn)
    if exe is None:
        raise ValueError(f"{getattr(decode_fn, '__name__', decode_fn)} was not run through "
                         "compiled_call in the traced call")
    names = op_names(exe.as_text())
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    events, source = read_events(max(paths, key=os.path.getmtime))
    name = module or f"jit_{getattr(decode_fn, '__name__', '')}"
    out = summarize(events, names, steps(res), res["decode_seconds"], module=name, source=source)
    out["parse_s"] = time.perf_counter() - t
    return out


def side_by_side(v: dict, m: dict, top: int = 12) -> list[str]:
    """Markdown lines comparing a vanilla and a Medusa summary: per-step totals, time and ops
    by phase and part with Medusa's extra, Medusa's costliest ops, and the events no HLO
    instruction named (what to fix in the parser, on a backend it has not met)."""
    L = ["| | vanilla | Medusa |", "| --- | --- | --- |"]
    for key, label in (("wall_ms_per_step", "wall ms per step"),
                       ("op_ms_per_step", "op time ms per step (summed)"),
                       ("busy_ms_per_step", "busy ms per step (union of op intervals)"),
                       ("ops_per_step", "ops (kernels) per step")):
        L.append(f"| {label} | {v[key]:.3f} | {m[key]:.3f} |")
    L.append(f"| copies/memsets per step (ms) | {v['copies']['per_step']:.1f} "
             f"({v['copies']['ms_per_step']:.3f}) | {m['copies']['per_step']:.1f} "
             f"({m['copies']['ms_per_step']:.3f}) |")
    keys = list(dict.fromkeys((g["phase"], g["part"]) for g in m["groups"] + v["groups"]))
    gv = {(g["phase"], g["part"]): g for g in v["groups"]}
    gm = {(g["phase"], g["part"]): g for g in m["groups"]}
    L += ["", "| phase | part | vanilla ms | vanilla ops | Medusa ms | Medusa ops | extra ms |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        a, b = gv.get(k, {}), gm.get(k, {})
        am, bm = a.get("ms_per_step", 0.0), b.get("ms_per_step", 0.0)
        L.append(f"| {k[0]} | {k[1]} | {am:.3f} | {a.get('ops_per_step', 0):.1f} | {bm:.3f} | "
                 f"{b.get('ops_per_step', 0):.1f} | {bm - am:+.3f} |")
    L += ["", "Medusa step's costliest ops:", "", "| op | op_name | ms per step | per step |",
          "| --- | --- | --- | --- |"]
    for o in m["top_ops"][:top]:
        L.append(f"| {o['op'][:60]} | {(o['op_name'] or '-')[-90:]} | {o['ms_per_step']:.3f} | "
                 f"{o['per_step']:.1f} |")
    for name, s in (("vanilla", v), ("Medusa", m)):
        if s["unmapped"]:
            L += ["", f"{name}: events no HLO instruction name matched: " + ", ".join(
                f"`{u['name'][:80]}` ({u['ms_per_step']:.3f} ms, {u['per_step']:.1f}/step)"
                for u in s["unmapped"][:6])]
    return L
