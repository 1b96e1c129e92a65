#!/usr/bin/env python
"""Generate text with a base model, with or without Medusa heads.

    python decode.py --prompt "Tell me about Paris."              # default model (+ shipped heads)
    python decode.py --medusa none --prompt "..."                 # plain decoding
    python decode.py --compare --prompts-file questions.jsonl    # vanilla vs Medusa, same prompts
    python decode.py --random-weights --preset llama2-7b --medusa none --prompt "x"  # speed only
    echo "Hello" | python decode.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without torch (the main install) transformers advises installing it on import; we do not need it
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from medusa_jax.errors import MedusaError  # noqa: E402
from medusa_jax.platform import skip_absent_tpu  # noqa: E402  (before jax is imported)

skip_absent_tpu()


def _finite(text: str) -> float:
    import math

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _preset_names():
    from medusa_jax.presets import PRESETS

    return list(PRESETS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    src.add_argument("--prompts-file", help="JSONL: strings, or objects with 'prompt', 'text' or "
                     "'turns' (first turn used, MT-bench style)")
    src.add_argument("--raw", action="store_true", help="do not apply the chat template")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="HF checkpoint dir or .gguf file (default: SmolLM2-135M-Instruct)")
    m.add_argument("--random-weights", action="store_true",
                   help="random weights of the --preset shape, built on the device (speed "
                   "measurements: the text is noise, EOS is ignored, byte-level tokenizer)")
    m.add_argument("--preset", default=None,
                   help=f"model shape for --random-weights: {', '.join(_preset_names())}")
    m.add_argument("--medusa", default="default",
                   help="Medusa heads dir (our format, original v1/v2 layout, or a Medusa-2 HF dir); "
                        "'none' for plain decoding; 'default' = heads shipped for the default model")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameters, activations and KV cache (default: float32 on a CPU, "
                   "bfloat16 on GPUs and TPUs); bfloat16 is several times slower on a CPU "
                   "(XLA:CPU has no fast bf16 matrix products)")
    m.add_argument("--tokenizer", default=None,
                   help="HF checkpoint dir or .gguf file to take the tokenizer from (default: "
                   "the model's own; for a checkpoint saved without tokenizer files)")
    m.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="layer layout: scanned (compiles in about a second) or, with "
                   "--no-scan-layers, unrolled (about 7 s to compile per loop on the default "
                   "model, then faster steps on a CPU: worth it for long or many generations)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_positive, default=256)
    g.add_argument("--temperature", type=_finite, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=_finite, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=_positive, default=1)
    g.add_argument("--tree", default="default", help="tree name (e.g. mc_sim_7b_63), JSON file, or 'default'")
    g.add_argument("--acceptance", default=None, choices=["greedy", "typical", "lossless"],
                   help="greedy: output identical to plain greedy decoding (the default at "
                   "temperature 0); lossless: output distributed exactly as sampling from the "
                   "model (the default above temperature 0; at 0 it is greedy); typical: the "
                   "Medusa paper's rule, accepts more but changes the distribution")
    g.add_argument("--posterior-threshold", type=_finite, default=0.09,
                   help="typical acceptance epsilon, in (0, 1] (default 0.09)")
    g.add_argument("--posterior-alpha", type=_finite, default=0.3,
                   help="typical acceptance delta, > 0 (default 0.3)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="one JSON object per prompt")
    o.add_argument("--compare", action="store_true",
                   help="run vanilla and Medusa on the same prompts; check greedy outputs agree")
    o.add_argument("--repeats", type=_positive, default=1,
                   help="--compare: timed rounds over the prompts (the order alternates), so "
                   "one noisy run does not decide the ratio")
    o.add_argument("--no-stream", action="store_true", help="do not stream text to the terminal")
    return p.parse_args(argv)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except IsADirectoryError:
        raise MedusaError(f"--prompts-file {path} is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise MedusaError(f"--prompts-file {path} is not UTF-8 text (byte {e.start}): convert it, "
                          f"e.g. iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise MedusaError(f"cannot read --prompts-file {path}: {e.strerror}") from None


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        for n, line in enumerate(_read_text(args.prompts_file).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MedusaError(f"{args.prompts_file}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(rec, dict):
                rec = rec.get("prompt") or rec.get("text") or (rec.get("turns") or [None])[0]
            if not isinstance(rec, str):
                raise MedusaError(f"{args.prompts_file}:{n}: no prompt string found")
            prompts.append(rec)
    if not prompts and not sys.stdin.isatty():
        try:
            data = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise MedusaError(f"standard input is not UTF-8 text (byte {e.start}): pipe text "
                              "prompts, one per line") from None
        if "\x00" in data:
            raise MedusaError("standard input holds binary data (NUL bytes): pipe text prompts, "
                              "one per line")
        prompts = [line for line in data.splitlines() if line.strip()]
    if not prompts:
        raise MedusaError("no prompt given: use --prompt, --prompts-file or standard input")
    for i, text in enumerate(prompts):
        if not text.strip():  # checked before the model is loaded: fail fast
            raise MedusaError(f"prompt {i} is empty: nothing to generate from")
    return prompts


def _batches(items, n):
    for i in range(0, len(items), n):
        yield items[i: i + n]


def _line(o) -> str:
    return (f"[{o.num_new_tokens} tokens, {o.tokens_per_second:.1f} tok/s"
            + (f", {o.mean_accepted:.2f} accepted/step" if o.mean_accepted else "")
            + (f", prefill {o.prefill_seconds:.2f}s" if o.prefill_seconds >= 0.5 else "")
            + (", interrupted" if o.interrupted else "") + "]")


def check_inputs(args):
    """Everything that can be checked before the weights load (~10 s): prompts, flags, the
    tree, the heads' path, and the prompts' lengths against the model's context (its config
    and tokenizer are cheap to read). Returns ``(prompts, their token ids, (model, heads or
    None, tokenizer) to load, acceptance)``."""
    from medusa_jax.api import resolve_sources
    from medusa_jax.decoding.medusa import check_tree
    from medusa_jax.decoding.sampling import SamplingConfig
    from medusa_jax.tokenizer import load_tokenizer
    from medusa_jax.weights import load_model_config

    prompts = read_prompts(args)
    SamplingConfig(args.temperature, args.top_p, args.top_k)
    if args.random_weights or args.preset is not None:
        return _check_random_inputs(args, prompts)
    model, heads, tokenizer = resolve_sources(args.model, args.medusa, args.tokenizer)
    if heads is None and args.medusa == "default" and (args.compare or args.tree != "default"):
        raise MedusaError("no Medusa heads for this model: give them with --medusa PATH")
    if args.compare and heads is None:
        raise MedusaError("--compare needs Medusa heads (--medusa PATH)")
    if args.tree != "default":
        if heads is None:
            raise MedusaError("--tree needs Medusa heads: drop it, or give heads with --medusa")
        check_tree(args.tree)
    acceptance = _acceptance(args, heads)
    ids = _encode(load_tokenizer(tokenizer or model), load_model_config(model), prompts, args)
    return prompts, ids, (model, heads, tokenizer), acceptance


def _acceptance(args, heads):
    """The acceptance rule's name (None without heads), its parameters checked now."""
    if not heads:
        return None
    from medusa_jax.api import resolve_acceptance
    from medusa_jax.decoding.acceptance import get_rule

    acceptance = resolve_acceptance(args.acceptance, args.temperature)
    get_rule(acceptance, args.posterior_threshold, args.posterior_alpha)  # ranges, now
    return acceptance


def _encode(tok, cfg, prompts, args) -> list[list[int]]:
    """Token ids of every prompt, each checked against the context."""
    from medusa_jax.decoding.common import check_lengths
    from medusa_jax.tokenizer import encode_prompt

    ids = []
    for i, text in enumerate(prompts):
        ids.append(encode_prompt(tok, text, chat=not args.raw))
        try:
            check_lengths(cfg, len(ids[-1]), args.max_new_tokens)
        except ValueError as e:
            raise MedusaError(f"prompt {i}: {e}") from None
    return ids


def _check_random_inputs(args, prompts):
    """``check_inputs`` for ``--random-weights --preset NAME`` (no files to read but heads)."""
    from medusa_jax.decoding.medusa import check_tree
    from medusa_jax.presets import PRESETS, preset_config, preset_heads
    from medusa_jax.tokenizer import byte_tokenizer_hf

    names = ", ".join(PRESETS)
    if not args.random_weights:
        raise MedusaError("--preset names the shape of --random-weights: add --random-weights")
    if args.preset is None:
        raise MedusaError(f"--random-weights needs --preset NAME ({names})")
    if args.model is not None or args.tokenizer is not None:
        raise MedusaError("--random-weights builds its own model: drop --model/--tokenizer")
    cfg = preset_config(args.preset, "float32")  # unknown preset: one clear error
    heads = preset_heads(args.preset) if args.medusa == "default" else args.medusa
    heads = None if heads in ("none", "") else heads
    if heads is None and (args.compare or args.tree != "default"):
        raise MedusaError(f"no Medusa heads for preset {args.preset!r}: give them with "
                          "--medusa PATH, or drop --compare/--tree")
    if args.tree != "default":
        check_tree(args.tree)
    acceptance = _acceptance(args, heads)
    return prompts, _encode(byte_tokenizer_hf(), cfg, prompts, args), (None, heads, None), acceptance


def run(args) -> int:
    from medusa_jax.api import MedusaLM

    prompts, ids, (model, heads, tokenizer), acceptance = check_inputs(args)
    from medusa_jax.user_cache import enable_compilation_cache

    enable_compilation_cache()  # compiled decode loops are kept between runs ($MEDUSA_JAX_CACHE)
    if args.random_weights:
        lm = MedusaLM.from_preset(args.preset, medusa=heads, dtype=args.dtype,
                                  scan_layers=args.scan_layers)
    else:
        lm = MedusaLM.load(model, medusa=heads or "none", dtype=args.dtype,
                           scan_layers=args.scan_layers, tokenizer=tokenizer)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, seed=args.seed, tree=args.tree, acceptance=acceptance,
              posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha)
    stream_ok = sys.stdout.isatty() and not args.json and not args.no_stream and not args.compare
    if args.compare:
        return compare(lm, prompts, ids, args, kw)
    for texts, batch in zip(_batches(prompts, args.batch_size), _batches(ids, args.batch_size)):
        stream = None
        if stream_ok and len(batch) == 1:
            def stream(_row, text):
                sys.stdout.write(text)
                sys.stdout.flush()
        outs = lm.generate(batch, stream=stream, **kw)
        for prompt, o in zip(texts, outs):
            if args.json:
                print(json.dumps({"prompt": prompt, **o.to_dict()}), flush=True)
            elif stream is not None:
                print("\n" + _line(o))
            else:
                print(o.text, flush=True)
                print(_line(o), file=sys.stderr)
        if any(o.interrupted for o in outs):
            print("interrupted: the text so far is above", file=sys.stderr)
            return 130
    return 0


def compare(lm, prompts, ids, args, kw) -> int:
    """Vanilla and Medusa on the same prompts, interleaved batch by batch after a warm-up
    (compile excluded); prints both speeds and the ratio."""
    totals = {"vanilla": [0, 0.0], "medusa": [0, 0.0]}
    mismatches, accepted, steps = 0, 0, 0
    greedy = args.temperature == 0
    t0 = time.perf_counter()
    for batch in _batches(ids, args.batch_size):
        for use in (False, True):  # compile this shape once for each loop
            lm.generate(batch, medusa=use, **kw)
        break
    compile_s = time.perf_counter() - t0
    interrupted = False
    for rnd in range(args.repeats):
        for texts, batch in zip(_batches(prompts, args.batch_size), _batches(ids, args.batch_size)):
            if interrupted:
                break
            res = {}
            for use in ((False, True) if rnd % 2 == 0 else (True, False)):
                res[use] = lm.generate(batch, medusa=use, **kw)
            van, med = res[False], res[True]
            for name, outs in (("vanilla", van), ("medusa", med)):
                totals[name][0] += sum(o.num_new_tokens for o in outs)
                totals[name][1] += outs[0].seconds - outs[0].prefill_seconds  # decode time
            interrupted = any(o.interrupted for o in (*van, *med))
            for prompt, v, m in zip(texts, van, med):
                same = v.token_ids == m.token_ids
                mismatches += int(greedy and not same)
                accepted += m.num_new_tokens
                steps += m.steps or 0
                if rnd > 0:
                    continue
                if args.json:
                    print(json.dumps({"prompt": prompt, "vanilla": v.to_dict(),
                                      "medusa": m.to_dict(), "identical": same}), flush=True)
                else:
                    print(m.text.strip() + "\n", flush=True)
    tps = {k: n / s if s > 0 else 0.0 for k, (n, s) in totals.items()}
    ratio = tps["medusa"] / tps["vanilla"] if tps["vanilla"] else float("nan")
    summary = {
        "prompts": len(prompts), "repeats": args.repeats,
        "vanilla_tokens_per_second": round(tps["vanilla"], 2),
        "medusa_tokens_per_second": round(tps["medusa"], 2), "speedup": round(ratio, 3),
        "mean_accepted": round(accepted / max(steps, 1), 3), "compile_seconds": round(compile_s, 1),
        "greedy_mismatches": mismatches if greedy else None, "interrupted": interrupted,
    }
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        print(f"vanilla: {tps['vanilla']:.1f} tok/s   medusa: {tps['medusa']:.1f} tok/s   "
              f"speedup: {ratio:.2f}x   mean accepted/step: {summary['mean_accepted']:.2f}   "
              f"(compile {compile_s:.0f}s, {len(prompts)} prompts x {args.repeats} rounds)")
        if greedy:
            print("greedy outputs identical: " + ("yes" if mismatches == 0 else f"NO ({mismatches} differ)"))
    if interrupted:
        print("interrupted: the figures above cover the rounds run so far", file=sys.stderr)
        return 130
    return 1 if mismatches else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except MedusaError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `decode.py --json | head -n 1`): stop quietly; point stdout
        # at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
