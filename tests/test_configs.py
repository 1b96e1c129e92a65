"""The shipped run configs parse, overrides are checked, and train.py reports user errors in
one line (exit status 2) and has help for every subcommand."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import yaml

from medusa_jax.config import ConfigError
from medusa_jax.sharding import ShardingError
from medusa_jax.training.run_config import RunConfig, load_run_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _train_cli():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.yaml", "smollm2_medusa1.yaml", "smollm2_medusa2.yaml",
            "vicuna7b_medusa2_pod.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_every_key_is_used(path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    with open(path) as f:
        written = _leaves(yaml.safe_load(f))
    resolved = _leaves(to_dict(cfg))
    for key, value in written.items():  # no key is lost or silently ignored
        assert key in resolved, key
        want = float(value) if isinstance(resolved[key], float) else value
        assert resolved[key] == want, key
    assert cfg.train.mode in os.path.basename(path) or os.path.basename(path) == "tiny.yaml"


def test_recipes():
    m1 = load_run_config(os.path.join(ROOT, "configs", "smollm2_medusa1.yaml"))
    assert (m1.medusa.num_heads, m1.medusa.num_layers, m1.medusa.shared_lm_head) == (5, 1, True)
    assert m1.train.cache_hidden and m1.medusa.draft_vocab_size == 4096
    assert m1.train.peak_heads_lr == 1e-3 and m1.train.warmup_ratio == 0.1
    assert m1.train.schedule == "cosine" and m1.train.decay == 0.8
    m2 = load_run_config(os.path.join(ROOT, "configs", "smollm2_medusa2.yaml"))
    assert m2.train.kd and m2.train.peak_heads_lr == pytest.approx(4 * m2.train.base_lr)
    assert m2.train.heads_warmup_steps > 0
    pod = load_run_config(os.path.join(ROOT, "configs", "vicuna7b_medusa2_pod.yaml"))
    assert pod.medusa.num_heads == 5 and pod.model.dtype == "bfloat16"
    assert pod.model.remat_policy == "full" and pod.train.seq_len == 2048
    assert pod.mesh.fsdp == -1


@pytest.mark.parametrize("override,match", [
    ("train.steps=abc", "train.steps: expected int"),
    ("train.stepz=5", "unknown key 'train.stepz'"),
    ("data.eval_fraction=2", "eval_fraction"),
    ("model.dtype=fp8", "model.dtype"),
    ("steps", "not key=value"),
])
def test_bad_override_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(TINY, [override])


def test_bad_mesh_is_a_sharding_error():
    with pytest.raises(ShardingError, match="mesh axis data=0"):
        load_run_config(TINY, ["mesh.data=0"])


def test_overrides_apply_in_order():
    cfg = load_run_config(TINY, ["train.steps=3", "--set", "train.steps=5",
                                 "--set=log.every_steps=2"])
    assert cfg.train.steps == 5 and cfg.log.every_steps == 2
    paths = cfg.replace(checkpoint=cfg.checkpoint.__class__(dir="/tmp/x")).paths()
    assert paths.metrics == "/tmp/x/metrics.jsonl" and paths.checkpoints == "/tmp/x/checkpoints"


@pytest.mark.parametrize("command", ["distill", "medusa1", "medusa2"])
def test_help_for_each_subcommand(command, capsys):
    cli = _train_cli()
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_user_errors_exit_2_without_traceback(capsys, tmp_path):
    cli = _train_cli()
    assert cli.main(["medusa1", "--config", TINY, "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.steps: expected int") and "Traceback" not in err
    assert cli.main(["medusa1", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # medusa1 forces train.mode, so a Medusa-2-only setting is refused
    assert cli.main(["medusa1", "--config", TINY, "--set", "train.kd=true"]) == 2
    assert "kd=True needs mode='medusa2'" in capsys.readouterr().err
    # a misspelt key: one line naming it and the key it is close to
    assert cli.main(["medusa1", "--config", TINY, "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'train.stepz'") and err.count("\n") == 1
    assert "did you mean 'train.steps'?" in err


def test_print_config_resolves_mode(capsys):
    cli = _train_cli()
    assert cli.main(["medusa2", "--config", TINY, "train.steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["mode"] == "medusa2" and printed["train"]["steps"] == 3
