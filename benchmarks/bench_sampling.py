"""Sampling on MT-bench: lossless and typical Medusa acceptance against our vanilla sampling loop.

What it measures, on the default model (SmolLM2-135M-Instruct, float32, scanned layers) with the
shipped heads and their CPU tree, batch 1: for each of the first ``--questions`` MT-bench
questions, turn 1 (the first user message through the chat template) is decoded by our vanilla
loop sampling at ``--temperature`` / ``--top-p`` / ``--top-k``, and by the Medusa loop with the
``lossless`` rule (output distributed exactly as vanilla sampling) and with the paper's
``typical`` rule (threshold 0.09, alpha 0.3: faster, but its output is not the base model's
distribution). The three run interleaved, the first one rotating from prompt to prompt, with the
same seed per prompt; one warm-up run per variant comes first (compile time is excluded from the
timed runs by ``_common.JaxTimer``).

Reported: accepted tokens per step of each Medusa rule (overall and per category), tokens/s of the
decode loop and end to end, each rule's speed against vanilla sampling (ratio of totals and the
median of per-prompt paired ratios), and the mean answer length per variant (lossless samples the
same distribution as vanilla, so its lengths should agree within noise; typical's need not).
Writes PREFIX.md and PREFIX.json.

    python benchmarks/bench_sampling.py                 # 80 first turns, 128 tokens, T=0.7 p=0.9
    python benchmarks/bench_sampling.py --questions 4 --max-new-tokens 32 --out /tmp/s/test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common as C

VARIANTS = ("vanilla", "lossless", "typical")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--questions", type=int, default=80, help="first N MT-bench questions")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--heads", default=None,
                   help="Medusa heads (any layout load_heads reads); default: the shipped heads")
    p.add_argument("--tree", default=None,
                   help="predefined tree name or JSON file; default: the heads' tree for this "
                        "backend")
    p.add_argument("--model", default=None,
                   help=".gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "sampling"),
                   help="output prefix: PREFIX.md and PREFIX.json")
    a = p.parse_args(argv)
    if not 1 <= a.questions <= 80 or a.max_new_tokens < 1:
        p.error("need 1 <= --questions <= 80 and --max-new-tokens >= 1")
    if not a.temperature > 0:
        p.error("--temperature must be > 0 (greedy decoding is bench_mtbench.py's job)")
    if not 0 < a.top_p <= 1 or a.top_k < 0:
        p.error("need 0 < --top-p <= 1 and --top-k >= 0")
    a.out = a.out[:-3] if a.out.endswith(".md") else a.out
    return a


def summarize(records: list[dict]) -> dict:
    from bench_mtbench import totals

    s = {n: totals([r[n] for r in records]) for n in VARIANTS}
    for n in VARIANTS:
        s[n]["mean_answer_tokens"] = s[n]["tokens"] / len(records)
    for rule in VARIANTS[1:]:
        steps = sum(r[rule]["steps"] for r in records)
        s[rule]["steps"] = steps
        s[rule]["accepted_per_step"] = s[rule]["tokens"] / max(steps, 1)
        for key, label in (("decode_s", "decode"), ("total_s", "end_to_end")):
            per = [(r["vanilla"][key] / len(r["vanilla"]["tokens"]))
                   / (r[rule][key] / len(r[rule]["tokens"])) for r in records]
            tps = lambda n, key=key: s[n]["tokens"] / sum(r[n][key] for r in records)
            s[rule][f"speedup_{label}"] = {"ratio_of_totals": tps(rule) / tps("vanilla"),
                                           "per_prompt": C.ratio_stats(per)}
        cats: dict[str, list] = {}
        for r in records:
            cats.setdefault(r["category"], []).append(r[rule])
        s[rule]["accepted_per_category"] = {
            c: sum(len(x["tokens"]) for x in xs) / max(sum(x["steps"] for x in xs), 1)
            for c, xs in sorted(cats.items())}
    return s


def report(args, info, setup, warm, records, s) -> str:
    f = lambda x: f"{x:.3f}"
    rows = []
    for n in VARIANTS:
        t = s[n]
        rows.append([n, f(t["accepted_per_step"]) if "accepted_per_step" in t else "1 (by design)",
                     f"{t['decode_tokens_per_s']:.2f}", f"{t['tokens_per_s']:.2f}",
                     f(t["speedup_decode"]["ratio_of_totals"]) if n != "vanilla" else "1",
                     f(t["speedup_end_to_end"]["ratio_of_totals"]) if n != "vanilla" else "1",
                     f(t["speedup_decode"]["per_prompt"]["median"]) if n != "vanilla" else "1",
                     f"{t['mean_answer_tokens']:.1f}"])
    cats = sorted(s["lossless"]["accepted_per_category"])
    cat_rows = [[c, f(s["lossless"]["accepted_per_category"][c]),
                 f(s["typical"]["accepted_per_category"][c])] for c in cats]
    return "\n".join([
        "# Sampling on MT-bench: lossless and typical acceptance vs vanilla sampling", "",
        f"Command: `{C.command_line()}`", "",
        C.machine_md(info), "",
        f"- Model: `{setup['model']}` (float32, scanned layers), batch 1.",
        f"- Heads: {setup['heads']}; tree {setup['tree']['name']}: {setup['tree']['nodes']} "
        f"nodes, depth {setup['tree']['depth']}.",
        f"- Prompts: the first turns of the first {len(records)} MT-bench questions, at most "
        f"{args.max_new_tokens} new tokens, EOS honoured.",
        f"- Sampling: temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}; "
        f"prompt i uses seed {args.seed} + i for every variant. Typical: threshold "
        f"{setup['typical']['threshold']}, alpha {setup['typical']['alpha']}.",
        "- The three variants run interleaved, the first one rotating per prompt; compile time is "
        "excluded (warm-up: " + ", ".join(f"{n} {w['wall_s']:.1f} s" for n, w in warm.items())
        + ").", "",
        C.md_table(["variant", "accepted tokens / step", "decode tok/s", "end-to-end tok/s",
                    "decode vs vanilla", "end to end vs vanilla", "median per prompt (decode)",
                    "mean answer tokens"], rows), "",
        "Lossless output has the base model's sampling distribution (tested exactly in "
        "`tests/test_acceptance.py`); typical acceptance trades that for longer accepted paths.",
        "", "## Accepted tokens per step by category", "",
        C.md_table(["category", "lossless", "typical"], cat_rows), ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    info = C.machine_info()

    import jax
    from bench_mtbench import heads_and_tree_args, load_heads_and_tree
    from tqdm import tqdm

    import medusa_jax.tokenizer as mtok
    from medusa_jax.decoding.acceptance import Typical
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.sampling import SamplingConfig
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.errors import MedusaError
    from medusa_jax.tree import build_tree

    try:  # heads or a tree that cannot be had are refused before the model loads
        heads_path, meta, tree = heads_and_tree_args(args, "--heads PATH")
    except MedusaError as e:
        log(f"error: {e}")
        return 2
    model_path = mtok.resolve_model_path(args.model)
    tok = mtok.load_tokenizer(model_path)
    questions = C.mtbench_questions(args.questions)
    log("loading the base model (fp32, scanned layers)")
    cfg, base, eos, pad = C.load_fp32_base(model_path, tok)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, sampling=sampling,
                             eos_token_ids=eos, pad_token_id=pad)
    mcfg, mp, heads_desc, tree_name, choices = load_heads_and_tree(args, cfg, heads_path, meta,
                                                                   tree)
    typical = Typical()
    settings = {"lossless": make_settings(choices, mcfg.num_heads, gen, acceptance="lossless"),
                "typical": make_settings(choices, mcfg.num_heads, gen, acceptance=typical)}
    tb = build_tree(choices)
    params = {"base": base, "medusa": jax.device_put(mp)}
    log(f"heads {heads_desc}; tree {tree_name}: {tb.num_nodes} nodes, depth {tb.depth}")

    timer = C.JaxTimer()

    def runner(name):
        if name == "vanilla":
            def run(ids, seed):
                res, t = timer.run(lambda: generate(cfg, base, [ids], gen, seed=seed))
                return {"tokens": res["tokens"][0], **t}
        else:
            def run(ids, seed):
                res, t = timer.run(lambda: medusa_generate(cfg, mcfg, params, [ids],
                                                           settings[name], seed=seed))
                return {"tokens": res["tokens"][0], "steps": int(res["steps"][0]), **t}
        return run

    runners = {n: runner(n) for n in VARIANTS}
    prompt = lambda q: mtok.apply_chat_template(tok, [{"role": "user", "content": q["text"]}])

    warm = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        r = run(prompt(questions[0]), args.seed)
        warm[name] = {"wall_s": time.perf_counter() - t0, "compile_s": r["compile_s"]}
        log(f"warm-up {name}: {warm[name]['wall_s']:.1f} s (compile {warm[name]['compile_s']:.1f})")

    records = []
    bar = tqdm(total=len(questions), desc="prompts", unit="prompt", file=sys.stderr)
    for qi, q in enumerate(questions):
        ids = prompt(q)
        rec = {"id": f"{q['question_id']}.1", "category": q["category"], "prompt_tokens": len(ids),
               "seed": args.seed + qi, "order": C.rotated(list(VARIANTS), qi)}
        for n in rec["order"]:
            rec[n] = {k: round(v, 4) if isinstance(v, float) else v
                      for k, v in runners[n](ids, args.seed + qi).items()}
        records.append(rec)
        bar.update()
    bar.close()
    info["load_average_at_end"] = C.load_average()

    s = summarize(records)
    setup = {"model": model_path, "heads": heads_desc, "heads_path": args.heads or "default",
             "tree": {"name": tree_name, "nodes": tb.num_nodes, "depth": tb.depth,
                      "choices": choices},
             "typical": {"threshold": typical.threshold, "alpha": typical.alpha},
             "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                          "top_k": args.top_k}}
    md = report(args, info, setup, warm, records, s)
    C.write_results(args.out + ".md", md, {"command": C.command_line(), "machine": info,
                                           "args": vars(args), **setup, "warmup": warm,
                                           "summary": s, "per_prompt": records})
    log(f"wrote {args.out}.md and .json")
    for n in VARIANTS[1:]:
        print(f"{n}: {s[n]['accepted_per_step']:.3f} accepted/step, decode "
              f"{s[n]['decode_tokens_per_s']:.2f} tok/s vs vanilla "
              f"{s['vanilla']['decode_tokens_per_s']:.2f} = "
              f"{s[n]['speedup_decode']['ratio_of_totals']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
