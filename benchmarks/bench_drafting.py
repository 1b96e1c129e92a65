"""The drafting share of a Medusa step on this machine: heads + tree construction against the
whole step (draft, verification forward, acceptance, cache commit), for head sets side by side.

    python benchmarks/bench_drafting.py --heads medusa_jax/assets/heads/smollm2-135m-instruct

For each head set (``--heads``, comma-separated; each with its CPU tree unless ``--tree``), a few
MT-bench first turns are decoded (greedy, batch 1) twice per prompt, interleaved: with the heads
and with a constant proposer of the same tree (every node token 0: same shapes, no head work).
Per step: drafting = (decode s / steps with the heads) - (the same with the constant proposer).
The proposer alone is also timed in its own jitted call (a median over repeats). Writes
benchmarks/results/drafting.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common as C
import numpy as np

DEFAULT_HEADS = os.path.join(C.REPO, "medusa_jax", "assets", "heads", "smollm2-135m-instruct")


def constant_proposer(num_nodes: int, hydra: bool):
    """Same shapes as the heads' proposer, no head work: every drafted token is 0 (the Medusa
    form is bench_tree_cost's; the Hydra form drafts the whole tree after the root)."""
    if not hydra:
        from bench_tree_cost import _constant_proposer

        return _constant_proposer

    import jax.numpy as jnp

    def propose(params, hidden, state, root):
        return jnp.concatenate(
            [root[:, None], jnp.zeros((root.shape[0], num_nodes), jnp.int32)], axis=1)

    propose.drafts_tree = True
    return propose


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default=DEFAULT_HEADS, help="head sets, comma-separated")
    p.add_argument("--tree", default=None, help="JSON paths (default: each head set's CPU tree)")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default=os.path.join(C.RESULTS, "drafting.md"))
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from medusa_jax.api import default_tree, heads_trees
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import default_proposer, make_settings, medusa_generate
    from medusa_jax.model.llama import convert_layout
    from medusa_jax.tokenizer import encode_prompt, eos_token_ids, load_tokenizer
    from medusa_jax.weights import load_base_model
    from medusa_jax.weights.medusa_io import load_heads

    info = C.machine_info()
    cfg, base = load_base_model(None)
    base = jax.device_put(convert_layout(base, cfg))
    tok = load_tokenizer(None)
    gen = GenerationSettings(a.max_new_tokens, eos_token_ids=eos_token_ids(tok, cfg.eos_token_ids))
    qs = C.mtbench_questions(80)[:: max(1, 80 // a.num_prompts)][: a.num_prompts]
    prompts = [encode_prompt(tok, q["text"]) for q in qs]
    timer = C.JaxTimer()
    sets = []
    for path in [x for x in a.heads.split(",") if x]:
        mcfg, heads = load_heads(path, base_cfg=cfg)
        tree = json.loads(a.tree) if a.tree else default_tree(mcfg, heads_trees(path), "cpu")
        st = make_settings(tree, mcfg.num_heads, gen)
        params = {"base": base, "medusa": jax.device_put(heads)}
        const = constant_proposer(st.tree.num_nodes - 1, mcfg.is_hydra)
        sets.append({"path": path, "mcfg": mcfg, "tree": tree, "settings": st, "params": params,
                     "propose": {"heads": default_proposer(mcfg, cfg, st), "constant": const}})

    def run(s, kind, ids):
        return timer.run(lambda: medusa_generate(cfg, s["mcfg"], s["params"], [ids],
                                                 s["settings"], propose=s["propose"][kind]))

    variants = [(i, k) for i in range(len(sets)) for k in ("heads", "constant")]
    for i, k in variants:  # compile
        run(sets[i], k, prompts[0])
    tot = {v: {"decode_s": 0.0, "steps": 0} for v in variants}
    for j, ids in enumerate(prompts):
        for i, k in C.rotated(variants, j):
            res, t = run(sets[i], k, ids)
            tot[(i, k)]["decode_s"] += t["decode_s"]
            tot[(i, k)]["steps"] += int(res["steps"][0])
        print(f"prompt {j + 1}/{len(prompts)}", file=sys.stderr, flush=True)

    rows = []
    for i, s in enumerate(sets):
        step = {k: 1e3 * tot[(i, k)]["decode_s"] / max(tot[(i, k)]["steps"], 1)
                for k in ("heads", "constant")}
        # the proposer alone, jitted, on a real hidden state and root
        prop = s["propose"]["heads"]
        hidden = jnp.zeros((1, cfg.hidden_size), jnp.float32) + 0.1
        root = jnp.ones((1,), jnp.int32)
        fn = jax.jit(lambda pr, h, r, prop=prop, hydra=s["mcfg"].is_hydra:
                     prop(pr, h, None, r) if hydra else prop(pr, h, None))
        jax.block_until_ready(fn(s["params"], hidden, root))
        ts = []
        for _ in range(50):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(s["params"], hidden, root))
            ts.append(time.perf_counter() - t0)
        alone = 1e3 * float(np.median(ts))
        rows.append({
            "heads": os.path.relpath(s["path"], C.REPO), "head_type": s["mcfg"].head_type,
            "nodes": s["settings"].tree.num_nodes - 1, "depth": s["settings"].tree.depth,
            "step_ms_heads": step["heads"], "step_ms_constant": step["constant"],
            "drafting_ms_in_loop": step["heads"] - step["constant"],
            "drafting_share_in_loop": (step["heads"] - step["constant"]) / step["heads"],
            "proposer_alone_ms": alone, "proposer_alone_share": alone / step["heads"],
        })
    table = C.md_table(
        ["heads", "type", "nodes", "depth", "step ms (heads)", "step ms (constant proposer)",
         "drafting share (in loop)", "proposer alone ms", "proposer alone / step"],
        [[r["heads"], r["head_type"], r["nodes"], r["depth"], r["step_ms_heads"],
          r["step_ms_constant"], f"{100 * r['drafting_share_in_loop']:.1f} %",
          r["proposer_alone_ms"], f"{100 * r['proposer_alone_share']:.1f} %"] for r in rows])
    md = f"""# Drafting share of a Medusa step

Command: `{C.command_line()}`

{C.machine_md(info)}

Default model (SmolLM2-135M-Instruct, float32, scanned layers), batch 1, greedy,
{len(prompts)} MT-bench first turns x {a.max_new_tokens} new tokens, each head set decoded with
its heads and with a constant proposer of the same tree, interleaved per prompt (compile
excluded). Drafting share (in loop) = 1 - step(constant) / step(heads). "Proposer alone" is the
jitted proposer on its own (median of 50 calls; dispatch included, so an upper bound).

{table}
"""
    C.write_results(a.out, md, {"machine": info, "rows": rows,
                                "trees": {r["heads"]: s["tree"] for r, s in zip(rows, sets)},
                                "prompts": [q["question_id"] for q in qs]})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
