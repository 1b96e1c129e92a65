"""The training loop end to end on the tiny model (configs/tiny.yaml, byte-level tokenizer):
resume equals an uninterrupted run, SIGTERM saves and a rerun resumes, checkpoints move between
meshes, Medusa-1 keeps the base bit-identical, Medusa-2 exports heads and base, bad data."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medusa_jax.model.heads import MedusaHeads
from medusa_jax.sharding import MeshConfig, make_mesh
from medusa_jax.training.checkpoint import (
    CheckpointError,
    TrainCheckpointer,
    checkpoint_tree,
    restore_checkpoint,
)
from medusa_jax.training.loop import Trainer, train
from medusa_jax.training.run_config import load_run_config
from medusa_jax.weights import load_hf_checkpoint
from medusa_jax.weights.medusa_io import load_heads, read_heads_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def overrides(run_dir, data_file, cache_dir, *extra):
    return [f"data.path={data_file}", f"data.cache_dir={cache_dir}", f"checkpoint.dir={run_dir}",
            "log.progress=false", "checkpoint.every_steps=100", "devices=1", *extra]


def config(run_dir, data_file, cache_dir, *extra):
    return load_run_config(TINY, overrides(run_dir, data_file, cache_dir, *extra))


def train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every in-process run uses train.steps=6 (stopping early through should_stop where it needs
# fewer): the loop caches its jitted functions per configuration, so they compile once here.
STEPS = "train.steps=6"
MEDUSA2_KD = ("train.mode=medusa2", "train.kd=true", "train.heads_warmup_steps=1")


def stop_at(n):
    return lambda step: step >= n


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)



@pytest.mark.parametrize("extra", [(), MEDUSA2_KD], ids=["medusa1", "medusa2_kd"])
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data_file, cache_dir, extra):
    # Saving every 2 steps (in the background, while later steps reuse the donated buffers).
    settings = (STEPS, "checkpoint.every_steps=2", *extra)
    straight = Trainer(config(tmp_path / "a", data_file, cache_dir, *settings))
    s_a = straight.run()
    assert not s_a["interrupted"] and s_a["step"] == 6

    cfg_b = config(tmp_path / "b", data_file, cache_dir, *settings)
    s_b1 = train(cfg_b, should_stop=stop_at(3))
    assert s_b1["interrupted"] and s_b1["step"] == 3 and s_b1["eval"] is None
    assert TrainCheckpointer(tmp_path / "b" / "checkpoints").all_steps() == [2, 3]
    resumed = Trainer(cfg_b)
    s_b2 = resumed.run()
    assert s_b2["start_step"] == 3 and s_b2["step"] == 6 and not s_b2["interrupted"]

    tcfg = straight.tcfg
    final = host(checkpoint_tree(tcfg, straight.state))
    assert_trees_equal(final, host(checkpoint_tree(tcfg, resumed.state)), atol=1e-6)
    assert s_a["data_state"] == s_b2["data_state"]
    for key, value in s_a["eval"].items():
        np.testing.assert_allclose(value, s_b2["eval"][key], atol=1e-6)
    # The checkpoints on disk agree too, the last one with the final state.
    for step in (4, 6):
        a, meta_a = restore_checkpoint(tmp_path / "a" / "checkpoints", straight.model_cfg,
                                       straight.medusa_cfg, tcfg, straight.mesh, step)
        b, meta_b = restore_checkpoint(tmp_path / "b" / "checkpoints", straight.model_cfg,
                                       straight.medusa_cfg, tcfg, straight.mesh, step)
        assert_trees_equal(host(a), host(b), atol=1e-6)
        assert meta_a["data"] == meta_b["data"]
    assert_trees_equal(host(a), final)
    # The metrics file of the interrupted run holds each training step once.
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 7))
    assert lines[-1]["kind"] == "eval"


def test_sigterm_saves_and_a_rerun_resumes(tmp_path, data_file, cache_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "medusa1", "--config", TINY,
           f"data.path={data_file}", f"data.cache_dir={cache_dir}", f"checkpoint.dir={run_dir}",
           "train.steps=400", "checkpoint.every_steps=1000", "log.every_steps=1",
           "--set", "log.progress=false"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no metrics line within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "To resume" in err and "SIGTERM" in err
    saved = TrainCheckpointer(run_dir / "checkpoints").all_steps()
    assert len(saved) == 1 and 1 <= saved[0] < 400, saved

    rerun = subprocess.run([*cmd, "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["start_step"] == saved[0] and summary["step"] == 400
    assert not summary["interrupted"] and summary["eval"] is not None


@pytest.mark.parametrize("save_on,restore_on", [(8, 1), (1, 8)], ids=["8to1", "1to8"])
def test_checkpoint_restores_on_another_mesh(tmp_path, data_file, cache_dir, save_on, restore_on):
    mesh_args = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2") if save_on == 8 else ()
    tr = Trainer(config(tmp_path, data_file, cache_dir, STEPS, *MEDUSA2_KD,
                        f"devices={save_on}", *mesh_args))
    assert tr.run(should_stop=stop_at(2))["interrupted"]
    ref = host(checkpoint_tree(tr.tcfg, tr.state))
    if restore_on == 1:
        mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    else:
        mesh = make_mesh(MeshConfig(2, 2, 2))
    tree, meta = restore_checkpoint(tmp_path / "checkpoints", tr.model_cfg, tr.medusa_cfg,
                                    tr.tcfg, mesh)
    assert meta["data"]["index"] == 2
    assert {d for x in jax.tree.leaves(tree) for d in x.sharding.device_set} == set(
        mesh.devices.flat)
    if restore_on == 8:  # really split, not replicated
        emb = tree["params"]["base"]["embed"]["embedding"]
        assert len({str(s.index) for s in emb.addressable_shards}) > 1
    assert_trees_equal(host(tree), ref)


def test_damaged_or_foreign_checkpoint_is_a_clear_error(tmp_path, data_file, cache_dir, capsys):
    cfg = config(tmp_path, data_file, cache_dir, STEPS)
    train(cfg, should_stop=stop_at(2))
    other = config(tmp_path, data_file, cache_dir, STEPS, "medusa.num_heads=2")
    with pytest.raises(CheckpointError, match="medusa.num_heads"):
        train(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_checkpoint(tmp_path / "nowhere", None, None, cfg.train, None)
    for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:
            with open(os.path.join(dirpath, name), "w") as f:
                f.write("garbage")
    # the only step is unreadable: an error (never a silent fresh start), the step left alone
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read \(step 2: "):
        train(cfg)
    assert TrainCheckpointer(tmp_path / "checkpoints").all_steps() == [2]
    capsys.readouterr()
    args = ["medusa1", "--config", TINY, *overrides(tmp_path, data_file, cache_dir, STEPS)]
    assert train_cli().main(args) == 2
    gc.collect()  # orbax's abandoned read coroutines would print here
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "can be read (step 2: " in errors[0] and len(errors[0]) < 800
    assert "Traceback" not in err and "Exception ignored" not in err


def _truncate_data_files(step_dir):
    """Cut every array data file of a step to half (a copy or a write cut short)."""
    d = step_dir / "state" / "ocdbt.process_0" / "d"
    for name in os.listdir(d):
        with open(d / name, "r+b") as f:
            f.truncate(os.path.getsize(d / name) // 2)


def test_damaged_newest_checkpoint_falls_back_to_the_newest_readable(
        tmp_path, data_file, cache_dir, caplog, capsys):
    cfg = config(tmp_path, data_file, cache_dir, STEPS, "checkpoint.every_steps=1")
    train(cfg, should_stop=stop_at(2))
    ckpts = tmp_path / "checkpoints"
    _truncate_data_files(ckpts / "2")
    with caplog.at_level(logging.WARNING, logger="medusa_jax"):
        summary = train(cfg, should_stop=stop_at(3))
    gc.collect()
    assert summary["start_step"] == 1 and summary["step"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert w.startswith(f"checkpoint step 2 in {ckpts} cannot be read (") and "\n" not in w
    assert w.endswith("resuming from step 1") and len(w) < 800
    # set aside, so the resumed run saved step 2 afresh (a save skips an existing step)
    assert (tmp_path / "checkpoints.damaged" / "2").is_dir()
    assert TrainCheckpointer(ckpts).all_steps() == [2, 3]
    # a missing shard folder: the same, and the earlier set-aside is not overwritten
    shutil.rmtree(ckpts / "3" / "state" / "ocdbt.process_0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medusa_jax"):
        summary = train(cfg, should_stop=stop_at(4))
    gc.collect()
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert ["step 3" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith("medusa_jax")] == [True]
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert sorted(os.listdir(tmp_path / "checkpoints.damaged")) == ["2", "3"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_orbax_leftover_future_records_are_dropped_and_others_kept(caplog):
    """The fallback above depends on when orbax's abandoned futures are collected; this checks
    the filter itself on the records asyncio writes then (CI once logged an OCDBT read failure
    with no "TensorStore" in its text), and that an unrelated asyncio error still passes."""
    from medusa_jax.training import checkpoint as ckpt_mod

    ckpt_mod._drop_orbax_leftovers()
    log = logging.getLogger("asyncio")
    ocdbt = ValueError('FAILED_PRECONDITION: Error reading "opt_state.mu/0.0.0.0" in OCDBT '
                       'database at local file "/x/3/state/": Truncated Zstd-compressed stream')
    tstore = ValueError("OUT_OF_RANGE: TensorStore read failed")
    other = ValueError("something else went wrong")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for exc in (ocdbt, tstore, other):
            log.error("Future exception was never retrieved\nfuture: <Future finished "
                      "exception=%r>", exc, exc_info=(type(exc), exc, None))
    kept = [r.exc_info[1] for r in caplog.records if r.name == "asyncio"]
    assert kept == [other]


def test_medusa1_keeps_the_base_bit_identical_and_exports(tmp_path, data_file, cache_dir):
    tr = Trainer(config(tmp_path, data_file, cache_dir, STEPS))
    summary = tr.run()
    assert_trees_equal(host(tr.state.params["base"]), tr.base_host)
    heads_dir = summary["exports"]["heads"]
    mcfg, params = load_heads(heads_dir, tr.model_cfg)
    assert mcfg == tr.medusa_cfg
    assert_trees_equal(params, host(tr.state.params["medusa"]))
    meta = read_heads_metadata(heads_dir)
    assert meta["steps"] == 6 and len(meta["eval"]["head_top1"]) == 3
    # a tiny random base exists nowhere else, so the run exports it (unchanged) for decoding
    _, exported = load_hf_checkpoint(summary["exports"]["base"], scan_layers=True)
    assert_trees_equal(exported, tr.base_host)
    # The v1 layout stores each head's own copy of the base LM head.
    v1cfg, v1 = load_heads(summary["exports"]["heads_v1"], tr.model_cfg)
    np.testing.assert_array_equal(v1["res_kernel"], params["res_kernel"])
    np.testing.assert_array_equal(v1["lm_head"][0], tr.base_host["lm_head"])


def test_medusa2_exports_heads_and_base(tmp_path, data_file, cache_dir):
    tr = Trainer(config(tmp_path, data_file, cache_dir, STEPS, *MEDUSA2_KD))
    summary = tr.run()
    trained = host(tr.state.params)
    assert not np.array_equal(trained["base"]["lm_head"], tr.base_host["lm_head"])

    mcfg, heads = load_heads(summary["exports"]["heads"], tr.model_cfg)
    hidden = np.random.default_rng(0).standard_normal((2, 5, tr.model_cfg.hidden_size))
    module = MedusaHeads(mcfg)
    np.testing.assert_array_equal(
        module.apply({"params": heads}, hidden.astype(np.float32)),
        module.apply({"params": trained["medusa"]}, hidden.astype(np.float32)))

    cfg, base = load_hf_checkpoint(summary["exports"]["base"], scan_layers=True)
    assert cfg.vocab_size == tr.model_cfg.vocab_size
    assert_trees_equal(base, trained["base"])


def test_malformed_records_are_counted_and_an_empty_file_is_an_error(tmp_path, cache_dir, conversation):
    good = [json.dumps(conversation(i)) for i in range(40)]
    bad = ["{not json", json.dumps({"conversations": [{"from": "alien", "value": "hi"}]}),
           json.dumps({"messages": []}), json.dumps([1, 2, 3])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good[:20] + bad + good[20:]) + "\n")
    summary = train(config(tmp_path / "run", path, cache_dir, STEPS), should_stop=stop_at(1))
    report = summary["data"]
    assert report["records_read"] == 44 and report["kept"] == 40
    assert report["skipped"] == {"invalid_json": 1, "unknown_role": 1, "empty_conversation": 1,
                                 "not_a_dict": 1}
    assert "skipped 4" in report["summary"]

    junk = tmp_path / "junk.jsonl"
    junk.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match="no usable conversations"):
        train(config(tmp_path / "run2", junk, cache_dir, STEPS))
