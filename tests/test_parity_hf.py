"""Logits parity of our Flax model, loaded by our loaders, against transformers' PyTorch models.

Tiny random configs of every supported family go through a real ``save_pretrained`` directory;
the real default model (SmolLM2-135M-Instruct, GGUF Q4_1) is compared with transformers' own
GGUF loader.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest
import torch
import transformers

from medusa_jax.config import RopeScaling, tiny_config
from medusa_jax.model import LlamaModel
from medusa_jax.weights import load_hf_checkpoint, save_hf_checkpoint
from medusa_jax.weights.layout import param_specs

TOL = 1e-4
HF_CONFIGS = {
    "LlamaForCausalLM": transformers.LlamaConfig,
    "Qwen2ForCausalLM": transformers.Qwen2Config,
    "MistralForCausalLM": transformers.MistralConfig,
}


def torch_model(cfg, seed=0, dtype=torch.float32):
    """A transformers model for ``cfg`` with every parameter random (norm scales and biases too,
    so a mix-up of any two tensors shows in the logits)."""
    hf_cfg = HF_CONFIGS[cfg.architecture](**cfg.to_hf_config(), attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.to(dtype).eval()


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def jax_logits(cfg, params, tokens):
    """Our ``[B, T, V]`` float32 logits for ``tokens: [B, T]``."""
    model = LlamaModel(cfg)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, x: m.logits(m(x)[0])))
    return np.asarray(fn(params, tokens))


def random_tokens(cfg, batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


CASES = {
    "mha_untied_mlp_bias": tiny_config(num_kv_heads=4, mlp_bias=True),
    "gqa_tied": tiny_config(tie_word_embeddings=True),
    "mqa": tiny_config(num_kv_heads=1),
    "head_dim_32": tiny_config(head_dim=32),
    "llama3_rope": tiny_config(
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=16),
    ),
    "linear_rope": tiny_config(rope_theta=5000.0, rope_scaling=RopeScaling("linear", 4.0)),
    "qwen2_bias": tiny_config(
        architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "mistral": tiny_config(architecture="MistralForCausalLM", num_kv_heads=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    cfg = CASES[name]
    model = torch_model(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokens = random_tokens(cfg)
    expected = torch_logits(model, tokens)
    assert np.abs(expected).max() > 1.0  # the random init is not trivially small
    got_cfg, params = load_hf_checkpoint(tmp_path)
    assert got_cfg.architecture == cfg.architecture
    assert got_cfg.rope_theta == cfg.rope_theta and got_cfg.rope_scaling == cfg.rope_scaling
    diff = np.abs(jax_logits(got_cfg, params, tokens) - expected).max()
    print(f"{name}: max abs logits diff {diff:.3g}")
    assert diff <= TOL, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_both_layouts(scan_layers, tmp_path):
    cfg = CASES["gqa_tied"]
    model = torch_model(cfg, seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    got_cfg, params = load_hf_checkpoint(tmp_path, scan_layers=scan_layers)
    assert got_cfg.scan_layers is scan_layers
    assert ("layers" in params) is scan_layers and ("layers_1" in params) is not scan_layers
    tokens = random_tokens(cfg, seed=1)
    diff = np.abs(jax_logits(got_cfg, params, tokens) - torch_logits(model, tokens)).max()
    assert diff <= TOL


def test_sharded_checkpoint(tmp_path):
    cfg = CASES["mha_untied_mlp_bias"]
    model = torch_model(cfg, seed=2)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    got_cfg, params = load_hf_checkpoint(tmp_path)
    tokens = random_tokens(cfg, seed=2)
    diff = np.abs(jax_logits(got_cfg, params, tokens) - torch_logits(model, tokens)).max()
    assert diff <= TOL


def test_bfloat16_checkpoint(tmp_path):
    """A bf16 checkpoint written by torch reads back bit-exactly (safetensors' numpy reader
    cannot do bf16; ours can)."""
    cfg = CASES["gqa_tied"]
    model = torch_model(cfg, seed=3, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    got_cfg, p32 = load_hf_checkpoint(tmp_path, dtype="float32", scan_layers=False)
    _, p16 = load_hf_checkpoint(tmp_path, dtype="bfloat16", scan_layers=False)
    assert got_cfg.param_dtype == "float32"
    assert p16["embed"]["embedding"].dtype.name == "bfloat16"
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    ours = p32["layers_1"]["attn"]["q_proj"].reshape(cfg.hidden_size, -1).T
    np.testing.assert_array_equal(ours, q)
    np.testing.assert_array_equal(p16["layers_1"]["attn"]["q_proj"].astype(np.float32),
                                  p32["layers_1"]["attn"]["q_proj"])


def _random_params(cfg, seed):
    """Our-layout random params for ``cfg`` with all leaves random (norm scales near 1)."""
    from medusa_jax.model import init_params

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    out = {}
    for path, s in flat:
        keys = [p.key for p in path]
        is_norm = keys[-1] == "scale"
        v = (1.0 if is_norm else 0.0) + 0.15 * rng.standard_normal(s.shape).astype(np.float32)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


@pytest.mark.parametrize("name,scan_layers", [("mha_untied_mlp_bias", True), ("qwen2_bias", False)])
def test_save_then_transformers_loads(name, scan_layers, tmp_path):
    cfg = CASES[name].replace(scan_layers=scan_layers)
    params = _random_params(cfg, seed=4)
    if scan_layers:  # JAX arrays on device must work as well as numpy
        params = jax.tree.map(jax.numpy.asarray, params)
    save_hf_checkpoint(cfg, params, tmp_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = random_tokens(cfg, seed=4)
    diff = np.abs(jax_logits(cfg, params, tokens) - torch_logits(model.eval(), tokens)).max()
    assert diff <= TOL
    # ... and our loader reads it back to the same arrays.
    got_cfg, back = load_hf_checkpoint(tmp_path, scan_layers=scan_layers)
    assert got_cfg == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)


def test_save_bfloat16(tmp_path):
    cfg = CASES["gqa_tied"]
    params = _random_params(cfg, seed=5)
    save_hf_checkpoint(cfg, params, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, back = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    expect = jax.tree.map(lambda a: a.astype(back["embed"]["embedding"].dtype), params)
    jax.tree.map(np.testing.assert_array_equal, expect, back)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------ the real default model
@pytest.fixture(scope="module")
def real(real_model, real_torch_model, real_hf_tokenizer):
    """The default GGUF parsed once per session: ours, transformers' model and tokenizer."""
    cfg, params = real_model
    return cfg, params, real_torch_model, real_hf_tokenizer


@pytest.mark.slow
def test_real_gguf_weights_equal_transformers(real):
    cfg, params, model, _ = real
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.architecture == "LlamaForCausalLM"
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    top, per_layer = param_specs(cfg)
    worst = 0.0
    for spec in top:
        ours = spec.to_hf(params[spec.path[0]][spec.path[1]] if len(spec.path) == 2
                          else params[spec.path[0]])
        worst = max(worst, np.abs(ours - sd["model." + spec.hf_name]).max())
    for i in range(cfg.num_layers):
        for spec in per_layer:
            leaf = params[f"layers_{i}"][spec.path[0]][spec.path[1]]
            theirs = sd["model." + spec.hf_name.format(l=i)]
            worst = max(worst, np.abs(spec.to_hf(leaf) - theirs).max())
    # The same dequantization and the same row un-permutation: bit-identical.
    assert worst == 0.0


@pytest.mark.slow
def test_real_gguf_logits_match_transformers(real):
    cfg, params, model, tok = real
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    tokens = np.asarray(ids, dtype=np.int32).reshape(1, -1)
    assert tokens.shape[1] > 20
    expected = torch_logits(model, tokens)
    got = jax_logits(cfg, params, tokens)
    diff = np.abs(got - expected).max()
    print(f"real model: {tokens.shape[1]} tokens, max abs logits diff {diff:.3g}")
    assert diff <= 1e-3, f"max abs logits diff {diff}"
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
