"""How long ``decode.py`` takes from the shell to its answer on the default model, with the
package's user cache off, cold (an empty folder) and warm (filled by the cold run), interleaved
over rounds; and the GGUF header parse, gguf-py's reader against ours, side by side.

    python benchmarks/bench_startup.py --rounds 3

Each run is a fresh process (`decode.py --prompt ... --max-new-tokens 32 --json`), so its wall
time includes Python and JAX imports, reading the GGUF file, building (or reading) the
tokenizer, compiling (or reading) the decode loops and generating 32 tokens. Writes
benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _common as C

PROMPT = "Name three colours."


def run_decode(cache: str, max_new: int) -> dict:
    env = dict(os.environ, MEDUSA_JAX_CACHE=cache, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(C.REPO, "decode.py"), "--prompt", PROMPT,
                        "--max-new-tokens", str(max_new), "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"decode.py failed: {p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "compile_s": out["compile_seconds"], "token_ids": out["token_ids"]}


def header_parse(rounds: int) -> dict:
    import gguf

    from medusa_jax.tokenizer import default_model_path
    from medusa_jax.weights.gguf import _field_value
    from medusa_jax.weights.gguf_header import read_header

    path = default_model_path()
    times: dict[str, list[float]] = {"gguf-py": [], "ours": []}
    for i in range(rounds):
        for name in C.rotated(list(times), i):
            t = time.perf_counter()
            if name == "gguf-py":
                r = gguf.GGUFReader(path)
                {k: _field_value(f) for k, f in r.fields.items()}
            else:
                read_header(path)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(C.REPO, "benchmarks", "results", "startup.md"))
    args = ap.parse_args(argv)
    info = C.machine_info()
    rows: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
    for i in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix="startup_cache_")
        try:
            order = C.rotated(["off", "cold-then-warm"], i)
            for what in order:
                if what == "off":
                    rows["off"].append(run_decode("off", args.max_new_tokens))
                else:  # the warm run needs the cold run's cache: these two go in this order
                    rows["cold"].append(run_decode(tmp, args.max_new_tokens))
                    rows["warm"].append(run_decode(tmp, args.max_new_tokens))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.2f}s" for k, v in rows.items()),
              file=sys.stderr)
    same = all(r["token_ids"] == rows["off"][0]["token_ids"] for v in rows.values() for r in v)
    med = {k: {"wall_s": statistics.median(r["wall_s"] for r in v),
               "compile_s": statistics.median(r["compile_s"] for r in v)} for k, v in rows.items()}
    parse = header_parse(max(3, args.rounds))
    info["load_average_at_end"] = C.load_average()
    md = ["# decode.py start-up: the user cache off, cold and warm\n",
          f"Command: `{C.command_line()}`\n", C.machine_md(info), "",
          f"`decode.py --prompt {PROMPT!r} --max-new-tokens {args.max_new_tokens} --json` on the "
          f"default model (SmolLM2-135M-Instruct, shipped heads), each a fresh process; "
          f"medians of {args.rounds} interleaved rounds. \"off\": `MEDUSA_JAX_CACHE=off` "
          "(tokenizer built from the GGUF file, every program compiled); \"cold\": an empty "
          "cache folder (the same work, then both are saved); \"warm\": the next run on that "
          "folder.\n",
          C.md_table(["user cache", "wall s", "compile s (in the decode call)"],
                     [(k, v["wall_s"], v["compile_s"]) for k, v in med.items()]), "",
          f"Warm / off wall time: **{med['warm']['wall_s'] / med['off']['wall_s']:.2f}x**. "
          f"Same tokens in every run: {'yes' if same else 'NO'}.\n",
          "GGUF header parse of the default model (metadata + tensor table), medians:\n",
          C.md_table(["reader", "seconds"], [(k, v) for k, v in parse.items()])]
    data = {"machine": info, "runs": rows, "medians": med, "same_tokens": same,
            "header_parse_s": parse, "command": C.command_line()}
    C.write_results(args.out, "\n".join(md), data)
    print("\n".join(md))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
