"""benchmarks/device_check.sh: the smoke mode runs on this CPU and writes its report (so the
script cannot rot before an accelerator runs it), and bad input is one clear error."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.sh")


def _run(*args, out=None, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the suite's 8 virtual devices are not the check's business
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_smoke_run_writes_json_and_markdown(tmp_path):
    p = _run("--smoke", out=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "device_check.json").read_text())
    md = (tmp_path / "device_check.md").read_text()
    assert rep["smoke"] and rep["backend"] == "cpu" and rep["attention_impl"] == "xla"
    assert "CPU smoke run" in md and rep["skipped"] == [] and rep["errors"] == []
    runs = {(r["kind"], r["batch"], r["tree_nodes"]) for r in rep["runs"]}
    for batch in (1, 2):  # vanilla, oracle and heads, chain and 63-node tree, both batches
        for kind in ("medusa-oracle", "medusa-heads"):
            assert {("vanilla", batch, 1), (kind, batch, 5), (kind, batch, 64)} <= runs
    miss = [r for r in rep["runs"] if r["kind"] == "medusa-oracle-miss"]
    assert [(r["batch"], r["tree_nodes"]) for r in miss] == [(1, 64), (1, 5), (1, 64)]
    assert all(r["mean_accepted"] == 1.0 and r["oracle_passes"] == 1 for r in miss)
    first = rep["runs"][1]
    assert first["kind"] == "medusa-oracle" and first["tree_nodes"] == 64
    # the oracle accepts the full depth (root + 4) except on its last, truncated step
    max_new = rep["plan"]["max_new"]
    steps = -(-max_new // 5)
    assert first["mean_accepted"] >= (5 * (steps - 1) + 1) / steps
    # float32 on a CPU: greedy Medusa is vanilla, token for token
    assert all(e["identical_rows"] == len(e["rows"]) for e in rep["equality"].values())
    kinds = [c["kind"] for c in rep["compiler"]]
    assert kinds == ["vanilla", "medusa"], rep["compiler"]
    assert all(c["bytes"] > 0 and c["cache_copies"] == 0 for c in rep["compiler"])
    # the profile attributes (nearly) every op of both steps to a phase of the step
    prof = rep["profile"]
    assert (prof["model"], prof["batch"], prof["tree_nodes"]) == ("tiny", 1, 64)
    for name, phases in (("vanilla", {"verify", "accept", "commit"}),
                         ("medusa", {"propose", "verify", "accept", "commit"})):
        s = prof[name]
        totals = {g["phase"]: 0.0 for g in s["groups"]}
        for g in s["groups"]:
            totals[g["phase"]] += g["ms_per_step"]
        assert phases <= {p for p, ms in totals.items() if ms > 0}, (name, totals)
        assert totals.get("unattributed", 0.0) < 0.1 * s["op_ms_per_step"], (name, totals)
    assert prof["medusa"]["steps"] == steps and prof["vanilla"]["steps"] == max_new - 1
    assert "## Where a step's time goes" in md and "| verify | MLP |" in md
    v = rep["variants"]["command_buffer"]
    assert "error" not in v, v
    assert v["medusa"]["mean_accepted"] > 1 and "| command_buffer |" in md


@pytest.mark.parametrize("args, message", [
    ((), "no accelerator found (JAX sees only the CPU)"),
    (("--smoke", "--budget-s", "-1"), "--budget-s must be > 0"),
], ids=["no-accelerator", "bad-budget"])
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    p = _run(*args, out=tmp_path, timeout=120)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and message in err[0], p.stderr[-1000:]
    assert not (tmp_path / "device_check.json").exists()


def test_oracle_reruns_on_its_own_output_when_it_leaves_the_reference():
    """In bf16 a verification can flip a near-tie, and then vanilla's tokens are no longer the
    path Medusa is on: the H200's first 7B oracle run accepted 1.07 per step after diverging at
    token 10. A reference that is wrong from token 4 on stands in for that here: the first pass
    accepts only the root from there; the rerun on Medusa's own output accepts the full depth."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import device_check as dc

    m = dc.Model("tiny", "float32")
    prompts = dc._prompts(m.cfg, 2, 8)
    van = dc.run_vanilla(m, prompts, 12)
    wrong = [list(t[:4]) + [(x + 1) % m.cfg.vocab_size for x in t[4:]] for t in van["tokens"]]
    once = dc.run_medusa(m, prompts, 12, 5, "oracle", wrong, passes=1)
    again = dc.run_medusa(m, prompts, 12, 5, "oracle", wrong)
    assert once["oracle_passes"] == 1 and once["mean_accepted"] < 2
    assert again["oracle_passes"] == 2 and again["oracle_first_accepted"] == once["mean_accepted"]
    assert again["tokens"] == once["tokens"] == van["tokens"]  # the proposal never changes output
    assert again["mean_accepted"] >= (5 * 2 + 2) / 3  # 12 tokens: 5 + 5 + the last 2
    assert "(pass 2; first" in dc._accepted(again) and "pass" not in dc._accepted(once)


def test_the_commit_named_by_the_caller_wins_over_a_stale_git(monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import device_check as dc

    monkeypatch.setenv("MEDUSA_COMMIT", "1ad1c4f")
    assert dc._commit() == "1ad1c4f"
    monkeypatch.delenv("MEDUSA_COMMIT")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert dc._commit().split("+")[0] == head
