"""Every benchmark script runs end to end at tiny settings and records what it measured on
(machine, date, git commit), so none can rot between the runs that produce the README's
figures (bench_sampling once did: it called a helper whose signature had changed). The numbers
themselves are not checked here: the benchmarks measure speed, the tests behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = os.path.join(REPO, "medusa_jax", "assets", "heads", "smollm2-135m-instruct")

# script -> its smallest arguments; --out is added (a prefix: each writes <out>.json and its
# Markdown next to it)
SMALL = {
    "bench_accept_domain": ["--prompts", "1", "--max-new-tokens", "8"],
    "bench_decode": ["--num-prompts", "1", "--max-new-tokens", "8"],
    "bench_distill": ["--conversations", "4", "--batch-size", "2", "--max-new-tokens", "8",
                      "--stacked-kv"],
    "bench_drafting": ["--num-prompts", "1", "--max-new-tokens", "8"],
    "bench_projections": ["--questions", "1", "--rounds", "1", "--max-new-tokens", "8"],
    "bench_rows": ["--rows", "1,2", "--rounds", "1"],
    "bench_startup": ["--rounds", "1", "--max-new-tokens", "4"],
    "bench_streaming": ["--num-prompts", "1", "--max-new-tokens", "8"],
    "bench_train": ["--batch-size", "1", "--seq-len", "32", "--rounds", "1"],
    "bench_tree_cost": ["--num-prompts", "1", "--max-new-tokens", "8", "--sizes", "1,4",
                        "--repeats", "1"],
    "choose_tree": ["--heads", HEADS, "--sizes", "2", "--num-prompts", "1",
                    "--max-new-tokens", "8"],
    "profile_refill_step": ["--batch-sizes", "2", "--prompt-tokens", "32", "--steps", "2",
                            "--max-new-tokens", "8", "--profile-batch", "2",
                            "--layouts", "unrolled,unrolled-stacked,scan"],
    "profile_step": ["--trees", "cpu", "--max-new-tokens", "8"],
    "bench_mtbench": ["--questions", "1", "--max-new-tokens", "8", "--torch-questions", "1"],
    "step_cost": ["--models", "smollm2-135m", "--targets", "cpu", "--batches", "1",
                  "--caches", "256", "--trees", "chain4"],
}
# these take the Markdown file itself as --out (the JSON goes next to it, same stem)
MARKDOWN_OUT = {"bench_train", "step_cost"}


def test_every_benchmark_script_is_listed():
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "benchmarks"))
               if f.endswith(".py") and not f.startswith("_")}
    # run elsewhere: bench_sampling (test_bad_input), device_check (test_device_check, its
    # --smoke mode); left out: tpu_aot_report, whose every row is a TPU compile of a 7B model
    # (minutes each; its compiler entry points are tested in test_aot)
    elsewhere = {"bench_sampling", "device_check", "tpu_aot_report"}
    assert scripts - elsewhere == set(SMALL), "a benchmark without a smoke run here"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_benchmark_runs_and_records_its_machine(name, tmp_path):
    out = tmp_path / ("result.md" if name in MARKDOWN_OUT else "result")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"),
                        *SMALL[name], "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    machine = res["machine"]
    assert machine["date_utc"] and machine["cpu_model"] and machine["jax_backend"] == "cpu"
    # the model name alone does not tell an AVX-512 host from one without (3x apart)
    assert machine["cpu_family"] is not None and machine["cpu_vector"]
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert machine["git_head"] == (head or None)
    if name == "bench_distill":  # it times what `train.py distill` runs, not the scanned layout
        assert res["layers"] == "unrolled"
    if name == "profile_refill_step":
        # the ceiling is timed over the cache a distillation run has: a 32-token prompt padded to
        # 64 plus the 8-token answer budget, not just the steps timed
        assert [(r["cache_slots"], r["steps"]) for r in res["rows"]] == [(64 + 8, 2)] * 3
    if name == "profile_step":  # the ops of both loops are attributed to their phases
        for loop in ("vanilla", "medusa-cpu"):
            prof = res["profiles"][loop]
            phases = {g["phase"] for g in prof["groups"] if g["ms_per_step"] > 0}
            assert {"verify", "accept", "commit"} <= phases, (loop, phases)
            assert ("propose" in phases) == (loop != "vanilla")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("result") and n != "result.json" for n in written), written
