#!/usr/bin/env python
"""One vanilla decode step vs one Medusa verification step, as the compilers see them.

Compiles the real decode loops (unrolled layers, donated cache, compiler-chosen weight layouts)
for TPU topologies through libtpu (no TPU needed) and for this CPU, and prints per model, batch,
cache length and tree: FLOPs, bytes accessed, the HBM traffic (bytes accessed less the on-chip
VMEM accesses the TPU cost analysis also counts: ``medusa_jax.step_cost.on_chip_bytes``), the
cache-sized copies in the optimised HLO, the roofline step time
``max(flops / peak, HBM bytes / bandwidth)`` on v5e, v5p and an H200 (from the v5p program's
flops and bytes), and the Medusa / vanilla ratio. Rows are filled to half the
cache (``--live``). Writes ``benchmarks/results/step_cost.md``.

    python benchmarks/step_cost.py                      # the plan below (~40 min here)
    python benchmarks/step_cost.py --quick              # 7B, batch 1 and 8, cache 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

TREES = {"chain4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
         "6-node": [[0], [1], [0, 0], [2], [0, 0, 0]]}


def _trees(names):
    from medusa_jax.tree import get_tree, trim_tree

    out = {}
    for name in names:
        if name in TREES:
            out[name] = TREES[name]
        elif name == "26-node":
            out[name] = trim_tree(get_tree("mc_sim_7b_63"), 26)
        elif name == "64-node":
            out[name] = get_tree("mc_sim_7b_63")
        elif name == "batch-default":
            out[name] = None  # filled per batch below
        else:
            raise SystemExit(f"error: unknown tree {name!r} (chain4, 6-node, 26-node, 64-node, "
                             "batch-default)")
    return out


def _model(name: str):
    from medusa_jax.aot import MODEL_PRESETS
    from medusa_jax.config import MedusaConfig, ModelConfig

    if name == "smollm2-135m":
        from medusa_jax.weights import load_model_config

        cfg = dataclasses.replace(load_model_config(None), scan_layers=False)
        mcfg = MedusaConfig.for_model(cfg, num_heads=5, shared_lm_head=True)
        return cfg, mcfg
    if name not in MODEL_PRESETS:
        raise SystemExit(f"error: unknown model {name!r} (llama2-7b, llama2-13b, smollm2-135m)")
    cfg = ModelConfig(**MODEL_PRESETS[name], dtype="bfloat16", param_dtype="bfloat16",
                      scan_layers=False)
    # 4 heads projecting through the base LM head (as ours do), bf16
    return cfg, MedusaConfig.for_model(cfg, num_heads=4, param_dtype="bfloat16")


# (model, targets, batches, caches, trees): the full report; --quick runs the first group
PLAN = [
    ("llama2-7b", "v5e:1x1,v5p:1x1x1", "1,8", "2048", "chain4,6-node,26-node,64-node,batch-default"),
    ("llama2-7b", "v5e:1x1,v5p:1x1x1", "1,8", "8192", "64-node,batch-default"),
    ("llama2-13b", "v5p:1x1x1", "1,8", "2048", "64-node,batch-default"),
    ("smollm2-135m", "cpu", "1,8", "2048", "chain4,6-node,26-node,64-node,batch-default"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="one group instead of the plan: models (llama2-7b, "
                   "llama2-13b, smollm2-135m)")
    p.add_argument("--targets", default="v5e:1x1,v5p:1x1x1", help="TPU topologies and/or cpu")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--caches", default="2048")
    p.add_argument("--trees", default="chain4,6-node,26-node,64-node,batch-default")
    p.add_argument("--live", type=float, default=0.5, help="rows filled to this share of the cache")
    p.add_argument("--quick", action="store_true", help="the plan's first group only")
    p.add_argument("--accepted", type=float, default=1.46,
                   help="accepted tokens per step for the predicted speedup (default: the "
                   "shipped heads' MT-bench figure, benchmarks/results/mtbench.md)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_cost.md"))
    args = p.parse_args(argv)
    if args.models:
        plan = [(m, args.targets, args.batches, args.caches, args.trees)
                for m in args.models.split(",")]
    else:
        plan = PLAN[:1] if args.quick else PLAN

    from medusa_jax.api import ACCELERATOR_ROWS, default_tree
    from medusa_jax.step_cost import ROOFLINE_CHIPS, StepCostError, step_cost

    try:
        plan = [(m, t.split(","), [int(b) for b in bs.split(",")], [int(c) for c in cs.split(",")],
                 _trees(tr.split(","))) for m, t, bs, cs, tr in plan]
    except ValueError:
        print("error: --batches and --caches take comma-separated integers", file=sys.stderr)
        return 2
    rows, notes = [], []
    t_all = time.perf_counter()
    for model, targets, batches, caches, trees in plan:
        cfg, mcfg = _model(model)
        for target in targets:
            chip = target.split(":")[0]
            for batch in batches:
                for cache in caches:
                    live = int(cache * args.live)
                    try:
                        van = step_cost(cfg, None, target, batch=batch, cache_len=cache, live=live)
                    except StepCostError as e:
                        notes.append(f"{model} {target} batch {batch} cache {cache}: {e}")
                        print(notes[-1], flush=True)
                        continue
                    for tname, tree in trees.items():
                        if tree is None:
                            tree = default_tree(mcfg, backend="gpu", batch=batch)
                            tname = f"default b{batch}"
                        try:
                            med = step_cost(cfg, mcfg, target, tree=tree, batch=batch,
                                            cache_len=cache, live=live)
                        except StepCostError as e:
                            notes.append(f"{model} {target} batch {batch} cache {cache} {tname}: {e}")
                            print(notes[-1], flush=True)
                            continue
                        if tname.startswith("default"):
                            tname = f"default b{batch} ({med.tree_nodes} nodes)"
                        row = {"model": model, "target": target, "batch": batch, "cache": cache,
                               "tree": tname, "nodes": med.tree_nodes,
                               "van_gflops": van.flops / 1e9, "med_gflops": med.flops / 1e9,
                               "van_gb": van.bytes / 1e9, "med_gb": med.bytes / 1e9,
                               "bytes_ratio": med.bytes / van.bytes,
                               "van_hbm_gb": van.hbm_bytes / 1e9, "med_hbm_gb": med.hbm_bytes / 1e9,
                               "hbm_ratio": med.hbm_bytes / van.hbm_bytes,
                               "van_floor_gb": (van.weight_bytes + van.live_kv_bytes) / 1e9,
                               "copies": f"{len(van.cache_copies)}/{len(med.cache_copies)}",
                               "compile_s": van.compile_s + med.compile_s}
                        chips = [chip, "h200"] if chip == "v5p" else [chip]
                        for c in chips if target != "cpu" else []:
                            row[f"{c}_ratio"] = med.roofline_s(c) / van.roofline_s(c)
                            row[f"{c}_van_ms"] = van.roofline_s(c) * 1e3
                        rows.append(row)
                        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
    lines = ["| model | target | batch | cache | tree | nodes | vanilla GB | Medusa GB | bytes ratio "
             "| vanilla HBM GB (weights + live KV) | Medusa HBM GB | HBM ratio "
             "| cache copies (van/med) | roofline Medusa/vanilla | vanilla roofline ms "
             f"| predicted speedup at {args.accepted} accepted/step |",
             "| --- " * 16 + "|"]
    for r in rows:
        ratios = ", ".join(f"{c}: {r[f'{c}_ratio']:.2f}" for c in ("v5e", "v5p", "h200")
                           if f"{c}_ratio" in r) or "-"
        ms = ", ".join(f"{c}: {r[f'{c}_van_ms']:.2f}" for c in ("v5e", "v5p", "h200")
                       if f"{c}_van_ms" in r) or "-"
        speed = ", ".join(f"{c}: {args.accepted / r[f'{c}_ratio']:.2f}x" for c in
                          ("v5e", "v5p", "h200") if f"{c}_ratio" in r) or "-"
        lines.append(f"| {r['model']} | {r['target']} | {r['batch']} | {r['cache']} | {r['tree']} "
                     f"| {r['nodes']} | {r['van_gb']:.2f} | {r['med_gb']:.2f} "
                     f"| {r['bytes_ratio']:.3f} | {r['van_hbm_gb']:.2f} ({r['van_floor_gb']:.2f}) "
                     f"| {r['med_hbm_gb']:.2f} | {r['hbm_ratio']:.3f} "
                     f"| {r['copies']} | {ratios} | {ms} | {speed} |")
    body = "\n".join(lines)
    body += (f"\n\nRows filled to {args.live:.0%} of the cache. Roofline peaks and bandwidths: "
             + ", ".join(f"{k} {v[0] / 1e12:.0f} TFLOP/s, {v[1] / 1e12:.2f} TB/s"
                         for k, v in ROOFLINE_CHIPS.items())
             + ". GB = bytes accessed as the compiler's cost analysis counts them; HBM GB = "
             "those less the accesses to on-chip (VMEM, `S(1)`) arrays, which that count also "
             "includes (a weight the compiler prefetches into VMEM is counted five times: the "
             "copy's read and write, the copy-done's operand and result, and the consumer's "
             "read; HBM sees it once). The rooflines use HBM GB. Weights + live KV: the base "
             "weights plus K and V of the live slots, the floor for a vanilla step"
             + f". The accelerator default tree for batch B keeps nodes x B <= {ACCELERATOR_ROWS}."
             " The prefix loop's trips past the first are added as the K/V bytes they read "
             "(the cost analysis counts a loop body once). Predicted speedup = accepted tokens "
             "per step / roofline step ratio; the accepted length is the shipped SmolLM2 heads' "
             "on MT-bench with the CPU tree, a stand-in until heads are measured with these "
             "trees on these models.")
    if notes:
        body += "\n\nNot compiled:\n" + "\n".join(f"- {n}" for n in notes)
    body += f"\n\nTotal wall time {time.perf_counter() - t_all:.0f} s."
    info = C.machine_info()
    md = (f"# Step cost: one vanilla decode step vs one Medusa verification step\n\n"
          f"Command: `{C.command_line()}`\n\n## Machine\n{C.machine_md(info)}\n- the TPU "
          f"programs are compiled here by libtpu (no TPU ran them): the figures are the "
          f"compiler's own cost analysis and a roofline, not measurements\n\n## Results\n\n"
          f"{body}\n")
    C.write_results(args.out, md, {"machine": info, "rows": rows, "notes": notes})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
