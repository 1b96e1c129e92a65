"""train.py's bad-input paths: each is one ``error:`` line with exit status 2, found before the
slow part (the model load), and none of them costs an existing output file its contents; a
damaged tokenised-data cache is rebuilt instead."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import types

import numpy as np
import pytest

from medusa_jax.training.prepare import prepare_data
from medusa_jax.training.run_config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
OLD = '{"id": "old", "conversations": [{"from": "human", "value": "hi"}]}\n'


def _train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model_load(monkeypatch):
    """Every check here must come before the model load: loading one fails the test."""

    class Refused:
        @staticmethod
        def load(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was checked")

    fake = types.ModuleType("medusa_jax.api")
    fake.MedusaLM = Refused
    monkeypatch.setitem(sys.modules, "medusa_jax.api", fake)


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("resume", [False, True], ids=["no_resume", "resume"])
def test_distill_without_usable_conversations_exits_2_and_keeps_the_output(
        tmp_path, capsys, no_model_load, resume):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json\n{"id": "x", "conversations": [{"from": "robot", "value": "x"}]}\n')
    out = tmp_path / "out.jsonl"
    out.write_text(OLD)
    args = ["distill", "--data", str(bad), "--out", str(out), "--max-conversations", "2",
            "--max-new-tokens", "8"] + (["--no-resume"] if not resume else [])
    assert _train_cli().main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no usable conversations" in line and "bad.jsonl" in line
    assert "invalid_json=1" in line and "unknown_role=1" in line
    assert out.read_text() == OLD
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out.jsonl"]  # no temporary left


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_distill_out_that_cannot_be_a_file_exits_2_before_the_model_load(
        tmp_path, capsys, no_model_load, data_file, where):
    out = tmp_path / "outdir"
    if where == "directory":
        out.mkdir()
    else:
        out.write_text(OLD)
        out = out / "x.jsonl"
    assert _train_cli().main(["distill", "--data", data_file, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and str(tmp_path / "outdir") in line
    assert ("is a directory" if where == "directory" else "is a file") in line


def test_checkpoint_dir_that_is_a_file_exits_2_before_the_data(tmp_path, capsys, monkeypatch,
                                                                 data_file):
    import medusa_jax.training.loop as loop

    def refused(*args, **kwargs):
        raise AssertionError("the data was prepared before checkpoint.dir was checked")

    monkeypatch.setattr(loop, "prepare_data", refused)
    run_file = tmp_path / "run"
    run_file.write_text("not a directory")
    args = ["medusa1", "--config", TINY, f"data.path={data_file}", f"checkpoint.dir={run_file}",
            "devices=1"]
    assert _train_cli().main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "checkpoint.dir" in line and str(run_file) in line and "is a file" in line
    assert run_file.read_text() == "not a directory"
    # a path below a file, and cache_hidden's own entry point, are refused the same way
    assert _train_cli().main([*args[:4], f"checkpoint.dir={run_file}/sub", "devices=1",
                              "train.cache_hidden=true"]) == 2
    assert "checkpoint.dir" in _one_error_line(capsys.readouterr().err)


def test_truncated_data_cache_is_rebuilt(tmp_path, data_file, caplog):
    cfg = load_run_config(TINY, [f"data.path={data_file}", f"checkpoint.dir={tmp_path}"])
    first = prepare_data(cfg)
    with open(first.cache_file, "r+b") as f:  # a write cut short (disk full, killed copy)
        f.truncate(os.path.getsize(first.cache_file) // 2)
    with caplog.at_level(logging.WARNING, logger="medusa_jax.train"):
        again = prepare_data(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be read" in warnings[0]
    assert "rebuilding" in warnings[0] and first.cache_file in warnings[0]
    for key, value in first.train.items():
        np.testing.assert_array_equal(again.train[key], value)
    assert again.report == first.report
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medusa_jax.train"):
        prepare_data(cfg)  # the rebuilt cache is whole again
    assert any("from the cache" in r.getMessage() for r in caplog.records)


def test_held_out_split_stays_put_when_the_file_grows(tmp_path):
    """The held-out conversations are chosen by a hash of their ids: appending records (the
    distiller resumed) or reordering the file moves none of them across the split."""
    import re

    from medusa_jax.training.prepare import load_run_tokenizer

    def rec(i):
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                 {"from": "gpt", "value": f"answer {i}."}]}

    def held_out(records, name):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = load_run_config(TINY, [f"data.path={path}", f"checkpoint.dir={tmp_path / name}.run",
                                     "data.mode=pad", "data.eval_fraction=0.2"])
        data, tok = prepare_data(cfg), load_run_tokenizer(cfg)

        def ids(arrays):
            return {int(q) for row in arrays["input_ids"]
                    for q in re.findall(r"question (\d+)", tok.decode(row.tolist()))}

        train, ev = ids(data.train), ids(data.eval)
        assert not train & ev and len(train | ev) == len(records)
        return ev

    small = held_out([rec(i) for i in range(60)], "small.jsonl")
    grown = [rec(i) for i in range(180)]
    big = held_out(grown, "big.jsonl")
    assert big & set(range(60)) == small  # the first 60 kept their sides
    assert 0.1 < len(big) / 180 < 0.3
    rng = np.random.default_rng(0)
    assert held_out([grown[i] for i in rng.permutation(180)], "shuffled.jsonl") == big
