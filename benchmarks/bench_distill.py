"""Self-distillation throughput: the static-batch engine against the refilling engine (continuous
batching, hidden states kept), the same ShareGPT prompts and settings, side by side in one run.

    python benchmarks/bench_distill.py --conversations 64 --batch-size 32 --max-new-tokens 256

Each engine first runs once on the same prompts into a throw-away file (every shape compiles),
then the timed rounds alternate engines (``--rounds``). Answer tokens per second count generated
answer tokens only (prompts excluded). Also checks that the greedy answers of both engines are
the same. Writes benchmarks/results/distill.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import _common as C


def _queue(row: dict) -> str:
    if row.get("queue_tokens_per_second") is None:
        return "-"
    return f"{row['queue_tokens_per_second']:.1f} ({row['queue_token_share']:.0%})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stacked-kv", action="store_true",
                   help="also time the refill engine over one stacked KV cache (the layout before "
                   "per-layer buffers), side by side")
    p.add_argument("--engines", default="batch,refill",
                   help="engines to time, comma-separated: batch, refill (the refill/batch ratio "
                   "and the answer check need both)")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "distill.md"))
    args = p.parse_args(argv)

    from medusa_jax.training.distill import load_distiller

    info = C.machine_info()
    # the distiller `train.py distill` runs (layers unrolled: a KV buffer per layer). Loaded
    # with MedusaLM.load's default (scanned layers, one stacked cache) until 8 Dec, so every
    # result before then timed that layout, and `--stacked-kv` timed it twice.
    dist = load_distiller()
    layers = "scanned" if dist.cfg.scan_layers else "unrolled"
    kw = dict(max_conversations=args.conversations, max_turns=1,
              max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
              batch_size=args.batch_size, progress=False, resume=False)
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not chosen or set(chosen) - {"batch", "refill"}:
        p.error("--engines takes batch and/or refill")
    if args.stacked_kv and "refill" not in chosen:
        p.error("--stacked-kv compares against the refill engine: add it to --engines")
    engines = {e: kw_e for e, kw_e in (("batch", dict(engine="batch")),
                                       ("refill", dict(engine="refill", keep_hidden=True)))
               if e in chosen}
    if args.stacked_kv:  # the refill engine over one stacked KV cache, as before per-layer buffers
        engines["refill-stacked"] = dict(engine="refill", keep_hidden=True)
    layout = {"refill-stacked": False}
    tmp = tempfile.mkdtemp(prefix="bench_distill_")
    files, rows = {}, {e: [] for e in engines}
    for e, ekw in engines.items():  # warm-up: every shape compiles
        dist.kv_per_layer = layout.get(e)
        t = time.perf_counter()
        dist.run(None, os.path.join(tmp, f"warm-{e}.jsonl"), **kw, **ekw)
        print(f"{e}: warm-up (compiles) {time.perf_counter() - t:.0f}s", file=sys.stderr)
    for r in range(args.rounds):
        for e in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            files[e] = os.path.join(tmp, f"{e}.jsonl")
            dist.kv_per_layer = layout.get(e)
            s = dist.run(None, files[e], **kw, **engines[e])
            rows[e].append({k: s[k] for k in ("tokens_generated", "seconds", "tokens_per_second",
                                              "written", "batches", "row_occupancy",
                                              "queue_tokens_per_second", "queue_token_share")})
            print(f"{e}: {s['tokens_per_second']:.1f} answer tok/s ({s['tokens_generated']} "
                  f"tokens, {s['seconds']:.0f}s)", file=sys.stderr)

    def answers(path):
        with open(path) as f:
            return {r["id"]: [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
                    for r in map(json.loads, f)}

    best = {e: max(x["tokens_per_second"] for x in v) for e, v in rows.items()}
    both = "batch" in engines and "refill" in engines
    ratio = same = None
    if both:
        a, b = answers(files["batch"]), answers(files["refill"])
        same = sum(a[k] == b.get(k) for k in a)
        ratio = best["refill"] / best["batch"]
        compared = [f"Refill / batch: **{ratio:.2f}x**. Identical greedy answers: {same} of "
                    f"{len(a)} conversations."]
    else:
        compared = [f"Only {', '.join(engines)} timed (`--engines`): no refill / batch ratio."]
    n_conv = len(answers(files[next(iter(engines))]))
    info["load_average_at_end"] = C.load_average()
    md = [
        "# Self-distillation throughput: static batches vs refilling (continuous batching)", "",
        f"Command: `{C.command_line()}`", "", C.machine_md(info), "",
        f"Default model (SmolLM2-135M-Instruct, {layers} layers as `train.py distill` runs it), "
        f"first {args.conversations} usable ShareGPT "
        f"conversations (first turns, prompts <= {args.max_prompt_tokens} tokens), greedy, "
        f"<= {args.max_new_tokens} new tokens, batch {args.batch_size}; timed after a warm-up "
        "run of each engine on the same prompts (compile excluded). The refill engine also "
        "keeps the hidden states (written to disk).", "",
        C.md_table(["engine", "answer tok/s (best round)", "answer tokens", "seconds",
                    "row occupancy", "tok/s while the queue lasted (share of the tokens)"],
                   [[e, best[e], rows[e][-1]["tokens_generated"], rows[e][-1]["seconds"],
                     f"{rows[e][-1]['row_occupancy']:.0%}", _queue(rows[e][-1])]
                    for e in engines]),
        "", "Row occupancy: of the batch rows the decode steps computed, the share that held a "
        "live answer (the rest waited: for the batch's longest answer in static batches, for "
        "the queue's last answers at the end of a refilling run, which a run of only a few "
        "batches' worth of conversations is dominated by). While the queue lasted every row was "
        "busy: that rate is what a long distillation run sees.",
        "", *compared,
    ]
    if "refill-stacked" in engines:
        b, c = answers(files["refill"]), answers(files["refill-stacked"])
        same_stacked = sum(c.get(k) == b[k] for k in b)
        data_extra = {"ratio_vs_stacked": best["refill"] / best["refill-stacked"],
                      "same_answers_stacked": same_stacked}
        md += ["", f"Refill with a KV buffer per layer / over one stacked cache (`refill-stacked`, "
               f"the layout before): **{data_extra['ratio_vs_stacked']:.2f}x**; identical greedy "
               f"answers: {same_stacked} of {len(b)} conversations."]
    else:
        data_extra = {}
    data = {"command": C.command_line(), "machine": info, "args": vars(args), "rounds": rows,
            "layers": layers, "best_tokens_per_second": best, "ratio": ratio, "same_answers": same,
            "conversations": n_conv, **data_extra}
    C.write_results(args.out, "\n".join(md), data)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
