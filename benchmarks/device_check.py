#!/usr/bin/env python
"""The device check: one call on an accelerator (an H200 lent for minutes) that tells the truth
about speed, with nothing large to carry there.

Random bf16 weights of a named shape are built on the device (``medusa_jax.presets``), prompts
are synthetic token ids, EOS is ignored, the perfect-draft proposer (``decoding/oracle.py``)
gives full acceptance and, for the SmolLM2 shape, the shipped heads give real proposals. In
order of priority (a time budget skips what is left, and says so):

1. 7B shape, batch 1: vanilla vs Medusa (oracle, 63-node tree) tokens/s and step time with the
   default prefix reader (if the default kernel fails there, the XLA loop instead, and the
   failure is in the report); greedy equality (first divergence, top-2 logit gap there). The
   oracle reruns on its own output when bf16 takes it off vanilla's path (a flipped near-tie),
   and the same program runs with every guess wrong ("oracle-miss"): the step time of full
   acceptance beside that of none.
2. SmolLM2 shape, shipped heads, batch 1: step time and acceptance per tree size (oracle and
   oracle-miss for the chain and the 63-node tree). Then a profiler trace of one 7B vanilla
   and one oracle-64 decode (``medusa_jax.profiling``): time and kernels per step by phase
   (propose, verify, accept, commit) and part (attention over the cache, the tree block,
   projections, MLP, LM head, ...) side by side, so the report names where the verification
   step's extra time goes.
3. Compiler figures: ``cost_analysis()`` FLOPs/bytes and cache-sized copy counts of one vanilla
   and one verification step (``medusa_jax.step_cost``) beside the roofline and the measured
   step; then the 7B shape's first runs with the other prefix reader (the kernel vs the XLA
   loop); then the SmolLM2 shape at batch 8.
4. 7B shape: step time per tree size (batch 1), chain and 63-node trees at batch 8.
5. XLA settings as measured variants, each in a fresh process (flags act at backend start):
   command buffers for the decode loop's while/conditional, a persistent compilation cache
   (cold, then warm), a larger client memory fraction.

Sections 1-4 run in one child process and each variant in another: the calling process never
starts a backend, so no process holds the GPU's preallocated memory while another needs it. A
run that fails is recorded under ``errors`` and the plan goes on; the children's progress lines
and tracebacks are appended to ``log_main.txt`` / ``log_variants.txt`` in the output folder as
they come, so a call cut short still shows how far it got.

Writes ``device_check.json`` and ``device_check.md`` to ``--out`` (default ``$OUT``, else
``runs/device_check``). ``--smoke`` runs the same plan on tiny shapes on a CPU in about a minute
(CI runs it); without ``--smoke`` a machine without an accelerator is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANT_ORDER = ("command_buffer", "compile_cache_cold", "compile_cache_warm", "mem_fraction_0.95")
VARIANTS = {  # name -> environment changes (applied before jax starts, in a fresh process)
    "command_buffer": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="
                       "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"},
    "mem_fraction_0.95": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"},
    "compile_cache_cold": {"JAX_COMPILATION_CACHE_DIR": "{cache}"},
    "compile_cache_warm": {"JAX_COMPILATION_CACHE_DIR": "{cache}"},
}
SMOKE_VARIANTS = ("command_buffer",)
CACHE_ROOT = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"medusa_device_check_{os.getpid()}")


# default share of the budget the measurements (sections 1-4) may use; the variants get the rest
MAIN_SHARE = 0.6

class CheckError(ValueError):
    """Bad input for the device check (one ``error:`` line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    big: str  # the 7B-class shape
    small: str  # the shape the shipped heads fit
    dtype: str
    max_new: int
    prompt_len: int
    batches: tuple[int, ...]
    tree_sizes: tuple[int, ...]  # nodes with the root
    budget_s: float
    main_share: float = MAIN_SHARE


def make_plan(smoke: bool, budget_s: float | None, main_share: float | None = None) -> Plan:
    share = MAIN_SHARE if main_share is None else main_share
    if smoke:
        return Plan("tiny", "tiny", "float32", 12, 8, (1, 2), (5, 64), budget_s or 900, share)
    return Plan("llama2-7b", "smollm2-135m", "bfloat16", 128, 32, (1, 8), (5, 16, 32, 64),
                budget_s or 400, share)



# ------------------------------------------------------------------------------- helpers
def _tree(nodes: int):
    from medusa_jax.tree import chain_tree, get_tree, trim_tree

    if nodes == 5:
        return chain_tree(4)
    return get_tree("mc_sim_7b_63") if nodes >= 64 else trim_tree(get_tree("mc_sim_7b_63"), nodes)


def _prompts(cfg, batch: int, length: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(3, min(cfg.vocab_size, 30000), size=(batch, length)).tolist()


class Model:
    """One preset on the device: config, weights, heads (random, or shipped for SmolLM2)."""

    def __init__(self, name: str, dtype: str, attention_impl: str = "auto"):
        import jax

        from medusa_jax.config import MedusaConfig
        from medusa_jax.presets import preset_config, preset_heads, random_params

        t = time.perf_counter()
        self.name = name
        self.cfg = preset_config(name, dtype, scan_layers=False, attention_impl=attention_impl)
        self.params = {"base": random_params(self.cfg)}
        heads = preset_heads(name)
        if heads is not None:
            from medusa_jax.weights.medusa_io import load_heads

            self.mcfg, mp = load_heads(heads, base_cfg=self.cfg, dtype=dtype)
            self.params["medusa"] = jax.device_put(mp)
            self.heads = "shipped"
        elif name == "tiny":
            from medusa_jax.model.heads import init_medusa_params

            self.mcfg = MedusaConfig.for_model(self.cfg, num_heads=5)
            self.params["medusa"] = init_medusa_params(self.mcfg, scale=0.3)
            self.heads = "random"
        else:  # no heads for this shape: the oracle proposes (the config only checks the tree)
            self.mcfg = MedusaConfig.for_model(self.cfg, num_heads=5, shared_lm_head=True)
            self.heads = None
        jax.block_until_ready(self.params)
        self.build_s = time.perf_counter() - t

    def with_impl(self, impl: str) -> Model:
        other = object.__new__(Model)
        other.__dict__.update(self.__dict__, cfg=self.cfg.replace(attention_impl=impl))
        return other


def run_vanilla(m: Model, prompts, max_new: int) -> dict:
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.vanilla import generate

    gen = GenerationSettings(max_new_tokens=max_new, eos_token_ids=())
    compile_s = generate(m.cfg, m.params["base"], prompts, gen)["compile_seconds"]  # + warm-up
    res = generate(m.cfg, m.params["base"], prompts, gen)
    n = sum(len(t) for t in res["tokens"])
    dec = res["decode_seconds"]
    return {"kind": "vanilla", "batch": len(prompts), "tree_nodes": 1, "tokens": res["tokens"],
            "tok_s": n / dec if dec else 0.0, "step_ms": 1e3 * dec / max_new,
            "mean_accepted": 1.0, "compile_s": compile_s + res["compile_seconds"]}


# passes of the oracle at most: the first reads vanilla's tokens, each later one Medusa's own
ORACLE_PASSES = 3


def _follows(tokens, reference) -> bool:
    return all(list(t) == list(r[:len(t)]) for t, r in zip(tokens, reference))


def _padded(tokens) -> list[list[int]]:
    """Rows of output tokens as one rectangular reference for the oracle (zeros after a row)."""
    width = max(len(t) for t in tokens)
    return [list(t) + [0] * (width - len(t)) for t in tokens]


def run_medusa(m: Model, prompts, max_new: int, nodes: int, proposer: str, reference=None,
               passes: int = ORACLE_PASSES) -> dict:
    """One Medusa run (compile + warm-up, then measured). ``proposer``: ``heads``, ``oracle``
    or ``oracle-miss`` (the oracle's program with a reference that is wrong everywhere: its step
    time beside the oracle's is what accepting the full depth costs). With the oracle, ``reference`` is
    vanilla's greedy output; in bf16 the tree's verification can flip a near-tie (a top-2 gap
    of 0), after which the reference is no longer the path Medusa is on and every later step
    accepts only the root. So when the output leaves the reference, the run is repeated with
    its own output as the reference (same shapes: no recompile), up to ``passes`` runs; the
    last one is reported, with ``oracle_passes`` and the first pass's acceptance."""
    import numpy as np

    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.oracle import oracle_proposer, with_reference

    gen = GenerationSettings(max_new_tokens=max_new, eos_token_ids=())
    st = make_settings(_tree(nodes), m.mcfg.num_heads, gen)
    params, propose = m.params, None
    if proposer == "oracle-miss":  # the same program, every guess wrong: only the root accepted
        reference, passes = (np.asarray(reference, np.int64) + 1) % m.cfg.vocab_size, 1
    if proposer in ("oracle", "oracle-miss"):
        params = with_reference(m.params, reference)
        propose = oracle_proposer(st.tree.depth, st.tree.topk)
    compile_s = medusa_generate(m.cfg, m.mcfg, params, prompts, st,
                                propose=propose)["compile_seconds"]  # + warm-up
    res = medusa_generate(m.cfg, m.mcfg, params, prompts, st, propose=propose)
    extra = {}
    if proposer in ("oracle", "oracle-miss"):
        extra = {"oracle_passes": 1,
                 "oracle_first_accepted": float(sum(res["mean_accepted"]) / len(prompts))}
        while extra["oracle_passes"] < passes and not _follows(res["tokens"], reference):
            reference = _padded(res["tokens"])
            params = with_reference(m.params, reference)
            res = medusa_generate(m.cfg, m.mcfg, params, prompts, st, propose=propose)
            extra["oracle_passes"] += 1
    n = sum(len(t) for t in res["tokens"])
    dec, steps = res["decode_seconds"], max(res["steps"])
    return {"kind": f"medusa-{proposer}", "batch": len(prompts), "tree_nodes": st.tree.num_nodes,
            "tokens": res["tokens"], "tok_s": n / dec if dec else 0.0,
            "step_ms": 1e3 * dec / max(steps, 1),
            "mean_accepted": float(sum(res["mean_accepted"]) / len(prompts)),
            "compile_s": compile_s + res["compile_seconds"], **extra}


def first_divergence(m: Model, prompts, vanilla, other) -> dict:
    """Where Medusa's greedy tokens first differ from vanilla's, per row, and the top-2 gap of
    the vanilla logits there (bf16 rounding flips near-ties: a small gap is not a bug)."""
    import jax
    import jax.numpy as jnp
    import numpy as np


    last_logits = _last_logits(m.cfg)  # one compile per model, not per divergence
    width = max(len(p) for p in prompts) + max(len(v) for v in vanilla)
    rows = []
    for b, (v, o) in enumerate(zip(vanilla, other, strict=True)):
        k = next((i for i, (x, y) in enumerate(zip(v, o)) if x != y), None)
        if k is None and len(v) == len(o):
            rows.append({"row": b, "identical": True})
            continue
        k = min(len(v), len(o)) if k is None else k
        seq = list(prompts[b]) + list(v[:k])
        lg = last_logits(m.params["base"], jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32),
                         len(seq))
        top2 = np.sort(np.asarray(jax.device_get(lg), np.float32))[-2:]
        rows.append({"row": b, "identical": False, "first_divergence": k,
                     "top2_gap": float(top2[1] - top2[0])})
    return {"identical_rows": sum(r["identical"] for r in rows), "rows": rows}


@functools.lru_cache(maxsize=4)
def _last_logits(cfg):
    import jax

    from medusa_jax.model import llama

    @jax.jit
    def last_logits(params, seq, n):  # right padding is invisible to a causal forward
        h, _ = llama.forward(cfg, params, seq)
        h = jax.lax.dynamic_index_in_dim(h[0], n - 1, keepdims=False)
        return llama.logits(cfg, params, h)

    return last_logits


def profile_pair(m: Model, prompts, max_new: int, nodes: int, reference) -> dict:
    """A profiler trace of one vanilla and one Medusa-oracle decode (compiled already by the
    measured runs: same shapes), each op attributed to its phase and part
    (:mod:`medusa_jax.profiling`): where the verification step's time goes beside a plain
    step's. ``reference``: the tokens the oracle proposes (Medusa's own output, so it accepts
    the full depth)."""
    from medusa_jax import profiling
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_decode, medusa_generate
    from medusa_jax.decoding.oracle import oracle_proposer, with_reference
    from medusa_jax.decoding.vanilla import generate, vanilla_decode

    gen = GenerationSettings(max_new_tokens=max_new, eos_token_ids=())
    van = profiling.profile(lambda: generate(m.cfg, m.params["base"], prompts, gen),
                            vanilla_decode, lambda r: r["steps"] - 1)
    st = make_settings(_tree(nodes), m.mcfg.num_heads, gen)
    params = with_reference(m.params, _padded(reference))
    propose = oracle_proposer(st.tree.depth, st.tree.topk)
    med = profiling.profile(
        lambda: medusa_generate(m.cfg, m.mcfg, params, prompts, st, propose=propose),
        medusa_decode, lambda r: max(r["steps"]))
    return {"model": m.name, "batch": len(prompts), "tree_nodes": st.tree.num_nodes,
            "vanilla": van, "medusa": med}


def compiler_figures(m: Model, nodes: int, measured: dict, target: str) -> list[dict]:
    from medusa_jax.step_cost import ROOFLINE_CHIPS, step_cost

    out = []
    chip = "h200"
    assert chip in ROOFLINE_CHIPS
    for kind in ("vanilla", "medusa"):
        tree = _tree(nodes) if kind == "medusa" else None
        rep = step_cost(m.cfg, m.mcfg, target, tree=tree, batch=1, cache_len=_cache_len(m),
                        live=_live(m))
        key = "vanilla" if kind == "vanilla" else "medusa"
        out.append({"kind": kind, "tree_nodes": rep.tree_nodes, "flops": rep.flops,
                    "bytes": rep.bytes, "cache_copies": len(rep.cache_copies),
                    "big_copies": len(rep.big_copies), "roofline_ms_h200": 1e3 * rep.roofline_s(chip),
                    "measured_step_ms": measured.get(key), "compile_s": rep.compile_s})
    return out


def _cache_len(m: Model) -> int:
    return 256 if m.name == "tiny" else 512


def _live(m: Model) -> int:
    return 40 if m.name == "tiny" else 224  # the prompts' length plus about half the new tokens


# ---------------------------------------------------------------------------------- plan
class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def ok(self, what: str, need: float = 0.0) -> bool:
        if self.left() > need:
            return True
        self.skipped.append(what)
        return False


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


def main_plan(plan: Plan, smoke: bool, save: str | None = None) -> dict:
    """Sections 1-4, in this process (a child of the caller); the report so far is saved to
    ``save`` after every run, so a crash late in the plan keeps what was measured."""
    import jax

    budget = Budget(plan.budget_s * plan.main_share)
    backend = jax.default_backend()
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "smoke": smoke, "backend": backend,
        "devices": [str(d.device_kind) for d in jax.devices()], "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "plan": dataclasses.asdict(plan),
        "runs": [], "equality": {}, "compiler": [], "variants": {}, "skipped": budget.skipped,
    }
    from medusa_jax.model.attention import resolve_impl

    report["attention_impl"] = resolve_impl("auto")
    runs = report["runs"]
    report["errors"] = []

    def save_now():
        if save is not None:
            with open(save, "w") as f:
                json.dump(report, f)

    def log(msg: str):  # progress in the log that travels back, even if the call is cut short
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def record(model: str, r: dict | None, **extra):
        if r is not None:
            runs.append({"model": model, **_strip(r), **extra})
            log(f"{model} {r['kind']} b{r['batch']} {r['tree_nodes']} nodes: "
                f"{r['tok_s']:.1f} tok/s, {r['step_ms']:.2f} ms/step, "
                f"accepted {r['mean_accepted']:.2f}, compile {r['compile_s']:.1f}s")
        save_now()
        return r

    def attempt(what: str, fn, *a, **k):
        """One measurement; a failure is recorded (and the plan goes on), not a lost report."""
        log(f"start {what}")
        try:
            return fn(*a, **k)
        except Exception as e:
            report["errors"].append(f"{what}: {type(e).__name__}: {str(e)[:800]}")
            log(f"FAILED {what}: {type(e).__name__}: {str(e)[:300]}")
            save_now()
            return None

    def record_medusa(m: Model, batch: int, pb, van: dict, nodes: int, proposer: str):
        """One Medusa run, recorded, with its greedy equality against ``van``."""
        ref = van["tokens"] if proposer == "oracle" else None
        what = f"{m.name} b{batch} {proposer} {nodes}"
        r = record(m.name, attempt(what, run_medusa, m, pb, plan.max_new, nodes, proposer, ref))
        if r is not None:
            eq = attempt(f"equality {what}", first_divergence, m, pb, van["tokens"], r["tokens"])
            if eq is not None:
                report["equality"][what] = eq
        save_now()
        return r

    # 1. the big shape at batch 1: vanilla vs Medusa (oracle, 63-node tree)
    big = Model(plan.big, plan.dtype)
    log(f"built {plan.big} in {big.build_s:.1f}s")
    report["build_s"] = {plan.big: big.build_s}
    p1 = _prompts(big.cfg, 1, plan.prompt_len)
    impl = report["attention_impl"]
    van1 = record(plan.big, attempt(f"{plan.big} b1 vanilla {impl}", run_vanilla, big, p1,
                                    plan.max_new), impl=impl)
    if van1 is None and impl != "xla":  # the default kernel failed here: measure the XLA loop
        impl = report["attention_impl"] = "xla"
        big = big.with_impl("xla")
        van1 = record(plan.big, attempt(f"{plan.big} b1 vanilla xla", run_vanilla, big, p1,
                                        plan.max_new), impl=impl)
    if van1 is None:
        raise RuntimeError("the first vanilla run failed: " + " | ".join(report["errors"]))
    med1 = record(plan.big, attempt(f"{plan.big} b1 oracle 64 {impl}", run_medusa, big, p1,
                                    plan.max_new, 64, "oracle", van1["tokens"]), impl=impl)
    if med1 is not None:
        eq = attempt("equality big", first_divergence, big, p1, van1["tokens"], med1["tokens"])
        if eq is not None:
            report["equality"][f"{plan.big} b1 oracle 64"] = eq
        save_now()
        if budget.ok(f"{plan.big} b1 oracle-miss 64", 10):  # compiled already: seconds
            record(plan.big, attempt(f"{plan.big} b1 oracle-miss 64 {impl}", run_medusa, big, p1,
                                     plan.max_new, 64, "oracle-miss", van1["tokens"]), impl=impl)

    # 2. the small shape with its heads, batch 1: step time and acceptance per tree size (the
    # issue's second target, so before the rest)
    small = big if plan.small == plan.big else None

    def small_shape(batch: int):
        nonlocal small
        if not budget.ok(f"{plan.small} batch {batch}", 45):
            return
        if small is None:
            small = attempt(f"build {plan.small}", Model, plan.small, plan.dtype)
            if small is None:
                return
        report["build_s"][plan.small] = small.build_s
        pb = _prompts(small.cfg, batch, plan.prompt_len, seed=batch)
        van = record(plan.small, attempt(f"{plan.small} b{batch} vanilla", run_vanilla, small,
                                         pb, plan.max_new))
        if van is None:
            return
        sizes = plan.tree_sizes if batch == 1 else (5, 64)
        for nodes in sizes:
            if budget.ok(f"{plan.small} batch {batch} heads {nodes}", 20):
                record_medusa(small, batch, pb, van, nodes, "heads")
        for nodes in (5, 64):
            if budget.ok(f"{plan.small} batch {batch} oracle {nodes}", 20):
                if record_medusa(small, batch, pb, van, nodes, "oracle") is not None \
                        and batch == 1 and budget.ok(f"{plan.small} b1 oracle-miss {nodes}", 5):
                    record(plan.small, attempt(f"{plan.small} b1 oracle-miss {nodes}", run_medusa,
                                               small, pb, plan.max_new, nodes, "oracle-miss",
                                               van["tokens"]))

    small_shape(plan.batches[0])

    # where the verification step's time goes beside a plain step's (both compiled already;
    # after the shipped heads' sizes, so a profiler fault cannot cost the issue's targets)
    if med1 is not None and budget.ok(f"{plan.big} b1 profile", 30):
        prof = attempt(f"{plan.big} b1 profile", profile_pair, big, p1, plan.max_new, 64,
                       med1["tokens"])
        if prof is not None:
            report["profile"] = prof
            log(f"profile: vanilla {prof['vanilla']['wall_ms_per_step']:.2f} ms/step, "
                f"{prof['vanilla']['ops_per_step']:.0f} ops; medusa "
                f"{prof['medusa']['wall_ms_per_step']:.2f} ms/step, "
                f"{prof['medusa']['ops_per_step']:.0f} ops")
        save_now()

    # 3. compiler figures beside the roofline and the measured steps
    if budget.ok("compiler figures", 60):
        target = "cpu" if backend == "cpu" else "gpu" if backend == "gpu" else backend
        log("start compiler figures")
        try:
            report["compiler"] = compiler_figures(
                big, 64, {"vanilla": van1["step_ms"],
                          "medusa": med1["step_ms"] if med1 else None}, target)
        except Exception as e:  # a figure that cannot be read is a note, not a lost report
            report["compiler"] = [{"error": f"{type(e).__name__}: {e}"[:400]}]
        save_now()

    # the other prefix reader on this hardware (the kernel vs the XLA loop)
    other = "xla" if impl != "xla" else {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
    if other and not smoke and budget.ok(f"{plan.big} attention_impl={other}", 60):
        alt = big.with_impl(other)
        record(plan.big, attempt(f"{plan.big} b1 vanilla {other}", run_vanilla, alt, p1,
                                 plan.max_new), impl=other)
        record(plan.big, attempt(f"{plan.big} b1 oracle 64 {other}", run_medusa, alt, p1,
                                 plan.max_new, 64, "oracle", van1["tokens"]), impl=other)

    for batch in plan.batches[1:]:
        small_shape(batch)

    # 4. the big shape: step time per tree size at batch 1, chain and 63-node at batch 8 (with
    # one shape for both, as in the smoke run, section 3 measured these already)
    for nodes in plan.tree_sizes if plan.small != plan.big else ():
        if nodes != 64 and budget.ok(f"{plan.big} batch 1 oracle {nodes}", 40):
            record(plan.big, attempt(f"{plan.big} b1 oracle {nodes}", run_medusa, big, p1,
                                     plan.max_new, nodes, "oracle", van1["tokens"]))
    for batch in plan.batches[1:] if plan.small != plan.big else ():
        if not budget.ok(f"{plan.big} batch {batch}", 90):
            continue
        pb = _prompts(big.cfg, batch, plan.prompt_len, seed=batch)
        van = record(plan.big, attempt(f"{plan.big} b{batch} vanilla", run_vanilla, big, pb,
                                       plan.max_new))
        for nodes in ((5, 64) if van is not None else ()):
            if budget.ok(f"{plan.big} batch {batch} oracle {nodes}", 40):
                record_medusa(big, batch, pb, van, nodes, "oracle")
    return report


def run_child(args: list[str], env: dict, timeout: float, log: str | None = None
              ) -> tuple[int, str, str]:
    """Run this script as a child; its stderr (progress lines, tracebacks) is also appended to
    ``log`` as it comes, so a call cut short still brings back how far it got."""
    import tempfile

    cmd = [sys.executable, os.path.abspath(__file__), *args]
    with tempfile.TemporaryFile("w+") as tmp:
        sink = open(log, "a") if log else tmp
        try:
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=sink, text=True,
                               timeout=max(timeout, 5))
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired:
            rc, out = 124, ""
        if log:
            sink.close()
            with open(log) as f:
                err = f.read()
        else:
            tmp.seek(0)
            err = tmp.read()
    if rc == 124:
        err += f"\ntimed out after {timeout:.0f}s"
    return rc, out, err


# ------------------------------------------------------------------------------ variants
def variant_measure(plan: Plan) -> dict:
    """Inside a variant's process: the big shape at batch 1, vanilla and oracle 63-node."""
    t = time.perf_counter()
    big = Model(plan.big, plan.dtype)
    p1 = _prompts(big.cfg, 1, plan.prompt_len)
    van = run_vanilla(big, p1, plan.max_new)
    med = run_medusa(big, p1, plan.max_new, 64, "oracle", van["tokens"])
    return {"vanilla": _strip(van), "medusa": _strip(med), "wall_s": time.perf_counter() - t}


def run_variant(name: str, smoke: bool, out_dir: str, timeout: float) -> dict:
    env = dict(os.environ)
    cache = os.path.join(CACHE_ROOT, "jax_cache")  # not under $OUT: only 8 files come back
    for k, v in VARIANTS[name].items():
        v = v.format(cache=cache)
        env[k] = f"{env.get(k, '')} {v}".strip() if k == "XLA_FLAGS" else v
    if name == "compile_cache_cold":
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    if name.startswith("compile_cache"):
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    rc, out, err = run_child(["--variant", name] + (["--smoke"] if smoke else []), env, timeout,
                             log=os.path.join(out_dir, "log_variants.txt"))
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        return {"env": VARIANTS[name], "error": f"exit {rc}: {err[-600:]}"}
    return {"env": VARIANTS[name], **json.loads(lines[-1])}


# -------------------------------------------------------------------------------- output
def _commit() -> str:
    """The commit measured: ``$MEDUSA_COMMIT`` when the caller names it (a working tree copied
    to a device may carry a stale ``.git``: the first H200 reports named a commit older than
    the code they ran), else git's HEAD, marked ``+dirty`` when tracked files differ from it."""
    named = os.environ.get("MEDUSA_COMMIT", "").strip()
    if named:
        return named
    from medusa_jax.provenance import git_commit  # noqa: PLC0415

    return git_commit(REPO, short=True) or "?"


def _accepted(r: dict) -> str:
    """Accepted per step; for an oracle run repeated on its own output, which pass it is."""
    text = f"{r['mean_accepted']:.2f}"
    if r.get("oracle_passes", 1) > 1:
        text += f" (pass {r['oracle_passes']}; first {r['oracle_first_accepted']:.2f})"
    return text


def markdown(rep: dict) -> str:
    label = "CPU smoke run (tiny shapes: the format, not a measurement)" if rep["smoke"] else \
        f"{', '.join(sorted(set(rep['devices'])))}"
    L = [f"# Device check: {label}", "",
         f"date {rep['date']}, commit {rep['commit']}, jax {rep['jax']}, backend {rep['backend']}, "
         f"attention `{rep['attention_impl']}`, XLA_FLAGS `{rep['xla_flags'] or '-'}`", ""]
    L += ["## Decoding (synthetic prompts, EOS ignored, greedy)", "",
          "| model | run | impl | batch | tree nodes | tok/s | step ms | accepted/step | compile s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rep["runs"]:
        L.append(f"| {r['model']} | {r['kind']} | {r.get('impl', rep['attention_impl'])} | "
                 f"{r['batch']} | {r['tree_nodes']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | "
                 f"{_accepted(r)} | {r['compile_s']:.1f} |")
    L += ["", "Speedup (Medusa tok/s over vanilla tok/s, same model, batch and impl):", ""]
    van = {(r["model"], r["batch"], r.get("impl")): r for r in rep["runs"] if r["kind"] == "vanilla"}
    for r in rep["runs"]:
        v = van.get((r["model"], r["batch"], r.get("impl")))
        if r["kind"] != "vanilla" and v and v["tok_s"]:
            L.append(f"- {r['model']} b{r['batch']} {r['kind']} {r['tree_nodes']} nodes: "
                     f"{r['tok_s'] / v['tok_s']:.2f}x, step = {r['step_ms'] / v['step_ms']:.2f} "
                     "plain steps")
    L += ["", "## Greedy equality (Medusa vs vanilla tokens)", ""]
    for k, e in rep["equality"].items():
        bad = [f"row {r['row']}: first divergence at {r['first_divergence']}, top-2 gap "
               f"{r['top2_gap']:.3g}" for r in e["rows"] if not r["identical"]]
        L.append(f"- {k}: {e['identical_rows']}/{len(e['rows'])} rows identical"
                 + (f" ({'; '.join(bad)})" if bad else ""))
    L += ["", "## Compiler figures, one step at batch 1 (`cost_analysis()`, cache-sized copies)",
          "", "| step | nodes | GFLOP | GB accessed | cache copies | other big copies | "
          "roofline ms (H200) | measured ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in rep["compiler"]:
        if "error" in c:
            L.append(f"| error: {c['error']} | | | | | | | |")
            continue
        ms = c["measured_step_ms"]
        L.append(f"| {c['kind']} | {c['tree_nodes']} | {c['flops'] / 1e9:.2f} | "
                 f"{c['bytes'] / 1e9:.3f} | {c['cache_copies']} | {c['big_copies']} | "
                 f"{c['roofline_ms_h200']:.3f} | {'-' if ms is None else f'{ms:.2f}'} |")
    if rep.get("profile"):
        L += profile_markdown(rep["profile"])
    L += ["", "## XLA settings (each a fresh process; big shape, batch 1)", "",
          "| variant | env | vanilla tok/s | Medusa-oracle 64 tok/s | compile s | wall s |",
          "| --- | --- | --- | --- | --- | --- |"]
    for name, v in rep["variants"].items():
        env = ", ".join(f"{k}={x}" for k, x in v["env"].items()) or "-"
        if "error" in v:
            L.append(f"| {name} | {env} | error: {v['error'][-200:]!r} | | | |")
            continue
        comp = v["vanilla"]["compile_s"] + v["medusa"]["compile_s"]
        L.append(f"| {name} | {env} | {v['vanilla']['tok_s']:.1f} | {v['medusa']['tok_s']:.1f} | "
                 f"{comp:.1f} | {v['wall_s']:.1f} |")
    if rep["skipped"]:
        L += ["", "Skipped (time budget): " + ", ".join(rep["skipped"])]
    if rep.get("errors"):
        L += ["", "Runs that failed (the plan went on without them):", ""]
        L += [f"- `{e[:600]}`" for e in rep["errors"]]
    if rep.get("error"):
        L += ["", "**The measurements stopped early:**", "", "```", rep["error"], "```"]
    return "\n".join(L) + "\n"


def profile_markdown(prof: dict) -> list[str]:
    """The profile section (:func:`medusa_jax.profiling.side_by_side`)."""
    from medusa_jax.profiling import side_by_side

    m = prof["medusa"]
    return ["", f"## Where a step's time goes ({prof['model']}, batch {prof['batch']}, vanilla "
            f"vs oracle {prof['tree_nodes']} nodes; profiler trace, events from the "
            f"{m['source']})", "", *side_by_side(prof["vanilla"], m)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU (CI)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else runs/device_check)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new sections after this many seconds (default 420; "
                   "240 in smoke mode)")
    p.add_argument("--main-share", type=float, default=None,
                   help=f"share of the budget for the measurements, the XLA variants get the rest "
                   f"(default {MAIN_SHARE})")
    p.add_argument("--no-variants", action="store_true", help="skip the XLA-setting processes")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # a variant's own process
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # sections 1-4: --part FILE
    return p.parse_args(argv)


def child(args, plan: Plan) -> int:
    """A child process: sections 1-4 (``--part FILE``) or one variant (``--variant NAME``)."""
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from medusa_jax.platform import skip_absent_tpu

    skip_absent_tpu()
    import jax

    if not args.smoke and jax.default_backend() == "cpu":
        print("error: no accelerator found (JAX sees only the CPU): the device check measures "
              "a GPU or TPU; run it with --smoke to check it on a CPU", file=sys.stderr)
        return 2
    if args.variant is not None:
        print(json.dumps(variant_measure(plan)))
        return 0
    rep = main_plan(plan, args.smoke, save=args.part)
    with open(args.part, "w") as f:
        json.dump(rep, f)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.variant is not None and args.variant not in VARIANTS:
            raise CheckError(f"unknown variant {args.variant!r} ({', '.join(VARIANTS)})")
        if args.budget_s is not None and not args.budget_s > 0:
            raise CheckError(f"--budget-s must be > 0, got {args.budget_s}")
        if args.main_share is not None and not 0 < args.main_share <= 1:
            raise CheckError(f"--main-share must be in (0, 1], got {args.main_share}")
        plan = make_plan(args.smoke, args.budget_s, args.main_share)
        if args.variant is not None or args.part is not None:
            return child(args, plan)
        out = args.out or os.environ.get("OUT") or os.path.join(REPO, "runs", "device_check")
        os.makedirs(out, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise CheckError(f"cannot write to --out {out}")
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot use the output folder: {e}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    end = t + plan.budget_s
    part = os.path.join(out, "part_main.json")
    if os.path.exists(part):
        os.remove(part)
    base = ["--smoke"] if args.smoke else []
    if args.budget_s is not None:
        base += ["--budget-s", str(args.budget_s)]
    if args.main_share is not None:
        base += ["--main-share", str(args.main_share)]
    log = os.path.join(out, "log_main.txt")
    if os.path.exists(log):
        os.remove(log)
    rc, _, err = run_child(["--part", part, *base], dict(os.environ), plan.budget_s + 300, log=log)
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if rc == 2 and errs:  # the child's one clear line (no accelerator)
        print(errs[-1], file=sys.stderr)
        return 2
    if not os.path.exists(part):
        print(err[-4000:], file=sys.stderr)
        print(f"error: the measurements failed before the first result (exit {rc}); the lines "
              "above are theirs", file=sys.stderr)
        return 1
    with open(part) as f:
        rep = json.load(f)
    os.remove(part)
    if rc != 0:  # what was measured before the failure is kept, with the failure's last words
        rep["error"] = f"the measurements stopped (exit {rc}): {err[-1500:]}"
        print(err[-4000:], file=sys.stderr)
    if not args.no_variants:
        for name in SMOKE_VARIANTS if args.smoke else VARIANT_ORDER:
            left = end - time.perf_counter()
            if left < (20 if args.smoke else 75):
                rep["skipped"].append(f"variant {name}")
                continue
            rep["variants"][name] = run_variant(name, args.smoke, out, left)
    rep["wall_s"] = time.perf_counter() - t
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(rep, f, indent=1)
    md = markdown(rep)
    with open(os.path.join(out, "device_check.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if rep.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
