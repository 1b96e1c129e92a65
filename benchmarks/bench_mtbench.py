"""MT-bench: Medusa tree decoding against our vanilla loop (and transformers ``generate``).

What it measures, on the default model (SmolLM2-135M-Instruct, float32, scanned layers), batch 1,
greedy: for each of the 80 MT-bench questions, turn 1 (the first user message through the chat
template) and turn 2 (user 1, the model's own turn-1 answer = vanilla's tokens decoded, EOS
stripped, then user 2). Every prompt runs our vanilla loop and our Medusa loop (heads + tree,
greedy acceptance), the order alternating from prompt to prompt; on the first
``--torch-questions`` questions transformers' PyTorch ``generate`` (same weights, 1 thread) joins
the rotation. Our runs are timed with ``_common.JaxTimer`` (compile excluded, prefill and decode
loop split); one warm-up run per variant comes first.

Reported: mean accepted length (tokens / Medusa steps) overall, per category and per turn; the
histogram of accepted lengths; per-head acceptance; tokens/s of the decode loop and end to end;
Medusa/vanilla speedups (ratio of totals and median of per-prompt paired ratios); Medusa/torch
on the torch subset; prompts whose greedy tokens differ from vanilla's (Medusa must match: exit
status 1 otherwise). Writes PREFIX.md, PREFIX.json and PREFIX_accept_hist.png.

    python benchmarks/bench_mtbench.py                   # 80 questions x 2 turns x 128 tokens
    python benchmarks/bench_mtbench.py --heads fresh --tree my_tree.json --questions 2 \\
        --max-new-tokens 16 --torch-questions 1 --out /tmp/mtb/test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--questions", type=int, default=80, help="first N MT-bench questions")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--heads", default=None,
                   help="Medusa heads (any layout load_heads reads), or 'fresh' (4 fresh heads); "
                        "default: the heads shipped for the default model")
    p.add_argument("--tree", default=None,
                   help="predefined tree name or JSON file, or heads:cpu / heads:gpu (the tree "
                        "stored with the heads for that backend, e.g. the accelerator tree on a "
                        "fixed subset of questions here); default: the tree shipped with the "
                        "heads for this backend (metadata 'trees'), else api.default_tree")
    p.add_argument("--torch-questions", type=int, default=10,
                   help="also run transformers generate (1 thread) on the first K questions "
                        "(both turns); 0: off")
    p.add_argument("--model", default=None,
                   help=".gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "mtbench"),
                   help="output prefix: PREFIX.md, PREFIX.json, PREFIX_accept_hist.png")
    a = p.parse_args(argv)
    if not 1 <= a.questions <= 80 or a.max_new_tokens < 1 or a.torch_questions < 0:
        p.error("need 1 <= --questions <= 80, --max-new-tokens >= 1, --torch-questions >= 0")
    a.torch_questions = min(a.torch_questions, a.questions)
    a.out = a.out[:-3] if a.out.endswith(".md") else a.out
    return a


def heads_metadata(path: str) -> dict:
    """The metadata stored with the heads at ``path`` ({} for 'fresh' or another format)."""
    from medusa_jax.weights.medusa_io import CheckpointError, read_heads_metadata

    if path == "fresh":
        return {}
    try:
        return read_heads_metadata(path)
    except CheckpointError:
        return {}  # not our format: no metadata


def stored_trees(meta: dict) -> dict:
    return meta.get("trees") if isinstance(meta.get("trees"), dict) else {}


def explicit_tree(args, path: str, meta: dict):
    """The tree ``--tree`` names, as (name, paths), resolved before any weights load; None when
    ``--tree`` is not given (the default depends on the heads' config). A tree that cannot be had
    raises MedusaError naming it."""
    from medusa_jax.errors import MedusaError
    from medusa_jax.tree import get_tree

    if not args.tree:
        return None
    if args.tree.startswith("heads:"):
        backend, trees = args.tree.split(":", 1)[1], stored_trees(meta)
        if not isinstance(trees.get(backend), list):
            raise MedusaError(f"--tree {args.tree}: the heads ({path}) store no {backend!r} tree "
                              f"(they store: {', '.join(k for k, v in trees.items() if isinstance(v, list)) or 'none'})")
        return f"the heads' {backend} tree", get_tree(trees[backend])
    return os.path.basename(args.tree), get_tree(args.tree)


def heads_and_tree_args(args, instead: str):
    """``(heads path, their metadata, explicit_tree's tree)`` from ``--heads`` and ``--tree``,
    resolved before any weights load. No heads shipped for the default model (``instead``: what
    to pass) or a tree that cannot be had raises MedusaError naming it."""
    from medusa_jax.api import default_heads_path
    from medusa_jax.errors import MedusaError

    if args.heads is None and default_heads_path() is None:
        raise MedusaError(f"no Medusa heads are shipped for the default model: pass {instead}")
    path = args.heads or default_heads_path()
    meta = heads_metadata(path)
    return path, meta, explicit_tree(args, path, meta)


def load_heads_and_tree(args, cfg, path: str, meta: dict, tree):
    """(mcfg, head params, description, tree name, tree paths); ``tree``: explicit_tree's."""
    from medusa_jax.api import default_tree
    from medusa_jax.config import MedusaConfig
    from medusa_jax.model.heads import init_medusa_params
    from medusa_jax.tree import get_tree
    from medusa_jax.weights.medusa_io import load_heads

    if path == "fresh":
        mcfg = MedusaConfig.for_model(cfg, num_heads=4)
        mp, desc = init_medusa_params(mcfg), "fresh (`init_medusa_params`, zero ResBlocks)"
    else:
        mcfg, mp = load_heads(path, base_cfg=cfg)
        desc = f"`{path}`"
    desc += (f": {mcfg.num_heads} heads x {mcfg.num_layers} ResBlock(s), "
             f"{'shared' if mcfg.shared_lm_head else 'own'} LM head, draft vocabulary "
             f"{mcfg.draft_size} tokens, {mcfg.param_dtype}")
    if tree is not None:
        name, choices = tree
    else:  # MedusaLM's own rule: the heads' tree for this backend, else the generic default
        trees = stored_trees(meta)
        spec = default_tree(mcfg, trees)
        name = "shipped with the heads" if trees.get("cpu") else "api.default_tree"
        name += f" ({spec})" if isinstance(spec, str) else ""
        choices = get_tree(spec)
    return mcfg, mp, desc, name, choices


def totals(runs: list[dict]) -> dict:
    """One variant's totals over some runs: tokens, seconds, tokens/s (decode and end to end)."""
    tok = sum(len(r["tokens"]) for r in runs)
    out = {"prompts": len(runs), "tokens": tok, "total_s": sum(r["total_s"] for r in runs)}
    out["tokens_per_s"] = tok / out["total_s"]
    if "decode_s" in runs[0]:
        for k in ("prefill_s", "decode_s", "compile_s"):
            out[k] = sum(r[k] for r in runs)
        out["decode_tokens_per_s"] = tok / out["decode_s"]
    return out


def speedup(recs: list[dict], num: str, den: str, key: str) -> dict:
    """Speed of variant ``num`` over ``den`` by the ``key`` seconds: ratio of the totals' tokens/s
    and per-prompt paired ratios (seconds per token of ``den`` / of ``num``)."""
    tps = lambda n: sum(len(r[n]["tokens"]) for r in recs) / sum(r[n][key] for r in recs)
    per = [(r[den][key] / len(r[den]["tokens"])) / (r[num][key] / len(r[num]["tokens"]))
           for r in recs]
    return {"ratio_of_totals": tps(num) / tps(den), "per_prompt": C.ratio_stats(per)}


def accepted(recs: list[dict]) -> float:
    """Mean accepted length: Medusa's generated tokens / its steps."""
    return (sum(len(r["medusa"]["tokens"]) for r in recs)
            / max(sum(r["medusa"]["steps"] for r in recs), 1))


def summarize(records: list[dict]) -> dict:
    steps = sum(r["medusa"]["steps"] for r in records)
    hist = np.sum([r["medusa"]["accept_hist"] for r in records], axis=0)
    head = np.sum([r["medusa"]["head_accept"] for r in records], axis=0)
    s = {n: totals([r[n] for r in records]) for n in ("vanilla", "medusa")}
    s |= {"mean_accepted": accepted(records), "medusa_steps": steps,
          "accept_hist": {"counts": hist.tolist(), "fractions": (hist / max(hist.sum(), 1)).tolist()},
          "head_accept_rate": (head / max(steps, 1)).tolist(),
          "speedup_decode": speedup(records, "medusa", "vanilla", "decode_s"),
          "speedup_end_to_end": speedup(records, "medusa", "vanilla", "total_s"),
          "medusa_differs_from_vanilla": [r["id"] for r in records
                                          if r["medusa_divergence"] is not None]}
    groups = {f"turn {t}": [r for r in records if r["turn"] == t] for t in (1, 2)}
    for r in records:
        groups.setdefault(r["category"], []).append(r)
    s["groups"] = {g: {"prompts": len(rs), "tokens": sum(len(r["medusa"]["tokens"]) for r in rs),
                       "steps": sum(r["medusa"]["steps"] for r in rs), "mean_accepted":
                       accepted(rs), "speedup_decode": speedup(rs, "medusa", "vanilla", "decode_s"),
                       "speedup_end_to_end": speedup(rs, "medusa", "vanilla", "total_s")}
                   for g, rs in groups.items() if rs}
    trecs = [r for r in records if "torch" in r]
    if trecs:
        s["torch_subset"] = {n: totals([r[n] for r in trecs]) for n in ("vanilla", "medusa", "torch")}
        s["torch_subset"] |= {f"{n}_over_torch": speedup(trecs, n, "torch", "total_s")
                              for n in ("medusa", "vanilla")}
        s["torch_differs_from_vanilla"] = {r["id"]: r["torch_divergence"] for r in trecs
                                           if r["torch_divergence"] is not None}
    return s


def plot(path: str, s: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    counts = s["accept_hist"]["counts"][1:]  # index 0 (no token accepted) never happens
    lens = np.arange(1, len(counts) + 1)
    frac = s["accept_hist"]["fractions"][1:]
    a1.bar(lens, frac, color="tab:blue")
    for x, f, n in zip(lens, frac, counts):
        a1.text(x, f, str(n), ha="center", va="bottom", fontsize=8)
    a1.set(xlabel="tokens accepted in a step (root included)", ylabel="fraction of steps",
           title="accepted length per Medusa step", xticks=lens)
    cats = [g for g in s["groups"] if not g.startswith("turn ")]
    a2.bar(range(len(cats)), [s["groups"][c]["mean_accepted"] for c in cats], color="tab:orange")
    a2.axhline(s["mean_accepted"], color="k", ls="--", lw=1,
               label=f"all prompts: {s['mean_accepted']:.2f}")
    a2.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    a2.set(ylabel="mean accepted tokens / step", title="per MT-bench category")
    a2.legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, info, setup: dict, warm: dict, records: list[dict], s: dict) -> str:
    f3 = lambda x: round(x, 3)
    pp = lambda d: f"{d['per_prompt']['median']:.3f} [{d['per_prompt']['min']:.3f}, {d['per_prompt']['max']:.3f}]"
    speed = C.md_table(
        ["variant", "prompts", "tokens", "decode s", "decode tok/s", "prefill+decode s",
         "end-to-end tok/s", "compile s (warm-up)", "compile s (new prompt lengths)"],
        [[n, v["prompts"], v["tokens"], round(v["decode_s"], 2), round(v["decode_tokens_per_s"], 2),
          round(v["total_s"], 2), round(v["tokens_per_s"], 2), round(warm[n]["compile_s"], 1),
          round(v["compile_s"], 1)] for n, v in ((n, s[n]) for n in ("vanilla", "medusa"))])
    sd, se = s["speedup_decode"], s["speedup_end_to_end"]
    groups = C.md_table(
        ["prompts", "n", "tokens", "Medusa steps", "mean accepted", "speedup decode (totals)",
         "speedup decode (median per prompt)", "speedup end-to-end (totals)"],
        [["all", len(records), s["medusa"]["tokens"], s["medusa_steps"], f3(s["mean_accepted"]),
          f3(sd["ratio_of_totals"]), f3(sd["per_prompt"]["median"]), f3(se["ratio_of_totals"])]]
        + [[g, v["prompts"], v["tokens"], v["steps"], f3(v["mean_accepted"]),
            f3(v["speedup_decode"]["ratio_of_totals"]),
            f3(v["speedup_decode"]["per_prompt"]["median"]),
            f3(v["speedup_end_to_end"]["ratio_of_totals"])] for g, v in s["groups"].items()])
    h = s["accept_hist"]
    hist = C.md_table(["tokens accepted per step", *map(str, range(1, len(h["counts"])))],
                      [["steps", *h["counts"][1:]], ["fraction", *map(f3, h["fractions"][1:])]])
    heads = C.md_table(["head", *map(str, range(1, len(s["head_accept_rate"]) + 1))],
                       [["accepted in fraction of steps", *map(f3, s["head_accept_rate"])]])
    differ = s["medusa_differs_from_vanilla"]
    torch_md = ""
    if "torch_subset" in s:
        ts, tdiff = s["torch_subset"], s["torch_differs_from_vanilla"]
        tt = C.md_table(["variant", "prompts", "tokens", "prefill+decode s", "end-to-end tok/s"],
                        [[n, ts[n]["prompts"], ts[n]["tokens"], round(ts[n]["total_s"], 2),
                          round(ts[n]["tokens_per_s"], 2)] for n in ("vanilla", "medusa", "torch")])
        divs = ", ".join(f"{k} (first divergence at token {d})" for k, d in tdiff.items())
        torch_md = f"""
### Against transformers `generate` (first {args.torch_questions} questions, both turns)

{tt}

Medusa / torch (end to end): {ts['medusa_over_torch']['ratio_of_totals']:.3f}x (ratio of totals),
per prompt {pp(ts['medusa_over_torch'])}; vanilla / torch:
{ts['vanilla_over_torch']['ratio_of_totals']:.3f}x, per prompt {pp(ts['vanilla_over_torch'])}.
Torch's tokens differ from vanilla's on {len(tdiff)}/{ts['torch']['prompts']} prompts{': ' + divs
if divs else ''} (float32 sums in another order can flip a near-tie; not a Medusa issue).
"""
    dv = lambda d: "=" if d is None else d
    per = C.md_table(
        ["q.turn", "category", "prompt tokens", "tokens", "Medusa steps", "accepted/step",
         "vanilla decode / total s", "Medusa decode / total s", "Medusa = vanilla",
         "torch total s", "torch = vanilla"],
        [[r["id"], r["category"], r["prompt_tokens"], len(r["vanilla"]["tokens"]),
          r["medusa"]["steps"], round(accepted([r]), 2),
          f"{r['vanilla']['decode_s']:.2f} / {r['vanilla']['total_s']:.2f}",
          f"{r['medusa']['decode_s']:.2f} / {r['medusa']['total_s']:.2f}",
          dv(r["medusa_divergence"])]
         + ([f"{r['torch']['total_s']:.2f}", dv(r["torch_divergence"])] if "torch" in r
            else ["-", "-"]) for r in records])
    tree = setup["tree"]
    paths = f" (paths {tree['choices']})" if tree["nodes"] <= 16 else ""
    return f"""# MT-bench: Medusa decoding vs vanilla (SmolLM2-135M-Instruct, CPU)

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}
- JAX/XLA with its default CPU thread pool; PyTorch with 1 thread. The machine is shared, so
  absolute times move from run to run; ratios of variants run side by side are what count.

## Setup
- Model: `{os.path.basename(setup['model'])}`, float32, scanned layers; batch 1; greedy;
  max_new_tokens = {args.max_new_tokens}; stop at EOS {setup['eos_token_ids']} (counted as a token).
- Heads: {setup['heads']['description']}. Metadata: {setup['heads']['metadata'] or 'none'}.
- Tree: {tree['name']}, {tree['nodes']} nodes with the root, depth {tree['depth']}, top-k
  {tree['topk']}{paths}; greedy acceptance.
- Prompts: the first {args.questions} MT-bench questions, 2 turns each ({len(records)} prompts).
  Turn 2 = [user turn 1, assistant = vanilla's turn-1 answer (EOS stripped), user turn 2],
  through the chat template.
- Interleaving: per prompt every variant runs once, the order rotating from prompt to prompt;
  one warm-up run per variant first. Our times exclude compile (a new prompt-length bucket
  compiles during the timed runs: reported apart); "decode" = the jitted loop alone,
  "prefill+decode" = the whole call. Torch: the whole `generate` call.
- mean accepted = generated tokens / Medusa steps (every token comes from a step; the prefill
  makes none). Speedup = Medusa tokens/s / vanilla tokens/s; "per prompt" pairs the runs of each
  prompt (seconds per token of vanilla / of Medusa): median [min, max].

## Results

Mean accepted length **{s['mean_accepted']:.3f}** tokens per step ({s['medusa']['tokens']}
tokens, {s['medusa_steps']} steps). Medusa / vanilla: decode loop {sd['ratio_of_totals']:.3f}x
(ratio of totals), per prompt {pp(sd)}; end to end {se['ratio_of_totals']:.3f}x, per prompt
{pp(se)}.

Medusa's tokens differ from vanilla's on {len(differ)}/{len(records)} prompts
{'(' + ', '.join(differ) + ')' if differ else '(expected 0)'}.

{speed}

### Per turn and category

{groups}

### Accepted lengths

{hist}

Per head (head k's guess is accepted when a step accepts more than k + 1 tokens):

{heads}

![accepted lengths]({os.path.basename(args.out)}_accept_hist.png)
{torch_md}
### Per prompt

{per}
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    info = C.machine_info()

    import jax
    from tqdm import tqdm

    import medusa_jax.tokenizer as mtok
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.errors import MedusaError
    from medusa_jax.tree import build_tree

    try:  # heads or a tree that cannot be had are refused before the model loads
        heads_path, meta, tree = heads_and_tree_args(
            args, "--heads PATH (trained heads) or --heads fresh")
    except MedusaError as e:
        log(f"error: {e}")
        return 2
    model_path = mtok.resolve_model_path(args.model)
    tok = mtok.load_tokenizer(model_path)
    questions = C.mtbench_conversations(args.questions)
    log("loading the base model (fp32, scanned layers)")
    cfg, base, eos, pad = C.load_fp32_base(model_path, tok)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                             pad_token_id=pad)
    mcfg, mp, heads_desc, tree_name, choices = load_heads_and_tree(args, cfg, heads_path, meta,
                                                                   tree)
    st = make_settings(choices, mcfg.num_heads, gen, acceptance="greedy")
    tb = build_tree(choices)
    params = {"base": base, "medusa": jax.device_put(mp)}
    log(f"heads {heads_desc}; tree {tree_name}: {tb.num_nodes} nodes, depth {tb.depth}")

    timer = C.JaxTimer()

    def run_vanilla(ids):
        res, t = timer.run(lambda: generate(cfg, base, [ids], gen))
        return {"tokens": res["tokens"][0], **t}

    def run_medusa(ids):
        res, t = timer.run(lambda: medusa_generate(cfg, mcfg, params, [ids], st))
        return {"tokens": res["tokens"][0], "steps": int(res["steps"][0]),
                "accept_hist": np.asarray(res["accept_hist"][0]).tolist(),
                "head_accept": np.asarray(res["head_accept"][0]).tolist(), **t}

    runners = {"vanilla": run_vanilla, "medusa": run_medusa}
    if args.torch_questions:
        import torch
        from bench_decode import load_torch_model, torch_generate

        torch.set_num_threads(1)  # the fastest setting measured on this machine
        log("loading the transformers model (fp32)")
        tmodel = load_torch_model(model_path)

        def run_torch(ids):
            toks, dt = torch_generate(tmodel, ids, args.max_new_tokens, eos, pad)
            return {"tokens": toks, "total_s": dt}

        runners["torch"] = run_torch

    def prompt_ids(q, answer=None):
        msgs = [{"role": "user", "content": q["turns"][0]}]
        if answer is not None:
            msgs += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": q["turns"][1]}]
        return mtok.apply_chat_template(tok, msgs)

    warm = {}  # compile: one run per variant on the first question's turn 1
    for name, run in runners.items():
        t0 = time.perf_counter()
        r = run(prompt_ids(questions[0]))
        warm[name] = {"wall_s": time.perf_counter() - t0, "compile_s": r.get("compile_s", 0.0)}
        log(f"warm-up {name}: {warm[name]['wall_s']:.1f} s (compile {warm[name]['compile_s']:.1f})")

    records = []  # timed: per prompt every variant once, the first one rotating
    bar = tqdm(total=2 * len(questions), desc="prompts", unit="prompt", file=sys.stderr)
    for qi, q in enumerate(questions):
        answer = None
        for turn in (1, 2):
            ids = prompt_ids(q, answer)
            names = ["vanilla", "medusa"] + (["torch"] if qi < args.torch_questions else [])
            rec = {"id": f"{q['question_id']}.{turn}", "question_id": q["question_id"],
                   "category": q["category"], "turn": turn, "prompt_tokens": len(ids),
                   "order": C.rotated(names, len(records))}
            for n in rec["order"]:
                rec[n] = {k: round(v, 4) if isinstance(v, float) else v
                          for k, v in runners[n](ids).items()}
            van = rec["vanilla"]["tokens"]
            for n in ("medusa", "torch"):
                if n in rec:
                    rec[f"{n}_divergence"] = C.first_divergence(rec[n]["tokens"], van)
            if turn == 1:
                answer = tok.decode(van[:-1] if van and van[-1] in eos else van,
                                    skip_special_tokens=True)
            records.append(rec)
            bar.set_postfix_str(f"q{rec['id']} accepted {accepted([rec]):.2f}")
            bar.update()
    bar.close()
    info["load_average_at_end"] = C.load_average()

    s = summarize(records)
    setup = {"model": model_path, "eos_token_ids": list(eos),
             "heads": {"path": args.heads or "default", "description": heads_desc,
                       "metadata": meta, "draft_size": mcfg.draft_size,  # draft_ids left out
                       "config": {k: v for k, v in mcfg.to_dict().items() if k != "draft_ids"}},
             "tree": {"name": tree_name, "nodes": tb.num_nodes, "depth": tb.depth,
                      "topk": tb.topk, "choices": choices}}
    md = report(args, info, setup, warm, records, s)
    C.write_results(args.out + ".md", md, {"command": C.command_line(), "machine": info,
                                           "args": vars(args), **setup, "warmup": warm,
                                           "summary": s, "per_prompt": records})
    plot(args.out + "_accept_hist.png", s,
         f"MT-bench, {len(records)} prompts, tree {tree_name} ({tb.num_nodes} nodes)")
    log(f"wrote {args.out}.md, .json and _accept_hist.png")

    sd, se = s["speedup_decode"], s["speedup_end_to_end"]
    print(f"MT-bench, {len(records)} prompts: mean accepted {s['mean_accepted']:.3f} tokens/step, "
          f"histogram {s['accept_hist']['counts'][1:]}\n  tokens/s decode (end to end): "
          + ", ".join(f"{n} {s[n]['decode_tokens_per_s']:.2f} ({s[n]['tokens_per_s']:.2f})"
                      for n in ("vanilla", "medusa"))
          + f"\n  Medusa/vanilla: decode {sd['ratio_of_totals']:.3f}x (median per prompt "
          f"{sd['per_prompt']['median']:.3f}x), end to end {se['ratio_of_totals']:.3f}x")
    if "torch_subset" in s:
        ts = s["torch_subset"]
        print(f"  torch subset ({ts['torch']['prompts']} prompts): torch "
              f"{ts['torch']['tokens_per_s']:.2f} tok/s end to end, Medusa/torch "
              f"{ts['medusa_over_torch']['ratio_of_totals']:.3f}x, torch tokens != vanilla on "
              f"{len(s['torch_differs_from_vanilla'])}")
    differ = s["medusa_differs_from_vanilla"]
    if differ:
        log(f"error: Medusa's greedy output differs from vanilla's on {len(differ)} prompt(s): "
            + ", ".join(differ) + f" (see {args.out}.md)")
        return 1
    print(f"  Medusa == vanilla on all {len(records)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
