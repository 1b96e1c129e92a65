"""Where a Medusa verification step's time goes beside a plain decode step's, on this machine:
the default model and heads, one MT-bench prompt, a profiler trace of each decode loop with
every op attributed to the step's phase (propose, verify, accept, commit) and part (attention
over the cache, the tree block, projections, MLP, LM head, ...) by ``medusa_jax.profiling``.

    python benchmarks/profile_step.py                       # the CPU tree and a 64-node tree
    python benchmarks/profile_step.py --trees cpu --max-new-tokens 64

Each loop runs once to compile, once timed (rotated, so neither always runs first), once traced.
EOS is ignored, so every run takes the same steps. Writes benchmarks/results/profile_step.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys

import _common as C


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", default="cpu,gpu",
                   help="the shipped heads' trees to profile (cpu: the CPU default, gpu: the "
                   "64-node one), comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--question", type=int, default=0, help="which MT-bench first turn")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "profile_step.md"))
    a = p.parse_args(argv)
    trees = [t.strip() for t in a.trees.split(",") if t.strip()]
    if not trees or set(trees) - {"cpu", "gpu"}:
        p.error("--trees takes cpu and/or gpu")
    if a.max_new_tokens < 8:
        p.error("--max-new-tokens must be >= 8")

    import jax

    from medusa_jax import profiling
    from medusa_jax.api import MedusaLM, default_tree
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_decode, medusa_generate
    from medusa_jax.decoding.vanilla import generate, vanilla_decode
    from medusa_jax.tokenizer import encode_prompt

    info = C.machine_info()
    lm = MedusaLM.load(None, scan_layers=False)
    cfg, mcfg, params = lm.cfg, lm.mcfg, lm.params
    q = C.mtbench_questions(80)[a.question]
    ids = encode_prompt(lm.tokenizer, q["text"])
    gen = GenerationSettings(a.max_new_tokens, eos_token_ids=())
    runs = {"vanilla": (lambda: generate(cfg, params["base"], [ids], gen), vanilla_decode,
                        lambda r: r["steps"] - 1)}
    chosen = {}
    for t in trees:
        tree = default_tree(mcfg, lm.heads_trees, backend=t)
        st = make_settings(tree, mcfg.num_heads, gen)
        chosen[t] = {"nodes": st.tree.num_nodes, "depth": st.tree.depth}
        runs[f"medusa-{t}"] = (lambda st=st: medusa_generate(cfg, mcfg, params, [ids], st),
                               medusa_decode, lambda r: max(r["steps"]))
    names = list(runs)
    for n in names:  # compile
        runs[n][0]()
    timed = {}
    for n in C.rotated(names, 1):
        r = runs[n][0]()
        timed[n] = {"decode_s": r["decode_seconds"], "steps": runs[n][2](r),
                    "accepted": (r["mean_accepted"][0] if "mean_accepted" in r else 1.0)}
    profs = {}
    for n in names:
        profs[n] = profiling.profile(*runs[n])
        print(f"{n}: {profs[n]['wall_ms_per_step']:.2f} ms/step traced, "
              f"{profs[n]['ops_per_step']:.0f} ops", file=sys.stderr, flush=True)

    v = timed["vanilla"]
    rows = [[n, t["steps"], 1e3 * t["decode_s"] / t["steps"],
             (1e3 * t["decode_s"] / t["steps"]) / (1e3 * v["decode_s"] / v["steps"]),
             t["accepted"], profs[n]["ops_per_step"]] for n, t in timed.items()]
    table = C.md_table(["loop", "steps", "ms per step (timed)", "plain steps", "accepted/step",
                        "ops per step"], rows)
    sections = []
    for t in trees:
        n = f"medusa-{t}"
        sections += ["", f"## {n}: {chosen[t]['nodes']} nodes (depth {chosen[t]['depth']}) "
                     "beside the plain step", "", *profiling.side_by_side(profs["vanilla"],
                                                                          profs[n])]
    md = f"""# A Medusa step beside a plain step, by phase and part (profiler trace)

Command: `{C.command_line()}`

{C.machine_md(info)}

Default model (SmolLM2-135M-Instruct, float32, unrolled layers) and shipped heads, batch 1,
MT-bench question {q['question_id']}'s first turn ({len(ids)} prompt tokens), {a.max_new_tokens}
new tokens with EOS ignored, jax {jax.__version__} on {jax.default_backend()}. Each loop compiled,
then timed once (rotated order), then traced once; op times are summed over the CPU's threads
(two cores: summed op time can exceed wall time, and wall time includes the gaps between ops).

{table}
{chr(10).join(sections)}
"""
    C.write_results(a.out, md, {"machine": info, "question": q["question_id"],
                                "prompt_tokens": len(ids), "max_new_tokens": a.max_new_tokens,
                                "trees": chosen, "timed": timed, "profiles": profs})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
