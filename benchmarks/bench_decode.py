"""Vanilla greedy decoding: our jitted loop (fp32; scanned and unrolled layer layouts) against
transformers' PyTorch ``generate`` on the same weights, batch 1, on MT-bench first turns.

Every variant decodes every prompt; the variants take turns per prompt (the order rotates from one
prompt to the next), so machine noise hits them alike and only ratios measured in the same run are
reported as results. One warm-up run per variant on the first prompt comes first; compile time is
reported apart and never counted in the timings.

    python benchmarks/bench_decode.py                      # 10 prompts x 128 new tokens
    python benchmarks/bench_decode.py --num-prompts 2 --max-new-tokens 32
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
    p.add_argument("--num-prompts", type=int, default=10,
                   help="first turns of the first N MT-bench questions (use >= 10 for results)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=os.path.join(C.RESULTS, "decode_vanilla.md"),
                   help="markdown results file; the JSON goes next to it (same stem)")
    p.add_argument("--model", default=None,
                   help=".gguf file or HF checkpoint dir (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--torch-threads", default=f"{os.cpu_count()},1",
                   help="comma list: one PyTorch variant per thread count; the first is the "
                        "baseline the ratios refer to (default: the core count, then 1)")
    p.add_argument("--layouts", default="scan,unrolled",
                   help="our layer layouts to run: scan (scan_layers=True), unrolled (False)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0,
                   help="size of the numpy copy that estimates memory bandwidth (0: skip)")
    a = p.parse_args(argv)
    if a.num_prompts < 1 or a.max_new_tokens < 1:
        p.error("--num-prompts and --max-new-tokens must be >= 1")
    a.torch_threads = [int(t) for t in a.torch_threads.split(",") if t.strip()]
    a.layouts = [s.strip() for s in a.layouts.split(",") if s.strip()]
    if not a.torch_threads or any(t < 1 for t in a.torch_threads):
        p.error("--torch-threads needs at least one thread count >= 1")
    if not a.layouts or set(a.layouts) - {"scan", "unrolled"}:
        p.error("--layouts takes scan and/or unrolled")
    return a


def torch_generate(tmodel, ids, max_new_tokens: int, eos, pad) -> tuple[list[int], float]:
    """Greedy ``generate`` of transformers' model for one prompt: (new tokens up to EOS, s)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = tmodel.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                              pad_token_id=pad)
    dt = time.perf_counter() - t0
    return C.trim_at_eos(out[0, len(ids):].tolist(), eos), dt


def load_torch_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if os.path.isdir(path):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return m.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    info = C.machine_info()
    bw_start = C.memory_bandwidth_gbs(args.bandwidth_gib) if args.bandwidth_gib > 0 else None

    import jax
    import numpy as np
    import torch

    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.model.llama import convert_layout
    from medusa_jax.tokenizer import (
        encode_prompt,
        eos_token_ids,
        load_tokenizer,
        resolve_model_path,
    )
    from medusa_jax.weights import load_base_model

    model_path = resolve_model_path(args.model)
    torch.set_num_threads(os.cpu_count())
    tok = load_tokenizer(model_path)
    questions = C.mtbench_questions(args.num_prompts)
    prompts = [encode_prompt(tok, q["text"], chat=True) for q in questions]

    log("loading our weights (fp32)")
    t = time.perf_counter()
    cfg, base = load_base_model(model_path, dtype="float32", scan_layers=True)
    cfg = cfg.replace(dtype="float32")
    our_load_s = time.perf_counter() - t
    eos = eos_token_ids(tok, cfg.eos_token_ids)
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                                  pad_token_id=pad)
    weight_bytes = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(base)))

    log("loading the transformers model (fp32)")
    t = time.perf_counter()
    tmodel = load_torch_model(model_path)
    torch_load_s = time.perf_counter() - t

    timer = C.JaxTimer()
    variants = []
    for lay in args.layouts:
        c = cfg.replace(scan_layers=(lay == "scan"))
        params = jax.device_put(convert_layout(base, c))

        def run_jax(ids, c=c, params=params):
            res, times = timer.run(lambda: generate(c, params, [ids], settings))
            return res["tokens"][0], times

        variants.append({"name": f"jax-{lay}", "kind": "jax", "scan_layers": lay == "scan",
                         "run": run_jax})

    def make_torch(threads):
        def run_torch(ids):
            torch.set_num_threads(threads)
            toks, dt = torch_generate(tmodel, ids, args.max_new_tokens, eos, pad)
            return toks, {"total_s": dt}

        return run_torch

    for th in args.torch_threads:
        variants.append({"name": f"torch-{th}t", "kind": "torch", "threads": th,
                         "run": make_torch(th)})
    base_name = f"torch-{args.torch_threads[0]}t"

    # ---- warm-up: one run per variant on the first prompt (compiles our loops)
    warm = {}
    for v in variants:
        t0 = time.perf_counter()
        toks, times = v["run"](prompts[0])
        warm[v["name"]] = {"wall_s": time.perf_counter() - t0,
                           "compile_s": times.get("compile_s", 0.0), "tokens": len(toks)}
        log(f"warm-up {v['name']}: {warm[v['name']]}")

    # ---- timed, interleaved
    records = []
    for i, ids in enumerate(prompts):
        rec = {**{k: questions[i][k] for k in ("question_id", "category")},
               "prompt_tokens": len(ids), "order": [], "runs": {}}
        for v in C.rotated(variants, i):
            toks, times = v["run"](ids)
            rec["order"].append(v["name"])
            rec["runs"][v["name"]] = {"tokens": toks, "new_tokens": len(toks),
                                      **{k: round(x, 4) for k, x in times.items()}}
        records.append(rec)
        log(f"prompt {i + 1}/{len(prompts)} (q{rec['question_id']}, {len(ids)} tokens): "
            + ", ".join(f"{n} {r['new_tokens']} tok {r['total_s']:.2f}s"
                        for n, r in rec["runs"].items()))
    info["load_average_at_end"] = C.load_average()
    bw_end = C.memory_bandwidth_gbs(args.bandwidth_gib) if args.bandwidth_gib > 0 else None

    # ---- summaries
    summary = {}
    for v in variants:
        n = v["name"]
        runs = [r["runs"][n] for r in records]
        toks = sum(r["new_tokens"] for r in runs)
        secs = sum(r["total_s"] for r in runs)
        s = {"tokens": toks, "seconds": secs, "tokens_per_s": toks / secs,
             "warmup_wall_s": warm[n]["wall_s"], "compile_s_warmup": warm[n]["compile_s"],
             "compile_s_timed_runs": sum(r.get("compile_s", 0.0) for r in runs)}
        if v["kind"] == "jax":
            s["prefill_s"] = sum(r["prefill_s"] for r in runs)
            s["decode_s"] = sum(r["decode_s"] for r in runs)
        summary[n] = s
    for n, s in summary.items():
        b = summary[base_name]
        s["ratio_vs_baseline"] = s["tokens_per_s"] / b["tokens_per_s"]
        # paired per-prompt speed ratios (seconds per token of the baseline / of this variant)
        per = [(r["runs"][base_name]["total_s"] / r["runs"][base_name]["new_tokens"])
               / (r["runs"][n]["total_s"] / r["runs"][n]["new_tokens"]) for r in records]
        s["per_prompt_ratio"] = C.ratio_stats(per)
        s["effective_gbs"] = s["tokens_per_s"] * weight_bytes / 1e9

    # ---- token equality against the baseline (and our layouts against each other)
    def compare(a, b):
        div = [C.first_divergence(r["runs"][a]["tokens"], r["runs"][b]["tokens"]) for r in records]
        return {"mismatched_prompts": sum(d is not None for d in div), "first_divergence": div}

    pairs = [(v["name"], base_name) for v in variants if v["name"] != base_name]
    jax_names = [v["name"] for v in variants if v["kind"] == "jax"]
    if len(jax_names) == 2:
        pairs.append((jax_names[0], jax_names[1]))
    equality = {f"{a} vs {b}": compare(a, b) for a, b in pairs}

    # ---- report
    header = ["variant", "tokens", "seconds", "tokens/s", f"ratio vs {base_name}",
              "per-prompt ratio median [min, max]", "compile s (warm-up)",
              "compile s (other prompt lengths)", "weights GB/s streamed"]
    rows = []
    for n, s in summary.items():
        pp = s["per_prompt_ratio"]
        rows.append([n, s["tokens"], round(s["seconds"], 2), round(s["tokens_per_s"], 2),
                     round(s["ratio_vs_baseline"], 3),
                     f"{pp['median']:.3f} [{pp['min']:.3f}, {pp['max']:.3f}]",
                     round(s["compile_s_warmup"], 2) if n.startswith("jax") else "-",
                     round(s["compile_s_timed_runs"], 2) if n.startswith("jax") else "-",
                     round(s["effective_gbs"], 2)])
    table = C.md_table(header, rows)
    eq_rows = [[k, f"{e['mismatched_prompts']}/{len(records)}",
                ", ".join("=" if d is None else str(d) for d in e["first_divergence"])]
               for k, e in equality.items()]
    eq_table = C.md_table(["pair", "prompts that differ", "first divergence index per prompt "
                           "(= : identical)"], eq_rows)
    per_rows = [[r["question_id"], r["category"], r["prompt_tokens"], " > ".join(r["order"])]
                + [f"{r['runs'][v['name']]['new_tokens']} / {r['runs'][v['name']]['total_s']:.2f}"
                   for v in variants] for r in records]
    per_table = C.md_table(["q", "category", "prompt tokens", "run order"]
                           + [f"{v['name']} tokens / s" for v in variants], per_rows)
    print(table)
    print()
    print(eq_table)

    bw = bw_start["read_plus_write_gbs"] if bw_start else None
    bw2 = bw_end["read_plus_write_gbs"] if bw_end else None
    if bw and bw2:
        bw = max(bw, bw2)  # the less disturbed of the two measurements
    bound = bw / weight_bytes * 1e9 if bw else None
    jax_split = "; ".join(
        f"{n}: prefill {s['prefill_s']:.2f} s, decode loop {s['decode_s']:.2f} s"
        for n, s in summary.items() if "prefill_s" in s)
    md = f"""# Vanilla greedy decoding: medusa_jax vs transformers (PyTorch)

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}
- PyTorch threads: `torch.set_num_threads(n)` before each PyTorch call; `{base_name}` uses
  n = os.cpu_count() = {os.cpu_count()} (the baseline of every ratio)
  {"and the other torch variant(s) n = " + ", ".join(str(t) for t in args.torch_threads[1:])
   if len(args.torch_threads) > 1 else ""}. JAX/XLA uses its default CPU thread pool (all cores).
- The machine is shared with other engineers' test runs, so absolute numbers move a lot from run
  to run; only the ratios of variants measured side by side in this run are meaningful.

## Setup
- Model: `{os.path.basename(model_path)}` dequantized to float32 by each library (ours:
  `load_base_model(dtype="float32")`; PyTorch: `AutoModelForCausalLM.from_pretrained(...,
  gguf_file=..., dtype=torch.float32)`); {weight_bytes / 1e6:.0f} MB of fp32 weights
  ({weight_bytes // 4:,} parameters, the tied embedding counted once).
- Prompts: first turn of the first {len(records)} MT-bench questions, through the chat template;
  batch 1; greedy; max_new_tokens = {args.max_new_tokens}; stop at EOS {list(eos)} (counted).
  PyTorch: `generate(do_sample=False, max_new_tokens={args.max_new_tokens})`, no
  min_new_tokens.
- Interleaving: per prompt every variant runs once; the order rotates by one variant from prompt
  to prompt. One warm-up run per variant on the first prompt before timing.
- Timed: the whole generate call (prefill + decode, host work included), compile time excluded
  (ours: the `compile_seconds` the loops report, subtracted; a new prompt-length bucket
  compiles a new shape during the timed runs, reported as "other prompt lengths").
- tokens/s = total new tokens / total seconds over all prompts. "per-prompt ratio": per prompt,
  (baseline s/token) / (variant s/token), a paired ratio less sensitive to slow spells.

## Results

{table}

Our time split ({jax_split}).

Load times (not in the table): ours {our_load_s:.1f} s, transformers {torch_load_s:.1f} s.

### Greedy tokens

{eq_table}

A float32 sum computed in another order can flip a near-tie late in a sequence; after the first
divergence the two continuations differ, so the first divergence index is the useful number.

### Per prompt

{per_table}

## What bounds the speed

Batch-1 decoding does one matrix-vector product per weight matrix per token: every token reads
all {weight_bytes / 1e6:.0f} MB of fp32 weights from memory once (they are far larger than the
CPU caches), for only ~2 flops per weight, so memory bandwidth sets the ceiling:
tokens/s <= bandwidth / {weight_bytes / 1e6:.0f} MB.
"""
    sustained = ", ".join(f"{n} {s['effective_gbs']:.1f} GB/s" for n, s in summary.items())
    if bw:
        md += f"""
A numpy copy of a {args.bandwidth_gib:g} GiB float32 array (one thread, best of 3) moved
{bw_start['read_plus_write_gbs']:.1f} GB/s (read + write) at the start of the run and
{bw_end['read_plus_write_gbs']:.1f} GB/s at the end. With the better ~{bw:.1f} GB/s the
ceiling is ~{bound:.0f} tokens/s (~{1e3 / bound:.0f} ms per token). The last table column is
tokens/s x {weight_bytes / 1e6:.0f} MB, the weight bandwidth each variant actually sustained:
{sustained}.
On a loaded 2-core machine neither the copy nor the decoders get the memory system to
themselves, so both are rough; the ratio to the ceiling says how much per-token overhead
(dispatch, attention over the cache, sampling, Python in `generate`) comes on top of streaming
the weights.
"""
    md += """
PyTorch with n threads = cores on a machine whose cores are busy with other processes can be
much slower than with 1 thread: its OpenMP worker threads wait for each other at the end of
every parallel region, and a descheduled worker stalls the rest. Compare the torch variants in
the table (measured in the same run) before reading much into the ratio against the baseline.
"""
    data = {"command": C.command_line(), "machine": info, "args": {
                k: v for k, v in vars(args).items()},
            "model": model_path, "weight_bytes": weight_bytes, "eos_token_ids": list(eos),
            "memory_bandwidth_start": bw_start, "memory_bandwidth_end": bw_end,
            "load_seconds": {"ours": our_load_s, "transformers": torch_load_s},
            "warmup": warm, "summary": summary, "token_equality": equality,
            "per_prompt": records}
    path = C.write_results(args.out, md, data)
    log(f"wrote {args.out} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
