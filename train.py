#!/usr/bin/env python
"""Train Medusa heads: self-distil a dataset, then Medusa-1 (frozen base) or Medusa-2 (joint).

    python train.py distill --out data/distilled.jsonl --max-conversations 2000
    python train.py medusa1 --config configs/smollm2_medusa1.yaml data.path=data/distilled.jsonl
    python train.py medusa2 --config configs/smollm2_medusa2.yaml --set train.steps=500
    python train.py data unpack --store datasets/smollm2-135m-instruct --out data/d.jsonl --hidden

Overrides are ``key.sub=value`` tokens or ``--set key.sub=value`` (values are YAML). Rerunning
a medusa1/medusa2 command with the same checkpoint.dir resumes from its latest checkpoint;
SIGTERM or Ctrl-C saves a checkpoint at the next step and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without torch (the main install) transformers advises installing it on import; we do not need it
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from medusa_jax.platform import skip_absent_tpu  # noqa: E402  (before jax is imported)

skip_absent_tpu()


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="let the base model answer a dataset's prompts (JSONL)",
                       description="Self-distillation: the base model answers the user turns of "
                       "a ShareGPT-style file; the answers become the training data. Resumable.")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None,
                   help="JSON/JSONL/parquet conversations (default: the packaged ShareGPT)")
    p.add_argument("--out", required=True, help="output JSONL (appended to: reruns resume)")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--max-turns", type=int, default=1, help="user turns answered per conversation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip conversations whose first prompt is longer (default: 512); "
                   "shorter prompts mean a shorter KV cache and faster batches on a CPU")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-resume", action="store_true", help="overwrite --out instead of resuming")
    p.add_argument("--engine", default="batch", choices=["batch", "refill"],
                   help="refill: continuous batching, rows refilled as answers finish")
    p.add_argument("--keep-hidden", action="store_true",
                   help="(refill) also write the base's hidden states to <out>.hidden")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                   help="scanned layers (compile faster; each step copies the weights out of "
                   "the stack) instead of unrolled ones (the default: faster steps)")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="keep distilled data in a versioned store (xz shards) and "
                       "rebuild its hidden-state sidecar",
                       description="A distilled JSONL in a directory of append-only xz shards "
                       "that can be committed (pack), written back (unpack), and its "
                       "--keep-hidden sidecar rebuilt by one teacher-forced pass (hidden).")
    ops = p.add_subparsers(dest="op", required=True, metavar="{pack,unpack,hidden}")
    pk = ops.add_parser("pack", help="add the records the store lacks as a new shard")
    pk.add_argument("--data", required=True, help="the distilled JSONL")
    pk.add_argument("--store", required=True, help="the store directory (created if absent)")
    pk.add_argument("--shard-records", type=int, default=2000)
    pk.add_argument("--command-line", default=None, dest="command_line",
                    help="the distillation command, recorded with the new shard")
    up = ops.add_parser("unpack", help="write the store's records to a JSONL")
    up.add_argument("--store", required=True)
    up.add_argument("--out", required=True, help="the JSONL (left alone if it already holds "
                    "the store's records)")
    up.add_argument("--hidden", action="store_true", help="also rebuild <out>.hidden")
    hd = ops.add_parser("hidden", help="rebuild <data>.hidden from the records (resumable)")
    hd.add_argument("--data", required=True)
    for q in (up, hd):
        q.add_argument("--model", default=None, help="the base model the data was distilled "
                       "with (default: SmolLM2-135M-Instruct)")
        q.add_argument("--batch-rows", type=int, default=4,
                       help="packed rows of prompt + answer per forward pass")


def _add_train(sub, mode: str, what: str) -> None:
    p = sub.add_parser(mode, help=what, description=f"{what}. Settings: the YAML given with "
                       "--config, then overrides. train.mode is set to " + repr(mode) + ".")
    p.add_argument("--config", default=None, help="run config YAML (see configs/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="more overrides, e.g. train.batch_size=16 checkpoint.dir=runs/x")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{distill,data,medusa1,medusa2,compile}")
    sub.add_parser("compile", add_help=False,
                   help="compile a run's Medusa-2 train step / decoding loop ahead of time for a "
                   "TPU topology and report per-chip memory (python -m medusa_jax.aot; "
                   "`train.py compile --help` for its options)")
    _add_distill(sub)
    _add_data(sub)
    _add_train(sub, "medusa1", "train Medusa heads on a frozen base model")
    _add_train(sub, "medusa2", "train heads and base jointly (optionally distilling from the "
               "original base)")
    return p.parse_args(argv)


def run_distill(args) -> int:
    from medusa_jax.training.distill import distill

    summary = distill(args.model, args.data, args.out, max_conversations=args.max_conversations,
                      max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, temperature=args.temperature,
                      batch_size=args.batch_size, seed=args.seed,
                      dtype=args.dtype, resume=not args.no_resume, engine=args.engine,
                      keep_hidden=args.keep_hidden, scan_layers=args.scan_layers)
    print(json.dumps(summary, indent=2))
    return 0


def run_data(args) -> int:
    from medusa_jax.provenance import git_commit
    from medusa_jax.training import data_store

    if args.op == "pack":
        import datetime
        import platform

        source = {"packed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
                  "commit": git_commit(os.path.dirname(os.path.abspath(__file__)))}
        if args.command_line:
            source["command"] = args.command_line
        summary = data_store.pack(args.data, args.store, shard_records=args.shard_records,
                                  source=source)
    elif args.op == "unpack":
        summary = data_store.unpack(args.store, args.out)
        if args.hidden:
            summary["hidden"] = _rebuild(args, args.out)
    else:
        summary = _rebuild(args, args.data)
    print(json.dumps(summary, indent=2))
    return 0


def _rebuild(args, data_path: str) -> dict:
    from medusa_jax.api import MedusaLM
    from medusa_jax.training.data_store import check_rebuild, rebuild_hidden

    check_rebuild(data_path, args.batch_rows)  # bad input before the (slow) model load
    lm = MedusaLM.load(args.model, medusa=None, dtype="float32", scan_layers=False)
    return rebuild_hidden(lm.cfg, lm.params["base"], lm.tokenizer, data_path,
                          batch_rows=args.batch_rows)


def run_train(args) -> int:
    import yaml

    from medusa_jax.training.run_config import load_run_config, to_dict

    tokens = [*args.overrides]
    for s in args.sets:
        tokens += ["--set", s]
    cfg = load_run_config(args.config, [*tokens, f"train.mode={args.command}"])
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from medusa_jax.distributed import maybe_initialize
    from medusa_jax.training.loop import train

    maybe_initialize()  # multi-host runs (MEDUSA_* / JAX_COORDINATOR_ADDRESS); else a no-op
    if cfg.train.cache_hidden:
        from medusa_jax.training.cached import train_cached

        summary = train_cached(cfg)
    else:
        summary = train(cfg)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    if summary["interrupted"]:
        cmd = " ".join(["python", *sys.argv]) if sys.argv else "the same command"
        print(f"stopped by {summary['signal'] or 'request'} at step {summary['step']}/"
              f"{summary['steps']}; checkpoint saved in {summary['checkpoint_dir']}.\n"
              f"To resume, run the same command again: {cmd}", file=sys.stderr)
        return 0
    ev = summary.get("eval")
    print(f"done: {summary['step']} steps in {summary['wall_time_s']:.0f}s; run dir "
          f"{summary['run_dir']}", file=sys.stderr)
    if ev:
        top1 = ", ".join(f"{a:.3f}" for a in ev["head_top1"])
        top5 = ", ".join(f"{a:.3f}" for a in ev["head_top5"])
        print(f"held-out accuracy per head: top-1 [{top1}]  top-5 [{top5}]", file=sys.stderr)
    for name, path in summary.get("exports", {}).items():
        print(f"exported {name}: {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compile"]:  # its own options: medusa_jax.aot's command line
        from medusa_jax.aot import main as aot_main

        return aot_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("medusa_jax").setLevel(logging.INFO)  # ours at INFO, libraries quieter
    from medusa_jax.errors import MedusaError

    try:
        if args.command == "data":
            return run_data(args)
        return run_distill(args) if args.command == "distill" else run_train(args)
    except MedusaError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while training, or one during set-up
        print("\ninterrupted (no checkpoint written for the current step)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
