"""Train, then decode what was trained: a Medusa-1 and a Medusa-2 run on the tiny model export
complete Hugging Face checkpoints (config, weights, tokenizer with its chat template, generation
config), and ``decode.py --model RUN`` decodes the run directory with its heads; greedy Medusa
equals greedy vanilla of the exported base, whose logits equal transformers'."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medusa_jax.training.loop import train
from medusa_jax.training.run_config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PROMPT = "count from 7"


@pytest.fixture(scope="module", params=["medusa1", "medusa2"])
def run_dir(request, tmp_path_factory, data_file):
    run = tmp_path_factory.mktemp(request.param)
    extra = ["train.mode=medusa2", "train.heads_warmup_steps=1"] if request.param == "medusa2" else []
    cfg = load_run_config(TINY, [f"data.path={data_file}", f"checkpoint.dir={run}",
                                 "log.progress=false", "train.steps=4", "devices=1", *extra])
    summary = train(cfg)
    assert summary["step"] == 4
    return str(run)


def _decode(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.mark.slow
def test_the_run_directory_decodes_with_its_heads(run_dir):
    base = os.path.join(run_dir, "base")
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(base, name)), name
    rows = _decode("--model", run_dir, "--compare", "--json", "--max-new-tokens", "12",
                   "--prompt", PROMPT)
    assert rows[0]["identical"] and rows[-1]["summary"]["greedy_mismatches"] == 0
    assert rows[0]["medusa"]["steps"] >= 1  # the run's heads were used
    # the exported base and heads named explicitly give the same tokens
    again = _decode("--model", base, "--medusa", os.path.join(run_dir, "heads"), "--json",
                    "--max-new-tokens", "12", "--prompt", PROMPT)
    assert again[0]["token_ids"] == rows[0]["medusa"]["token_ids"]


@pytest.mark.slow
def test_the_exported_base_loads_in_transformers(run_dir):
    import jax.numpy as jnp
    import torch
    import transformers

    from medusa_jax.model import llama
    from medusa_jax.tokenizer import load_tokenizer
    from medusa_jax.training.prepare import ByteTokenizer
    from medusa_jax.weights import load_base_model

    base = os.path.join(run_dir, "base")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    msgs = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ByteTokenizer().apply_chat_template(msgs, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == ByteTokenizer().encode(text) == load_tokenizer(base).encode(
        text, add_special_tokens=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    cfg, params = load_base_model(base)
    h, _ = llama.forward(cfg, params, jnp.asarray([ids]))
    ours = np.asarray(llama.logits(cfg, params, h))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    gen = transformers.GenerationConfig.from_pretrained(base)
    assert gen.eos_token_id == cfg.eos_token_ids[0]


@pytest.mark.slow
def test_a_checkpoint_without_tokenizer_says_so_and_takes_one(run_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(run_dir, "base", name), bare / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "decode.py"), "--model", str(bare),
                        "--prompt", PROMPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "no tokenizer files" in r.stderr and "--tokenizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    rows = _decode("--model", str(bare), "--tokenizer", os.path.join(run_dir, "base"),
                   "--medusa", "none", "--json", "--max-new-tokens", "4", "--prompt", PROMPT)
    assert rows[0]["num_new_tokens"] >= 1
