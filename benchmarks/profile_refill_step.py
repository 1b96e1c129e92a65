"""Where a refilling-distiller decode step spends its time: the XLA ops of one step of
:func:`medusa_jax.decoding.refill.decode_until_free` on the default model, grouped by what they
compute (MLP and attention projections, the LM head, attention over the cache, the cache
slices), from a JAX profiler trace. Also times a step per batch size.

    python benchmarks/profile_refill_step.py --batch-sizes 32,64,128 --prompt-tokens 256

Every row holds a prompt of ``--prompt-tokens`` random tokens, and the cache has the slots a
distillation run with that prompt budget and ``--max-new-tokens`` has (``RefillingGenerator``'s
``cache_len``): the attention reads what a real run's step reads. ``--steps`` steps are timed
(each row starts ``--steps`` tokens short of its budget). Writes
benchmarks/results/refill_step.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import _common as C
import numpy as np

# op_name fragments -> what the op computes (first match wins)
GROUPS = [
    ("logits/embed.attend", "LM head (576 x 49152)"),
    ("/mlp/dot_general", "MLP matmuls"),
    ("bkgtc,bkch->bkgth", "attention: probabilities x V"),
    ("btkgh,bkch->bkgtc", "attention: Q x K scores"),
    ("/attn/prefix/dynamic_slice", "attention: cache slice (copy)"),
    ("/attn/dynamic_update_slice", "cache write (new K/V)"),
    ("/attn/dot_general", "attention projections (q, k, v, o)"),
    ("/attn/", "attention: softmax, masks, reshapes"),
    ("norm", "RMS norms"),
]


def group(op_name: str) -> str:
    for frag, name in GROUPS:
        if frag in op_name:
            return name
    return "other (sampling, bookkeeping)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per batch size")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="the distillation run's answer budget: sizes the cache (prompt width + "
                   "this many slots), as the distiller's is")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--layouts", default="unrolled,scan",
                   help="layer layouts to time (the profile is of the first): unrolled (a KV "
                   "buffer per layer), unrolled-stacked (unrolled layers over one stacked KV "
                   "cache, the layout before per-layer buffers), scan")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "refill_step.md"))
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from medusa_jax import profiling
    from medusa_jax.api import MedusaLM
    from medusa_jax.decoding import refill as R
    from medusa_jax.decoding.common import GenerationSettings

    info = C.machine_info()
    layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"scan", "unrolled", "unrolled-stacked"}:
        p.error("--layouts takes unrolled, unrolled-stacked and/or scan")
    if not 0 < a.steps < a.max_new_tokens:
        p.error(f"--steps must be 1 to --max-new-tokens - 1 ({a.max_new_tokens - 1})")
    st = GenerationSettings(max_new_tokens=a.max_new_tokens, eos_token_ids=(), pad_token_id=0)
    P = a.prompt_tokens
    toks = jnp.asarray(np.random.default_rng(0).integers(100, 20000, (1, P)), jnp.int32)

    def filled(cfg, params, B, lay):
        g = R.RefillingGenerator(cfg, params, st, batch_size=B, max_prompt_len=P)
        s = R.init_state(cfg, B, g.cache_len, st.max_new_tokens, True,
                         per_layer=False if lay == "unrolled-stacked" else None)
        for r in range(B):
            s = R.refill_row(params, s, toks, jnp.int32(P), jnp.int32(r), jnp.int32(r),
                             cfg=cfg, settings=st)
        # each row --steps tokens short of its budget: the loop runs exactly --steps steps
        return s.replace(n_out=jnp.full((B,), a.max_new_tokens - a.steps, jnp.int32)), g.cache_len

    rows, prof = [], None
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    models = {}
    for lay in layouts:
        lm = MedusaLM.load(None, medusa=None, scan_layers=lay == "scan")
        models[lay] = (lm.cfg, lm.params["base"])
    for B in sizes:
        for lay in layouts:  # side by side per batch size
            cfg, params = models[lay]
            s, cache_len = filled(cfg, params, B, lay)
            warm = R.decode_until_free(params, jax.tree.map(jnp.copy, s), jnp.int32(B),
                                       cfg=cfg, settings=st)  # compiles
            warm.done.block_until_ready()
            profile = B == a.profile_batch and lay == layouts[0]
            trace = tempfile.mkdtemp(prefix="refill_trace_") if profile else None
            if trace:
                jax.profiler.start_trace(trace)
            t = time.perf_counter()
            out = R.decode_until_free(params, s, jnp.int32(B), cfg=cfg, settings=st)
            out.done.block_until_ready()
            dt = time.perf_counter() - t
            if trace:
                jax.profiler.stop_trace()
                # the executable that ran (cached: no second compile) names the trace's ops
                exe = R.decode_until_free.lower(params, s, jnp.int32(B), cfg=cfg,
                                                settings=st).compile()
                prof = (trace, int(out.step), exe.as_text())
            n = int(out.step)
            rows.append({"layout": lay, "batch": B, "cache_slots": cache_len, "steps": n,
                         "step_ms": 1e3 * dt / n, "tokens_per_s": B * n / dt})
            print(f"{lay} batch {B}: {1e3 * dt / n:.1f} ms/step, {B * n / dt:.1f} tok/s",
                  file=sys.stderr)

    groups, other = collections.Counter(), collections.Counter()
    if prof:
        path = glob.glob(os.path.join(prof[0], "**", "*.xplane.pb"), recursive=True)[0]
        events, _ = profiling.read_events(path)
        ops = profiling.op_names(prof[2])
        for e in events:
            if e.module is not None and "decode_until_free" not in str(e.module):
                continue
            op = ops.get(e.name)
            g = group(op) if op else "other (sampling, bookkeeping)"
            groups[g] += e.dur_ns / 1e6 / prof[1]
            if g.startswith("other"):
                other[re.sub(r"\d+", "N", op or e.name)] += e.dur_ns / 1e6 / prof[1]
    total = sum(groups.values())
    gtable = C.md_table(["what", "ms per step", "share"],
                        [[g, ms, f"{100 * ms / total:.0f} %"] for g, ms in groups.most_common()])
    ttable = C.md_table(["layers", "batch", "cache slots", "ms per step",
                         "tokens/s (decode only)"],
                        [[r["layout"], r["batch"], r["cache_slots"], r["step_ms"],
                          r["tokens_per_s"]] for r in rows])
    md = f"""# Refilling distiller: one decode step, measured

Command: `{C.command_line()}`

{C.machine_md(info)}

Default model (SmolLM2-135M-Instruct, float32; layer layouts side by side per batch size:
unrolled with a KV buffer per layer, unrolled over one stacked KV cache (`unrolled-stacked`,
whose layer slices XLA:CPU copies before attention), or scanned, whose every step copies each
layer's weights out of the stack), every row
holding a
{P}-token prompt in a cache of the slots a distillation run with <= {P}-token prompts and
<= {a.max_new_tokens} new tokens has, {a.steps} decode steps timed after a compile run (no
refills: the decode loop alone, the ceiling of the distiller at that batch size).

{ttable}

## Batch {a.profile_batch}, {layouts[0]} layers: time per step by what the ops compute (JAX
profiler trace, summed over both cores' threads)

{gtable}
"""
    C.write_results(a.out, md, {"machine": info, "rows": rows, "profile_batch": a.profile_batch,
                                "prompt_tokens": P, "max_new_tokens": a.max_new_tokens,
                                "groups_ms_per_step": dict(groups),
                                "other_ms_per_step": dict(other.most_common(12))})
    print(ttable)
    print(gtable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
