"""What the decode loop's precomputed projections buy on this machine: the default model and its
shipped heads, decoded three ways side by side: vanilla, Medusa on the parameters as given
(``projections=False``: the verification logits as ``x @ E.T``, the draft columns gathered in
the loop) and Medusa with :func:`medusa_jax.decoding.medusa.with_decode_projections` (the tied
embedding as a ``[D, V]`` copy for the tree rows, the draft columns gathered once).

    python benchmarks/bench_projections.py                # the run.sh prompt + 8 MT-bench turns

Per prompt the three variants run in an order that rotates from prompt to prompt and round to
round (greedy, batch 1, compile excluded). Reported: decode tokens/s per variant, the Medusa /
vanilla ratio per run (median, range) and its step cost in plain steps (= accepted per step x
vanilla step / Medusa step), and whether all three give the same tokens. Writes
benchmarks/results/projections.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys

import _common as C

RUN_SH_PROMPT = "What are three good reasons to learn to cook at home?"
VARIANTS = ("vanilla", "medusa (as given)", "medusa (projections)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=8, help="MT-bench first turns (spread)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=os.path.join(C.RESULTS, "projections.md"))
    a = p.parse_args(argv)
    if a.questions < 0 or a.rounds < 1 or a.max_new_tokens < 1:
        p.error("--questions >= 0, --rounds >= 1 and --max-new-tokens >= 1")

    from medusa_jax.api import MedusaLM
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate, with_decode_projections
    from medusa_jax.decoding.vanilla import generate

    info = C.machine_info()
    lm = MedusaLM.load()
    qs = C.mtbench_questions(80)[:: max(1, 80 // max(a.questions, 1))][: a.questions]
    texts = [RUN_SH_PROMPT] + [q["text"] for q in qs]
    names = ["run.sh prompt"] + [f"mt-bench q{q['question_id']}" for q in qs]
    prompts = lm.encode(texts)
    gen = GenerationSettings(a.max_new_tokens, eos_token_ids=lm.eos_token_ids,
                             pad_token_id=lm.pad_token_id)
    tree = lm.default_tree(1)
    st = make_settings(tree, lm.mcfg.num_heads, gen, proposal_size=lm.proposal_size)
    with_p = with_decode_projections(lm.cfg, lm.mcfg, lm.params)
    timer = C.JaxTimer()
    fns = {
        VARIANTS[0]: lambda ids: generate(lm.cfg, lm.params["base"], [ids], gen),
        VARIANTS[1]: lambda ids: medusa_generate(lm.cfg, lm.mcfg, lm.params, [ids], st,
                                                 projections=False),
        VARIANTS[2]: lambda ids: medusa_generate(lm.cfg, lm.mcfg, with_p, [ids], st),
    }
    for f in fns.values():  # compile (and warm) on the first prompt
        f(prompts[0])
    runs = []
    for r in range(a.rounds):
        for j, ids in enumerate(prompts):
            cell = {"prompt": names[j], "round": r}
            for v in C.rotated(list(VARIANTS), r * len(prompts) + j):
                res, t = timer.run(lambda v=v, ids=ids: fns[v](ids))
                cell[v] = {"decode_s": t["decode_s"], "tokens": res["tokens"][0],
                           "steps": int(res["steps"][0]) if "mean_accepted" in res else None}
            runs.append(cell)
            print(f"round {r + 1}/{a.rounds} prompt {j + 1}/{len(prompts)}", file=sys.stderr,
                  flush=True)

    van = VARIANTS[0]
    rows, same = [], all(c[v]["tokens"] == c[van]["tokens"] for c in runs for v in VARIANTS)
    for v in VARIANTS:
        toks = sum(len(c[v]["tokens"]) for c in runs)
        dec = sum(c[v]["decode_s"] for c in runs)
        row = {"variant": v, "tokens": toks, "decode_s": dec, "tok_s": toks / dec}
        if v != van:
            steps = sum(c[v]["steps"] for c in runs)
            per_run = [len(c[v]["tokens"]) / c[v]["decode_s"]
                       / (len(c[van]["tokens"]) / c[van]["decode_s"]) for c in runs]
            van_step = sum(c[van]["decode_s"] for c in runs) / sum(
                max(len(c[van]["tokens"]) - 1, 1) for c in runs)  # the first token is prefill's
            row.update(accepted=toks / steps, speedup=row["tok_s"] / rows[0]["tok_s"],
                       per_run=C.ratio_stats(per_run),
                       step_in_plain_steps=(dec / steps) / van_step)
        rows.append(row)
    table = C.md_table(
        ["variant", "tokens", "decode tok/s", "accepted / step", "speedup vs vanilla (pooled)",
         "per-run speedup median [min, max]", "Medusa step / vanilla step"],
        [[r["variant"], r["tokens"], f"{r['tok_s']:.1f}",
          f"{r['accepted']:.2f}" if "accepted" in r else "-",
          f"{r['speedup']:.3f}x" if "speedup" in r else "-",
          (f"{r['per_run']['median']:.3f} [{r['per_run']['min']:.3f}, {r['per_run']['max']:.3f}]"
           if "per_run" in r else "-"),
          f"{r['step_in_plain_steps']:.3f}" if "step_in_plain_steps" in r else "-"]
         for r in rows])
    gain = rows[1]["decode_s"] / rows[2]["decode_s"]
    # noise on a shared machine only ever adds time: per prompt, the fastest round of each
    best = {v: {n: min(c[v]["decode_s"] for c in runs if c["prompt"] == n) for n in names}
            for v in VARIANTS}
    best_gain = C.ratio_stats([best[VARIANTS[1]][n] / best[VARIANTS[2]][n] for n in names])
    paired = C.ratio_stats([c[VARIANTS[1]]["decode_s"] / c[VARIANTS[2]]["decode_s"] for c in runs])
    md = f"""# The decode loop's precomputed projections, side by side

Command: `{C.command_line()}`

{C.machine_md(info)}

## Setup
- Default model (SmolLM2-135M-Instruct, float32, scanned layers, tied embeddings) and its
  shipped heads ({lm.mcfg.head_type}, draft vocabulary {len(lm.mcfg.draft_ids or ())}), CPU tree
  `{tree}`; greedy, batch 1, up to {a.max_new_tokens} new tokens, EOS stops.
- Prompts: the `scripts/run.sh` prompt and {len(qs)} MT-bench first turns
  ({", ".join(names[1:]) or "none"}), chat template; {a.rounds} round(s); per prompt the three
  variants in a rotating order. Decode-loop time only (prefill apart, compile excluded).
- "as given": `medusa_generate(..., projections=False)`, the loop of before this change.
  "projections": the tied embedding transposed once to `[D, V]` for the verification rows and the
  heads' draft columns gathered once (`with_decode_projections`), the default now.

## Results

{table}

Medusa with the projections against Medusa on the parameters as given (the same steps:
identical tokens and acceptance): pooled {gain:.3f}x; per run (paired) median {paired['median']:.3f}
[{paired['min']:.3f}, {paired['max']:.3f}]; fastest round per prompt, median over prompts
{best_gain['median']:.3f} [{best_gain['min']:.3f}, {best_gain['max']:.3f}]. All outputs identical to vanilla greedy:
{"yes" if same else "NO"}.
"""
    C.write_results(a.out, md, {"machine": info, "rows": rows, "tree": tree, "runs": runs,
                                "same_tokens": same, "projection_gain": gain,
                                "projection_gain_paired": paired, "projection_gain_best": best_gain})
    print(table)
    print(f"projections vs as given: pooled {gain:.3f}x, paired median {paired['median']:.3f}, "
          f"best-round median {best_gain['median']:.3f}; outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
