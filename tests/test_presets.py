"""Random-weight presets (``--random-weights --preset``, ``MedusaLM.from_preset``): shapes that
match the models they name, a forward that runs, EOS ignored, and one clear error for bad
input (exit 2 in decode.py, before anything is built)."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import decode  # noqa: E402
from medusa_jax.config import ConfigError  # noqa: E402
from medusa_jax.presets import preset_config, preset_heads, random_params  # noqa: E402


def test_smollm2_preset_has_the_default_models_shape_and_its_heads_fit():
    from medusa_jax.weights import load_model_config
    from medusa_jax.weights.medusa_io import load_heads

    mine = dataclasses.asdict(preset_config("smollm2-135m", "float32"))
    real = dataclasses.asdict(load_model_config(None))
    diff = {k for k in mine if mine[k] != real[k]}
    assert diff <= {"eos_token_ids", "rms_norm_eps"}, diff  # the GGUF stores eps in float32
    assert mine["eos_token_ids"] == () and np.isclose(mine["rms_norm_eps"], real["rms_norm_eps"])
    mcfg, _ = load_heads(preset_heads("smollm2-135m"),
                         base_cfg=preset_config("smollm2-135m", "float32"))
    assert mcfg.hidden_size == 576 and preset_heads("llama2-7b") is None


def test_llama2_7b_preset_is_the_aot_shape():
    from medusa_jax.aot import MODEL_PRESETS

    cfg = preset_config("llama2-7b", "bfloat16")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    for k, v in MODEL_PRESETS["llama2-7b"].items():
        assert getattr(cfg, k) == v, k
    assert 6.5e9 < cfg.num_params < 7e9


def test_random_weights_forward_runs_and_ignores_eos():
    from medusa_jax.api import MedusaLM

    lm = MedusaLM.from_preset("tiny", medusa=None)
    assert lm.eos_token_ids == () and lm.cfg.eos_token_ids == ()
    out = lm.generate([[5, 6, 7], [2, 2]], max_new_tokens=6)  # id 2 is the tiny config's EOS
    assert [o.num_new_tokens for o in out] == [6, 6]
    p1 = random_params(preset_config("tiny", "float32"), seed=1)
    assert not np.allclose(np.asarray(p1["embed"]["embedding"]),
                           np.asarray(lm.params["base"]["embed"]["embedding"]))


def test_decode_cli_with_random_weights(capsys):
    rc = decode.main(["--random-weights", "--preset", "tiny", "--prompt", "hi", "--json",
                      "--max-new-tokens", "5", "--no-stream", "--raw"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["num_new_tokens"] == 5


@pytest.mark.parametrize("argv, message", [
    (["--random-weights", "--preset", "llama-9b"], "unknown preset 'llama-9b': choose one of"),
    (["--random-weights"], "--random-weights needs --preset NAME (llama2-7b, smollm2-135m"),
    (["--preset", "tiny"], "--preset names the shape of --random-weights"),
    (["--random-weights", "--preset", "tiny", "--model", "x.gguf"], "drop --model"),
], ids=["unknown", "no-preset", "preset-alone", "with-model"])
def test_bad_random_weight_flags_are_one_clear_error(argv, message, monkeypatch, capsys):
    import medusa_jax.api as api

    def no_build(*a, **k):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(api.MedusaLM, "from_preset", no_build)
    monkeypatch.setattr(api.MedusaLM, "load", no_build)
    rc = decode.main([*argv, "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_unknown_preset_in_the_library_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'x': choose one of llama2-7b"):
        preset_config("x")
