"""YAML + override loading of nested frozen dataclasses (load_config in
medusa_jax.training.run_config, on OmegaConf)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from medusa_jax.config import ConfigError, ModelConfig
from medusa_jax.training.run_config import TrainConfig, dump_yaml, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 100
    kd: bool = False
    mode: Literal["medusa1", "medusa2"] = "medusa1"
    optim: Optim = Optim()
    layers: tuple[int, ...] = (0, 1)

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "run"
    out_dir: str | None = None
    train: Train = Train()
    extra: Optim | None = None
    tags: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Needs:
    size: int  # no default


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_without_file_or_overrides():
    assert load_config(Run, None, []) == Run()


def test_nested_yaml_tuples_optional_and_int_to_float(tmp_path):
    path = _yaml(tmp_path, """
name: exp1
out_dir: null
train:
  steps: 7
  kd: yes
  optim: {lr: 1e-4, betas: [0.8, 0.9], clip: null}
  layers: [2, 3, 4]
extra: {lr: 2}
tags: {a: 1}
""")
    cfg = load_config(Run, path, [])
    assert cfg.name == "exp1" and cfg.out_dir is None
    assert cfg.train.steps == 7 and cfg.train.kd is True
    # PyYAML reads "1e-4" as a string; a float field must still take it
    assert cfg.train.optim == Optim(lr=1e-4, betas=(0.8, 0.9), clip=None)
    assert cfg.train.layers == (2, 3, 4) and isinstance(cfg.train.layers, tuple)
    assert cfg.extra == Optim(lr=2.0) and isinstance(cfg.extra.lr, float)
    assert cfg.tags == {"a": 1}


def test_override_syntaxes_and_value_parsing():
    cfg = load_config(Run, None, [
        "--set", "train.optim.lr=1e-3", "train.kd=true", "--set=train.layers=[5,6]",
        "name=007", "out_dir=/tmp/x", "extra.clip=null", "train.mode=medusa2",
    ])
    assert cfg.train.optim.lr == 1e-3
    assert cfg.train.kd is True
    assert cfg.train.layers == (5, 6)
    assert cfg.name == "007"  # a str field keeps the override text (YAML would say int 7)
    assert cfg.out_dir == "/tmp/x"
    assert cfg.extra == Optim(clip=None)  # an Optional section is created by a dotted override
    assert cfg.train.mode == "medusa2"


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("yes", True), ("off", False), ("True", True),
])
def test_bool_parsing(text, expected):
    assert load_config(Run, None, [f"train.kd={text}"]).train.kd is expected


@pytest.mark.parametrize("value", ["1", "'true'", "maybe"])
def test_bool_rejects_non_bools(value):
    with pytest.raises(ConfigError, match=r"train\.kd: expected bool"):
        load_config(Run, None, [f"train.kd={value}"])


def test_override_precedence_over_yaml(tmp_path):
    path = _yaml(tmp_path, "train:\n  steps: 7\n  kd: true\nname: from_yaml\n")
    cfg = load_config(Run, path, ["train.steps=9", "train.steps=11"])
    assert cfg.train.steps == 11  # later overrides win
    assert cfg.train.kd is True and cfg.name == "from_yaml"  # untouched YAML keys stay
    # a mapping override merges into the YAML section instead of replacing it
    cfg = load_config(Run, path, ["train={steps: 3}"])
    assert cfg.train.steps == 3 and cfg.train.kd is True


def test_unknown_keys_name_the_key_and_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Run, _yaml(tmp_path, "train:\n  stepz: 3\n"), [])
    msg = str(e.value)
    assert "'train.stepz'" in msg and "kd, layers, mode, optim, steps" in msg
    assert "did you mean 'train.steps'?" in msg  # the close matches, by their full path
    with pytest.raises(ConfigError, match=r"unknown key 'nme'.*top level.*name"):
        load_config(Run, None, ["nme=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.optim.momentum'.*betas, clip, lr"):
        load_config(Run, None, ["--set", "train.optim.momentum=0.9"])


def test_type_mismatches_name_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got 'abc'$"):
        load_config(Run, None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 1\.5"):
        load_config(Run, _yaml(tmp_path, "train: {steps: 1.5}\n"), [])
    with pytest.raises(ConfigError, match=r"train\.optim\.lr: expected float, got 'fast'"):
        load_config(Run, None, ["train.optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.layers\[1\]: expected int, got 'x'"):
        load_config(Run, None, ["train.layers=[1, x]"])
    with pytest.raises(ConfigError, match=r"train\.optim\.betas: expected 2 items"):
        load_config(Run, None, ["train.optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"train\.mode: expected one of 'medusa1', 'medusa2'"):
        load_config(Run, None, ["train.mode=medusa3"])
    with pytest.raises(ConfigError, match=r"train: expected a mapping of Train fields"):
        load_config(Run, _yaml(tmp_path, "train: 5\n"), [])
    with pytest.raises(ConfigError, match=r"name: expected str, got 5"):
        load_config(Run, _yaml(tmp_path, "name: 5\n"), [])


def test_post_init_errors_pass_through():
    with pytest.raises(ConfigError, match=r"^steps must be a positive integer, got 0$"):
        load_config(Run, None, ["train.steps=0"])
    # the project's own config classes: their messages come through unchanged
    with pytest.raises(ConfigError, match=r"mode='medusa9' must be one of"):
        load_config(TrainConfig, None, ["mode=medusa9"])


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key\(s\) size"):
        load_config(Needs, None, [])
    assert load_config(Needs, None, ["size=3"]) == Needs(3)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, _yaml(tmp_path, "- 1\n- 2\n"), [])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, _yaml(tmp_path, "train: {steps: [\n"), [])
    assert load_config(Run, _yaml(tmp_path, ""), []) == Run()  # empty file: defaults


@pytest.mark.parametrize("tokens,match", [
    (["--set"], "needs a key=value"),
    (["train.steps"], "is not key=value"),
    (["--steps=3"], "unrecognised override"),
    (["train..steps=3"], "not a dotted key"),
])
def test_malformed_override_tokens(tokens, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, None, tokens)


def test_to_dict_and_dump_yaml_round_trip(tmp_path):
    cfg = load_config(Run, None, ["train.optim.betas=[0.5, 0.6]", "extra={lr: 0.1}",
                                  "tags={x: 2}", "out_dir=/ckpt"])
    d = to_dict(cfg)
    assert d["train"]["optim"]["betas"] == [0.5, 0.6]  # tuples become YAML lists
    path = dump_yaml(cfg, tmp_path / "sub" / "config.yaml")
    assert yaml.safe_load(open(path)) == d
    assert load_config(Run, path, []) == cfg
    # the project's configs round-trip too (head_dim is computed but is an init field)
    mc = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, eos_token_ids=(2, 3))
    assert load_config(ModelConfig, dump_yaml(mc, tmp_path / "m.yaml"), []) == mc
    tc = TrainConfig(mode="medusa2", heads_lr=None, grad_clip=None)
    assert load_config(TrainConfig, dump_yaml(tc, tmp_path / "t.yaml"), []) == tc
