"""Cost of one Medusa verification step per tree size, relative to one vanilla decode step.

By default the heads are freshly initialised (4 heads, 1 ResBlock each, shared LM head): their
ResBlocks are zero, so every head proposes the base model's own next-token guess and nearly every
step accepts just the root token. Then Medusa and vanilla decoding take about as many steps for the
same tokens, and the time per step isolates what a tree of T nodes costs (one forward over T
positions instead of 1, the heads, the tree logits and acceptance). ``--heads PATH`` uses trained
heads instead; then the mean accepted length and the effective speedup are the interesting
columns.

Trees: n = 1 is a depth-1 chain ``[[0]]``; otherwise the first n paths of a published tree
(default ``mc_sim_7b_63``, whose order keeps every prefix parent-closed: checked with
``build_tree``). The published trees have 63 paths, so the largest size, "64", is the full tree:
63 paths + root = 64 nodes.

Vanilla and every tree size decode every prompt; they take turns per prompt (the order rotates
from one prompt to the next), batch 1, greedy. Compile time is reported apart, never timed.

    python benchmarks/bench_tree_cost.py                   # 3 prompts x 64 new tokens
    python benchmarks/bench_tree_cost.py --heads path/to/heads --no-scan-layers
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=3,
                   help="first turns of the first N MT-bench questions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=os.path.join(C.RESULTS, "tree_cost.md"),
                   help="markdown results file; the JSON goes next to it (same stem)")
    p.add_argument("--model", default=None,
                   help=".gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--heads", default=None,
                   help="trained Medusa heads (any layout load_heads reads); default: fresh "
                        "zero-initialised heads")
    p.add_argument("--num-heads", type=int, default=4, help="fresh heads only")
    p.add_argument("--tree", default="mc_sim_7b_63", help="predefined tree the sizes are cut from")
    p.add_argument("--sizes", default="1,4,8,16,32,64",
                   help="tree sizes in nodes besides the root (>= the tree's paths: all of it)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over the prompts (more samples against machine noise)")
    p.add_argument("--no-heads-control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the smallest tree with a constant proposer instead of the "
                        "heads, to separate the heads' cost from the tree forward's")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="layer layout of the base model (scan: much faster to compile)")
    a = p.parse_args(argv)
    if a.num_prompts < 1 or a.max_new_tokens < 1 or a.repeats < 1:
        p.error("--num-prompts, --max-new-tokens and --repeats must be >= 1")
    a.sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if not a.sizes or any(s < 1 for s in a.sizes):
        p.error("--sizes needs sizes >= 1")
    return a


def tree_for_size(n: int, full: list[list[int]]) -> tuple[list[list[int]], str]:
    """The paths for size ``n`` and how they were picked."""
    if n == 1:
        return [[0]], "chain of depth 1"
    if n >= len(full):
        return [list(p) for p in full], f"all {len(full)} paths"
    return [list(p) for p in full[:n]], f"first {n} paths"


def _constant_proposer(params, hidden, state):
    """A stand-in for the heads: always proposes token 0 (verification keeps decoding exact).
    The smallest tree with it isolates the tree forward from the cost of running the heads."""
    import jax.numpy as jnp

    return jnp.zeros((hidden.shape[0], 16, 64), jnp.int32)  # sliced to [B, depth, topk]


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    info = C.machine_info()

    import jax

    from medusa_jax.config import MedusaConfig
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.model.heads import init_medusa_params
    from medusa_jax.tokenizer import (
        encode_prompt,
        load_tokenizer,
        resolve_model_path,
    )
    from medusa_jax.tree import build_tree, get_tree

    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path)
    questions = C.mtbench_questions(args.num_prompts)
    prompts = [encode_prompt(tok, q["text"], chat=True) for q in questions]

    log(f"loading the base model (fp32, scan_layers={args.scan_layers})")
    cfg, base, eos, pad = C.load_fp32_base(model_path, tok, args.scan_layers)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                             pad_token_id=pad)

    if args.heads:
        from medusa_jax.weights.medusa_io import load_heads

        mcfg, mp = load_heads(args.heads, base_cfg=cfg)
        heads_desc = f"trained heads from `{args.heads}`"
    else:
        mcfg = MedusaConfig.for_model(cfg, num_heads=args.num_heads, num_layers=1,
                                      shared_lm_head=True)
        mp = init_medusa_params(mcfg)
        heads_desc = "fresh heads (`init_medusa_params`: zero ResBlocks, = the base LM head)"
    heads_desc += (f": {mcfg.num_heads} heads x {mcfg.num_layers} ResBlock(s), "
                   f"{'shared' if mcfg.shared_lm_head else 'own'} LM head, {mcfg.param_dtype}")
    params = {"base": base, "medusa": jax.device_put(mp)}

    # ---- trees: check the published order is parent-closed at every prefix
    full = get_tree(args.tree)
    for n in range(1, len(full) + 1):
        build_tree(full[:n])  # raises TreeError naming an orphan path
    usable = [p for p in full if len(p) <= mcfg.num_heads]  # deeper paths need more heads
    for n in range(1, len(usable) + 1):
        build_tree(usable[:n], num_heads=mcfg.num_heads)
    trees = []
    for n in args.sizes:
        choices, how = tree_for_size(n, usable)
        tb = build_tree(choices, num_heads=mcfg.num_heads)
        if any(t["nodes"] == tb.num_nodes for t in trees):
            continue
        trees.append({"name": f"tree-{tb.num_nodes - 1}", "size_arg": n, "choices": choices,
                      "how": how, "nodes": tb.num_nodes, "depth": tb.depth, "topk": tb.topk,
                      "settings": make_settings(choices, mcfg.num_heads, gen,
                                                acceptance="greedy")})
    log("trees: " + ", ".join(f"{t['name']} ({t['nodes']} nodes incl. root, depth "
                              f"{t['depth']})" for t in trees))

    timer = C.JaxTimer()

    def run_vanilla(ids):
        res, times = timer.run(lambda: generate(cfg, base, [ids], gen))
        # the prefill samples the first token; the loop runs steps - 1 forward passes
        return {"tokens": res["tokens"][0], "decode_steps": res["steps"] - 1, **times}

    def make_medusa(st, propose=None):
        def run(ids):
            res, times = timer.run(
                lambda: medusa_generate(cfg, mcfg, params, [ids], st, propose=propose))
            return {"tokens": res["tokens"][0], "decode_steps": int(res["steps"][0]),
                    "mean_accepted": float(res["mean_accepted"][0]), **times}

        return run

    variants = [{"name": "vanilla", "run": run_vanilla}]
    variants += [{"name": t["name"], "run": make_medusa(t["settings"]), "tree": t} for t in trees]
    if args.no_heads_control:
        t = {**trees[0], "name": f"{trees[0]['name']}-noheads",
             "how": f"{trees[0]['how']}, constant proposer instead of the heads"}
        trees.append(t)
        variants.append({"name": t["name"], "run": make_medusa(t["settings"], _constant_proposer),
                         "tree": t})

    def run_prompt(rnd, i, ids, turn):
        rec = {"round": rnd, **{k: questions[i][k] for k in ("question_id", "category")},
               "prompt_tokens": len(ids), "order": [], "runs": {}}
        for v in C.rotated(variants, turn):
            r = v["run"](ids)
            rec["order"].append(v["name"])
            rec["runs"][v["name"]] = {**r, "new_tokens": len(r["tokens"])}
        log(f"round {rnd + 1}/{args.repeats} prompt {i + 1}/{len(prompts)} "
            f"(q{rec['question_id']}): " + ", ".join(
                f"{n} {r['decode_steps']} steps {r['decode_s']:.2f}s"
                for n, r in rec["runs"].items()))
        return rec

    warm = {}
    for v in variants:
        t0 = time.perf_counter()
        r = v["run"](prompts[0])
        warm[v["name"]] = {"wall_s": time.perf_counter() - t0, "compile_s": r["compile_s"]}
        log(f"warm-up {v['name']}: compile {r['compile_s']:.1f} s")

    records = []
    for rnd in range(args.repeats):
        for i, ids in enumerate(prompts):
            records.append(run_prompt(rnd, i, ids, rnd * len(prompts) + i))
    info["load_average_at_end"] = C.load_average()

    # ---- summaries
    def agg(name):
        runs = [r["runs"][name] for r in records]
        dec_s = sum(r["decode_s"] for r in runs)
        steps = sum(r["decode_steps"] for r in runs)
        toks = sum(r["new_tokens"] for r in runs)
        tot_s = sum(r["total_s"] for r in runs)
        best = min(r["decode_s"] / max(r["decode_steps"], 1) for r in runs)
        return {"decode_s": dec_s, "decode_steps": steps, "step_ms": 1e3 * dec_s / max(steps, 1),
                "best_run_step_ms": 1e3 * best, "tokens": toks, "total_s": tot_s,
                "tokens_per_s": toks / tot_s,
                "compile_s_warmup": warm[name]["compile_s"],
                "compile_s_timed_runs": sum(r["compile_s"] for r in runs)}

    van = agg("vanilla")
    summary = {"vanilla": van}
    for t in trees:
        s = agg(t["name"])
        runs = [r["runs"][t["name"]] for r in records]
        s["mean_accepted"] = s["tokens"] / max(s["decode_steps"], 1)
        s["step_ratio"] = s["step_ms"] / van["step_ms"]
        per = [(r["runs"][t["name"]]["decode_s"] / max(r["runs"][t["name"]]["decode_steps"], 1))
               / (r["runs"]["vanilla"]["decode_s"] / max(r["runs"]["vanilla"]["decode_steps"], 1))
               for r in records]
        s["per_run_step_ratio"] = C.ratio_stats(per)
        s["best_run_step_ratio"] = s["best_run_step_ms"] / van["best_run_step_ms"]
        s["speedup_measured"] = s["tokens_per_s"] / van["tokens_per_s"]
        s["speedup_predicted"] = s["mean_accepted"] / s["step_ratio"]
        div = [C.first_divergence(r["runs"][t["name"]]["tokens"], r["runs"]["vanilla"]["tokens"])
               for r in records]
        s["tokens_differ_from_vanilla"] = sum(d is not None for d in div)
        s["first_divergence"] = div
        s.update({k: t[k] for k in ("nodes", "depth", "topk", "how")})
        s["per_run_mean_accepted"] = [r["mean_accepted"] for r in runs]
        summary[t["name"]] = s

    header = ["tree", "nodes (incl. root)", "depth", "step ms", "vanilla step ms",
              "ratio", "per-run ratio median [min, max]", "best-run ratio", "compile s",
              "mean accepted", "speedup (measured)", "speedup (accepted / ratio)",
              "tokens differ from vanilla"]
    rows = []
    for t in trees:
        s = summary[t["name"]]
        pp = s["per_run_step_ratio"]
        rows.append([f"{t['name']} ({t['how']})", s["nodes"], s["depth"], round(s["step_ms"], 1),
                     round(van["step_ms"], 1), round(s["step_ratio"], 3),
                     f"{pp['median']:.3f} [{pp['min']:.3f}, {pp['max']:.3f}]",
                     round(s["best_run_step_ratio"], 3),
                     round(s["compile_s_warmup"] + s["compile_s_timed_runs"], 1),
                     round(s["mean_accepted"], 3), round(s["speedup_measured"], 3),
                     round(s["speedup_predicted"], 3),
                     f"{s['tokens_differ_from_vanilla']}/{len(records)}"])
    table = C.md_table(header, rows)
    print(table)

    per_rows = [[r["round"] + 1, r["question_id"], r["category"], r["prompt_tokens"],
                 " > ".join(r["order"])]
                + [f"{r['runs'][n]['decode_steps']} / {r['runs'][n]['decode_s']:.2f}"
                   for n in (v["name"] for v in variants)] for r in records]
    per_table = C.md_table(["round", "q", "category", "prompt tokens", "run order"]
                           + [f"{v['name']} steps / s" for v in variants], per_rows)
    fresh = args.heads is None
    dropped = "" if len(usable) == len(full) else (
        f"; the {len(full) - len(usable)} paths deeper than the {mcfg.num_heads} heads were "
        "dropped first (the rest stays parent-closed)")
    md = f"""# Cost of a Medusa step per tree size

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}
- JAX/XLA on the CPU with its default thread pool. The machine is shared with other engineers'
  test runs: absolute times move from run to run; only ratios measured side by side in this run
  are meaningful.

## Setup
- Model: `{os.path.basename(model_path)}`, float32, scan_layers = {args.scan_layers}.
- Heads: {heads_desc}.
- Trees: cut from `{args.tree}`; every prefix of it was checked parent-closed with `build_tree`.
  n = 1 is the chain `[[0]]`; a size >= the tree's {len(usable)} paths takes all of them
  ({len(usable) + 1} nodes with the root){dropped}.
- Prompts: first turn of the first {len(prompts)} MT-bench questions (chat template), batch 1,
  greedy acceptance, max_new_tokens = {args.max_new_tokens}, stop at EOS {list(eos)}.
- Interleaving: {args.repeats} round(s) over the prompts; per prompt, vanilla and every tree run
  once, the order rotating by one from run to run. One warm-up run each on the first prompt
  first.
- step ms = decode-loop seconds / decode steps, summed over the prompts (prefill timed apart and
  left out; compile excluded). Vanilla: one forward of 1 token per step (the first token comes
  from the prefill). Medusa: one verification forward of all tree nodes per step, plus the heads,
  the tree logits, acceptance and the K/V compaction. ratio = Medusa step ms / vanilla step ms;
  "per-run ratio" is the same ratio per prompt and round (paired runs); "best-run ratio" =
  fastest run's step ms of the tree / of vanilla (noise on a shared machine only ever adds time,
  so the fastest runs are the least disturbed).
- mean accepted = tokens / Medusa steps. speedup (measured) = end-to-end tokens/s (prefill +
  decode, compile excluded) of Medusa / of vanilla; speedup (accepted / ratio) = what the step
  ratio predicts for decoding alone.
- compile s = compile time of the variant's loops (prefill + decode), warm-up plus any other
  prompt-length bucket met in the timed runs.

## Results

{table}

Vanilla: {van['decode_steps']} decode steps, {van['tokens']} tokens, compile
{van['compile_s_warmup'] + van['compile_s_timed_runs']:.1f} s.
"""
    if args.no_heads_control:
        a, b = summary[trees[0]["name"]], summary[trees[-1]["name"]]
        md += f"""
Control: `{trees[-1]['name']}` is `{trees[0]['name']}` with a constant proposer in place of the
heads (same verification forward, acceptance and cache compaction, no heads). Running the heads
costs {a['step_ms'] - b['step_ms']:.1f} ms per step ({a['step_ms']:.1f} vs {b['step_ms']:.1f} ms;
fastest runs: {a['best_run_step_ms']:.1f} vs {b['best_run_step_ms']:.1f} ms), i.e.
{(a['step_ms'] - b['step_ms']) / van['step_ms']:.2f} vanilla steps
({(a['best_run_step_ms'] - b['best_run_step_ms']) / van['best_run_step_ms']:.2f} by the fastest
runs); the rest of the {trees[0]['name']} overhead over vanilla ({b['step_ms']:.1f} vs
{van['step_ms']:.1f} ms; fastest runs {b['best_run_step_ms']:.1f} vs
{van['best_run_step_ms']:.1f} ms) is the {trees[0]['nodes']}-position verification forward,
its logits, acceptance and compaction.
"""
    if fresh:
        md += """
With fresh heads every head proposes the base model's next-token guess again, so a step accepts
one token unless the text repeats a token; the "speedup" columns then show the pure overhead of
the tree (< 1 means slower than vanilla). Train heads and pass `--heads` to see real speedups.
"""
    md += f"""
Batch-1 decoding on a CPU streams all weights once per forward (memory bound), so a forward over
T tree positions costs little more than over 1 position while T is small; the ratio grows once
the T x (hidden, MLP and vocab) matmuls stop being negligible against reading the weights. Even
the smallest tree pays for the heads (their ResBlocks and, with a shared LM head, one more
projection of {mcfg.num_heads} rows through the {cfg.hidden_size} x {cfg.vocab_size} LM head), the
T x vocab logits, and the cache compaction.

### Per run

{per_table}
"""
    data = {"command": C.command_line(), "machine": info, "args": vars(args),
            "model": model_path, "heads": heads_desc, "eos_token_ids": list(eos),
            "trees": [{k: t[k] for k in ("name", "size_arg", "how", "nodes", "depth", "topk",
                                          "choices")} for t in trees],
            "warmup": warm, "summary": summary, "per_prompt": records}
    path = C.write_results(args.out, md, data)
    log(f"wrote {args.out} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
