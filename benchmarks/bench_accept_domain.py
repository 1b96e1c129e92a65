"""Where the heads' acceptance comes from: ShareGPT prompts they trained on, held-out ShareGPT
prompts, and MT-bench, measured side by side with the same heads, tree and settings.

Why: the heads' held-out accuracy predicts more accepted tokens than MT-bench gives. This splits
the gap into memorisation (trained-on vs held-out ShareGPT: same distribution, answers seen or
not) and domain shift (held-out ShareGPT vs MT-bench).

The ShareGPT prompts are the first user turns of the conversations the distiller selects with the
heads' card settings (``--max-prompt-tokens``, default 256), in source order; of the first
``--trained-on`` of them (the heads' data file, 1363 records for the shipped heads) the held-out
side is the trainer's hash split (``data.eval_fraction``, default 0.05) and the rest were trained
on. Each set takes its first ``--prompts`` prompts. Every prompt is decoded greedily by the Medusa
loop (batch 1, float32); the sets are interleaved prompt by prompt. Accepted per step = generated
tokens / verification steps, pooled per set, and the per-prompt mean.

    python benchmarks/bench_accept_domain.py                       # 20 prompts per set
    python benchmarks/bench_accept_domain.py --prompts 2 --max-new-tokens 16 --out /tmp/ad/test
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import _common as C
import numpy as np

SETS = ("sharegpt_trained_on", "sharegpt_held_out", "mtbench")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", type=int, default=20, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--heads", default=None, help="Medusa heads (default: the shipped ones)")
    p.add_argument("--trained-on", type=int, default=1363,
                   help="how many selected conversations the heads' data file held")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="the distiller's prompt limit the heads' data was made with")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="the trainer's held-out fraction (data.eval_fraction)")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "accept_domain"),
                   help="output prefix: PREFIX.md, PREFIX.json")
    a = p.parse_args(argv)
    if a.prompts < 1 or a.max_new_tokens < 1 or a.trained_on < 2 or not 0 < a.eval_fraction < 1:
        p.error("need --prompts >= 1, --max-new-tokens >= 1, --trained-on >= 2, "
                "0 < --eval-fraction < 1")
    if a.prompts > 80:
        p.error("--prompts: MT-bench has 80 first turns")
    a.out = a.out[:-3] if a.out.endswith(".md") else a.out
    return a


def sharegpt_sets(dist, args) -> dict[str, list[list[dict]]]:
    """First-turn chats (messages) of the trained-on and held-out ShareGPT conversations."""
    from medusa_jax.training.data.sources import DataReport
    from medusa_jax.training.prepare import held_out_mask, split_key

    convs = dist._select(None, DataReport(source=""), collections.Counter(), args.trained_on, 1,
                         args.max_prompt_tokens)
    if len(convs) < args.trained_on:
        raise SystemExit(f"ShareGPT gave {len(convs)} usable conversations, not {args.trained_on}")
    held = held_out_mask([split_key([], c.id) for c in convs], args.eval_fraction)
    sets = {"sharegpt_trained_on": [c.messages(0) for c, h in zip(convs, held) if not h],
            "sharegpt_held_out": [c.messages(0) for c, h in zip(convs, held) if h]}
    for k, v in sets.items():
        if len(v) < args.prompts:
            raise SystemExit(f"{k}: only {len(v)} conversations, fewer than --prompts")
    return {k: v[:args.prompts] for k, v in sets.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    info = C.machine_info()

    import jax
    from tqdm import tqdm

    import medusa_jax.tokenizer as mtok
    from medusa_jax.api import default_heads_path, default_tree
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.training.distill import Distiller
    from medusa_jax.tree import get_tree
    from medusa_jax.weights.medusa_io import load_heads, read_heads_metadata

    heads = args.heads or default_heads_path()
    if heads is None:
        log("error: no heads are shipped for the default model: pass --heads PATH")
        return 2
    model_path = mtok.resolve_model_path(None)
    tok = mtok.load_tokenizer(model_path)
    cfg, base, eos, pad = C.load_fp32_base(model_path, tok)
    mcfg, mp = load_heads(heads, base_cfg=cfg)
    trees = read_heads_metadata(heads).get("trees") or {}
    spec = default_tree(mcfg, trees)
    choices = get_tree(spec)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                             pad_token_id=pad)
    st = make_settings(choices, mcfg.num_heads, gen, acceptance="greedy")
    params = {"base": base, "medusa": jax.device_put(mp)}

    dist = Distiller(cfg, base, tok)
    chats = sharegpt_sets(dist, args)
    chats["mtbench"] = [[{"role": "user", "content": q["text"]}]
                        for q in C.mtbench_questions(args.prompts)]
    log(f"heads {heads} ({mcfg.head_type}); tree {choices}; {args.prompts} prompts per set")

    medusa_generate(cfg, mcfg, params, [mtok.apply_chat_template(tok, chats["mtbench"][0])], st)
    runs: dict[str, list[dict]] = {k: [] for k in SETS}
    bar = tqdm(total=len(SETS) * args.prompts, desc="prompts", unit="prompt", file=sys.stderr)
    for i in range(args.prompts):
        for name in C.rotated(SETS, i):
            ids = mtok.apply_chat_template(tok, chats[name][i])
            res = medusa_generate(cfg, mcfg, params, [ids], st)
            runs[name].append({"prompt_tokens": len(ids), "tokens": len(res["tokens"][0]),
                               "steps": int(res["steps"][0])})
            bar.update()
    bar.close()
    info["load_average_at_end"] = C.load_average()

    summary = {}
    for name, rs in runs.items():
        per = [r["tokens"] / r["steps"] for r in rs if r["steps"]]
        summary[name] = {"prompts": len(rs), "tokens": sum(r["tokens"] for r in rs),
                         "steps": sum(r["steps"] for r in rs),
                         "accepted_pooled": sum(r["tokens"] for r in rs) / max(1, sum(r["steps"] for r in rs)),
                         "accepted_per_prompt_mean": float(np.mean(per)) if per else None,
                         "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in rs]))}
    rows = [(n, s["prompts"], s["tokens"], s["steps"], f"{s['accepted_pooled']:.2f}",
             f"{s['accepted_per_prompt_mean']:.2f}", f"{s['mean_prompt_tokens']:.0f}")
            for n, s in summary.items()]
    md = f"""# Acceptance by prompt source: trained-on vs held-out ShareGPT vs MT-bench

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}

## Setup
- Heads: `{heads}` ({mcfg.head_type}, {mcfg.num_heads} heads); tree {choices} (the heads' tree
  for this backend); greedy, batch 1, float32, max_new_tokens = {args.max_new_tokens}.
- ShareGPT: first user turns of the first {args.trained_on} conversations the distiller selects
  (prompts <= {args.max_prompt_tokens} tokens), split by the trainer's hash rule at
  eval_fraction = {args.eval_fraction}; MT-bench: first turns of the first {args.prompts}
  questions. {args.prompts} prompts per set, interleaved prompt by prompt.

## Result
{C.md_table(["set", "prompts", "tokens", "steps", "accepted/step (pooled)",
             "accepted/step (per-prompt mean)", "prompt tokens (mean)"], rows)}
"""
    C.write_results(args.out + ".md", md, {"machine": info, "args": vars(args),
                                            "summary": summary, "runs": runs})
    print(md.split("## Result", 1)[1].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
