"""Choose the Medusa tree for this machine: measured step cost x predicted acceptance.

A tree of n nodes accepts more tokens per step the larger it is, but its verification forward
costs more: on a small CPU a 64-node step costs several plain steps, on a GPU about one. This
script

1. reads the heads' held-out per-rank accuracies (``eval.head_rank_acc`` in their metadata,
   written by ``train.py medusa1``) and builds, for every size n, the n-node tree of highest
   expected acceptance under the independence model (``tree.best_nodes_tree``), with its
   predicted accepted length (``tree.expected_accept_length``);
2. decodes a few MT-bench first turns (one per category, greedy, batch 1) with vanilla and with
   every tree, interleaved (the order rotates per prompt), and measures each tree's step time
   relative to a vanilla step (compile excluded, prefill apart) and its real accepted length;
3. picks the size with the highest *predicted* speedup, ``predicted accepted length / measured
   step ratio``, and reports predicted next to measured speedups for every size.

``--write-heads`` stores the choice in the heads' metadata (``trees: {"cpu": ..., "gpu": ...}``;
the GPU entry is the 63-node tree of the same construction, mc_sim_7b_63-style), which makes it
the default for ``decode.py`` with those heads on that backend.

    python benchmarks/choose_tree.py --heads medusa_jax/assets/heads/smollm2-135m-instruct \\
        --write-heads
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import _common as C
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heads", required=True, help="trained heads (our format, with eval metadata)")
    p.add_argument("--sizes", default="1,2,3,4,5,6,8,12,16,24,32",
                   help="tree sizes in nodes besides the root")
    p.add_argument("--num-prompts", type=int, default=8,
                   help="MT-bench first turns, spread over the categories")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--topk", type=int, default=10, help="ranks per head the trees may use")
    p.add_argument("--accuracy", choices=("conditional", "marginal"), default="conditional",
                   help="per-rank accuracies the trees are built from: head k's given that the "
                   "heads before it were right (eval.head_cond_rank_acc, when stored) or over "
                   "all positions (eval.head_rank_acc)")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "tree_choice.md"))
    p.add_argument("--write-heads", action="store_true",
                   help="store the chosen trees in the heads' medusa_config.json metadata")
    a = p.parse_args(argv)
    a.sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    return a


def spread_prompts(n: int) -> list[dict]:
    """``n`` MT-bench questions taking the categories in turn (first question of each first)."""
    qs = C.mtbench_questions(80)
    by_cat: dict[str, list] = {}
    for q in qs:
        by_cat.setdefault(q["category"], []).append(q)
    out, i = [], 0
    while len(out) < n:
        for cat in by_cat.values():
            if i < len(cat) and len(out) < n:
                out.append(cat[i])
        i += 1
    return out


def plot(path: str, rows: list[dict], chosen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["nodes"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(n, [r["step_ratio"] for r in rows], "o-", label="step time / vanilla step")
    ax[0].plot(n, [r["pred_accept"] for r in rows], "s--", label="accepted / step (predicted)")
    ax[0].plot(n, [r["accept"] for r in rows], "^-", label="accepted / step (measured)")
    ax[0].set_xlabel("tree nodes (without the root)")
    ax[0].set_xscale("log", base=2)
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    ax[1].plot(n, [r["pred_speedup"] for r in rows], "s--", label="predicted")
    ax[1].plot(n, [r["speedup"] for r in rows], "o-", label="measured")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].axvline(chosen, color="tab:red", lw=0.8, ls=":", label=f"chosen: {chosen} nodes")
    ax[1].set_xlabel("tree nodes (without the root)")
    ax[1].set_xscale("log", base=2)
    ax[1].set_ylabel("decode tokens/s, Medusa / vanilla")
    ax[1].legend(fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.suptitle("Tree size on this machine (SmolLM2-135M-Instruct, batch 1, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.model.llama import convert_layout
    from medusa_jax.tokenizer import encode_prompt, eos_token_ids, load_tokenizer
    from medusa_jax.tree import best_nodes_tree, expected_accept_length
    from medusa_jax.weights import load_base_model
    from medusa_jax.weights.medusa_io import OURS_CONFIG, load_heads, read_heads_metadata

    info = C.machine_info()
    meta = read_heads_metadata(args.heads)
    ev = meta.get("eval") or {}
    key = "head_rank_acc"
    if args.accuracy == "conditional" and ev.get("head_cond_rank_acc"):
        key = "head_cond_rank_acc"
    acc = np.asarray(ev.get(key) or [])
    if acc.ndim != 2:
        raise SystemExit(f"{args.heads}: no eval.head_rank_acc in the metadata (train the heads "
                         "with train.py medusa1 so the held-out evaluation is stored)")
    acc = acc[:, : args.topk]
    cfg, base = load_base_model(None)
    tok = load_tokenizer(None)
    mcfg, heads = load_heads(args.heads, base_cfg=cfg)
    params = {"base": convert_layout(base, cfg), "medusa": heads}
    eos = eos_token_ids(tok, cfg.eos_token_ids)
    gen = GenerationSettings(args.max_new_tokens, eos_token_ids=eos)
    qs = spread_prompts(args.num_prompts)
    prompts = [encode_prompt(tok, q["text"]) for q in qs]

    trees = {n: best_nodes_tree(acc, n) for n in args.sizes}
    variants = ["vanilla", *args.sizes]
    settings = {n: make_settings(t, mcfg.num_heads, gen) for n, t in trees.items()}
    timer = C.JaxTimer()

    def run(v, ids):
        if v == "vanilla":
            return timer.run(lambda: generate(cfg, params["base"], [ids], gen))
        return timer.run(lambda: medusa_generate(cfg, mcfg, params, [ids], settings[v]))

    for v in variants:  # compile every loop before timing
        run(v, prompts[0])
    tot = {v: {"decode_s": 0.0, "tokens": 0, "steps": 0} for v in variants}
    outs = {v: [] for v in variants}
    for i, ids in enumerate(prompts):
        for v in C.rotated(variants, i):
            res, t = run(v, ids)
            toks = res["tokens"][0]
            # vanilla: the first token comes from the prefill, every other one from a step
            steps = len(toks) - 1 if v == "vanilla" else int(res["steps"][0])
            tot[v]["decode_s"] += t["decode_s"]
            tot[v]["tokens"] += len(toks) - (1 if v == "vanilla" else 0)
            tot[v]["steps"] += steps
            outs[v].append(toks)
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)

    mismatches = {n: sum(a != b for a, b in zip(outs[n], outs["vanilla"])) for n in args.sizes}
    van = tot["vanilla"]
    van_step = van["decode_s"] / max(van["steps"], 1)
    van_tps = van["tokens"] / van["decode_s"]
    rows = []
    for n in args.sizes:
        r = tot[n]
        step = r["decode_s"] / max(r["steps"], 1)
        pred = expected_accept_length(trees[n], acc)
        ratio = step / van_step
        rows.append({
            "nodes": n, "depth": max(len(p) for p in trees[n]), "step_ms": 1e3 * step,
            "step_ratio": ratio, "pred_accept": pred, "accept": r["tokens"] / max(r["steps"], 1),
            "pred_speedup": pred / ratio, "speedup": (r["tokens"] / r["decode_s"]) / van_tps,
            "mismatches": mismatches[n], "tree": trees[n],
        })
    best = max(rows, key=lambda r: r["pred_speedup"])
    gpu_tree = best_nodes_tree(acc, min(63, sum(acc.shape[1] ** d
                                                for d in range(1, acc.shape[0] + 1))))

    table = C.md_table(
        ["nodes", "depth", "step ms", "step / vanilla step", "accepted (predicted)",
         "accepted (measured)", "speedup (predicted)", "speedup (measured)", "tokens != vanilla"],
        [[r["nodes"], r["depth"], r["step_ms"], r["step_ratio"], r["pred_accept"], r["accept"],
          r["pred_speedup"], r["speedup"], f"{r['mismatches']}/{len(prompts)}"] for r in rows])
    png = os.path.splitext(args.out)[0] + ".png"
    hydra_note = ("; a node's rank is its rank among its parent's candidates, drafted depth by "
                  "depth" if mcfg.is_hydra else "")
    cond_note = (": head k's accuracy given that heads 1 .. k-1 were right at the position"
                 if key == "head_cond_rank_acc" else ": over all held-out positions")
    md = f"""# Choosing the tree for this machine

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}

## Method
- Heads: `{os.path.relpath(args.heads, C.REPO)}` ({mcfg.head_type} heads: {mcfg.num_heads} x
  {mcfg.num_layers} ResBlock, draft vocabulary {mcfg.draft_size} tokens{hydra_note}). Held-out
  per-rank accuracies (`eval.{key}`, top {acc.shape[1]} ranks{cond_note}) -> for each size n
  the n-node tree of highest expected acceptance (`best_nodes_tree`) and its predicted accepted
  length (`expected_accept_length`: a node's probability is the product of its ranks'
  accuracies along its path).
- Measured: {len(prompts)} MT-bench first turns (categories in turn), greedy, batch 1,
  max_new_tokens {args.max_new_tokens}; vanilla and every tree interleaved per prompt (order
  rotating); step time = decode-loop seconds / steps (compile excluded, prefill apart); vanilla
  step = one token. speedup (predicted) = predicted accepted / measured step ratio; speedup
  (measured) = decode tokens/s of the tree / of vanilla.
- Vanilla: {1e3 * van_step:.1f} ms per step, {van_tps:.1f} tokens/s (decode loop).

## Results

{table}

Chosen for this machine: **{best['nodes']} nodes** (predicted {best['pred_speedup']:.2f}x,
measured {best['speedup']:.2f}x): `{json.dumps(best['tree'])}`.
For accelerators (where a 64-node verification costs about one plain step) the same
construction gives a 63-node tree, stored as the heads' GPU tree.

![tree size](./{os.path.basename(png)})
"""
    C.write_results(args.out, md, {"machine": info, "rows": rows, "chosen": best,
                                   "gpu_tree": gpu_tree, "vanilla_step_ms": 1e3 * van_step,
                                   "accuracies": acc.tolist(), "accuracy_key": key,
                                   "head_type": mcfg.head_type, "prompts": [q["question_id"] for q in qs]})
    plot(png, rows, best["nodes"])
    print(table)
    print(f"chosen: {best['nodes']} nodes, predicted {best['pred_speedup']:.2f}x, "
          f"measured {best['speedup']:.2f}x")
    if args.write_heads:
        path = os.path.join(args.heads, OURS_CONFIG)
        with open(path) as f:
            d = json.load(f)
        d.setdefault("metadata", {})["trees"] = {
            "cpu": best["tree"], "gpu": gpu_tree,
            "chosen_by": "benchmarks/choose_tree.py (" + os.path.relpath(args.out, C.REPO) + ")"}
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps(d, indent=2) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote the trees into {path}")
    return 1 if any(r["mismatches"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
