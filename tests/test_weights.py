"""Weight loaders: error messages, unused-key hook, dispatch, and tiny GGUF files written here
with gguf-py (names from gguf-py's own tensor map, Q/K rows permuted the way llama.cpp's converter
does), compared with the PyTorch model the tensors came from."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

import medusa_jax.tokenizer
from medusa_jax.config import ConfigError, tiny_config
from medusa_jax.model import LlamaModel
from medusa_jax.weights import (
    CheckpointError,
    HFCheckpoint,
    load_base_model,
    load_gguf,
    load_hf_checkpoint,
    save_hf_checkpoint,
    write_safetensors,
)

HF_CONFIGS = {
    "LlamaForCausalLM": transformers.LlamaConfig,
    "Qwen2ForCausalLM": transformers.Qwen2Config,
}


def torch_model(cfg, seed=0):
    """A random transformers model for ``cfg`` (every parameter random, norms near 1)."""
    hf_cfg = HF_CONFIGS[cfg.architecture](**cfg.to_hf_config(), attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn_like(p))
    return model.eval()


def logits_diff(cfg, params, model, seed=0):
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 10), dtype=np.int32)
    m = LlamaModel(cfg)
    ours = m.apply({"params": params}, tokens, method=lambda mod, t: mod.logits(mod(t)[0]))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    return float(np.abs(np.asarray(ours) - theirs).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny Llama (GQA, untied) and its torch model."""
    cfg = tiny_config()
    model = torch_model(cfg)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    return path, cfg, model


def copy_dir(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ------------------------------------------------------------------------- HF: errors
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_hf_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_checkpoint(tmp_path / "x.safetensors")


def test_directory_without_config(tmp_path, hf_dir):
    (tmp_path / "model.safetensors").write_bytes((hf_dir[0] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json") as e:
        load_hf_checkpoint(tmp_path)
    assert "model.safetensors" in str(e.value)  # lists what it found


def test_invalid_config_json(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "c")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(d)


def test_directory_without_weights(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(tmp_path)
    msg = str(e.value)
    assert f"no *.safetensors weights in {tmp_path}" in msg and "tokenizer.json" in msg
    assert ".bin" not in msg


def test_pytorch_bin_only_says_how_to_convert(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(tmp_path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and ".bin" in msg and "not supported" in msg
    assert "safe_serialization=True" in msg


def test_truncated_safetensors_names_file(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf_checkpoint(d)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("payload", [b"\x07", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{"])
def test_corrupt_safetensors_names_file(tmp_path, hf_dir, payload):
    d = copy_dir(hf_dir[0], tmp_path / "c")
    (d / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_hf_checkpoint(d)
    assert str(d / "model.safetensors") in str(e.value)


def test_truncated_shard_names_shard(tmp_path):
    cfg = tiny_config()
    torch_model(cfg).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    victim = tmp_path / shards[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_hf_checkpoint(tmp_path)
    assert str(victim) in str(e.value)
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        load_hf_checkpoint(tmp_path)
    assert shards[1] in str(e.value)


def _rewrite_without(path, drop=(), extra=None):
    """Rewrite ``path/model.safetensors`` without the keys in ``drop`` and with ``extra``."""
    ck = HFCheckpoint(path)
    tensors = {k: np.array(ck.read(k)) for k in ck.keys() if k not in drop}
    tensors.update(extra or {})
    del ck
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_tensor_names_key(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    _rewrite_without(d, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match="missing tensor") as e:
        load_hf_checkpoint(d)
    assert "'model.layers.1.mlp.up_proj.weight'" in str(e.value)
    assert str(d / "model.safetensors") in str(e.value)


def test_untied_without_lm_head(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "m")
    _rewrite_without(d, drop={"lm_head.weight"})
    with pytest.raises(CheckpointError, match="'lm_head.weight'"):
        load_hf_checkpoint(d)


def test_shape_mismatch_names_key_and_shapes(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "s")
    hf = json.loads((d / "config.json").read_text())
    hf["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_hf_checkpoint(d)
    msg = str(e.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in msg
    assert "expected (96, 64)" in msg and "found (128, 64)" in msg


def test_unsupported_architecture(tmp_path, hf_dir):
    d = copy_dir(hf_dir[0], tmp_path / "a")
    hf = json.loads((d / "config.json").read_text())
    hf["architectures"], hf["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as e:
        load_hf_checkpoint(d)
    assert not isinstance(e.value, CheckpointError)


def test_bad_dtype_arguments(hf_dir):
    with pytest.raises(ValueError, match="float64"):
        load_hf_checkpoint(hf_dir[0], dtype="float64")
    with pytest.raises(TypeError, match="dtype="):
        load_hf_checkpoint(hf_dir[0], param_dtype="bfloat16")


def test_save_refuses_directory_with_shard_index(tmp_path, hf_dir):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    cfg, params = load_hf_checkpoint(hf_dir[0])
    with pytest.raises(CheckpointError, match="sharded"):
        save_hf_checkpoint(cfg, params, tmp_path)


# ------------------------------------------------------------------------- HF: behaviour
def test_unused_keys_hook(tmp_path, hf_dir):
    """Medusa-2 full checkpoints carry ``medusa_head.*`` next to the base model: the loader
    leaves them for the head loader and says which they are."""
    d = copy_dir(hf_dir[0], tmp_path / "u")
    head = np.ones((64, 64), np.float32)
    _rewrite_without(d, extra={
        "medusa_head.0.0.linear.weight": head,
        "medusa_head.0.0.linear.bias": np.zeros(64, np.float32),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
    })
    ck = HFCheckpoint(d)
    assert len(ck.unused_keys) == len(ck.keys()) - 1  # nothing used yet (inv_freq ignored)
    cfg, params = ck.load_base()
    assert ck.unused_keys == ["medusa_head.0.0.linear.bias", "medusa_head.0.0.linear.weight"]
    np.testing.assert_array_equal(ck.read("medusa_head.0.0.linear.weight"), head)
    assert logits_diff(cfg, params, hf_dir[2]) <= 1e-4


def test_loaded_arrays_are_writable_numpy(hf_dir):
    cfg, params = load_hf_checkpoint(hf_dir[0], dtype="float16")
    assert cfg.param_dtype == "float16"
    for leaf in jax.tree.leaves(params):
        assert type(leaf) is np.ndarray and leaf.dtype == np.float16 and leaf.flags.writeable
    assert params["layers"]["attn"]["q_proj"].shape == (2, 64, 4, 16)


def test_llama_attention_bias_zero_o_proj_bias(tmp_path):
    """HF Llama's attention_bias also adds an o_proj bias; our model has none, so only an
    all-zero one loads, and a nonzero one is an error rather than silently dropped."""
    cfg = tiny_config(attention_bias=True)
    model = torch_model(cfg, seed=3)
    with torch.no_grad():
        for i in range(cfg.num_layers):
            model.model.layers[i].self_attn.o_proj.bias.zero_()
    model.save_pretrained(tmp_path / "zero", safe_serialization=True)
    got_cfg, params = load_hf_checkpoint(tmp_path / "zero")
    assert got_cfg.attention_bias
    assert logits_diff(got_cfg, params, model) <= 1e-4
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias[3] = 0.5
    model.save_pretrained(tmp_path / "nonzero", safe_serialization=True)
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        load_hf_checkpoint(tmp_path / "nonzero")


def test_load_base_model_dispatch(tmp_path, hf_dir, monkeypatch):
    cfg, params = load_base_model(hf_dir[0], scan_layers=False)
    assert "layers_0" in params and not cfg.scan_layers
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base_model(tmp_path / "missing")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_config(), hf_dir[2].state_dict())
    cfg2, params2 = load_base_model(gguf_path)
    assert cfg2.scan_layers and "layers" in params2
    monkeypatch.setattr(medusa_jax.tokenizer, "default_model_path", lambda: str(gguf_path))
    cfg3, _ = load_base_model(None)
    assert cfg3 == cfg2


# ------------------------------------------------------------------------- GGUF
def llamacpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (rotate-half -> interleaved rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path, cfg, state_dict, quant=None, drop=(), arch=None):
    """Write a HF state dict as a GGUF file the way llama.cpp's converter lays it out."""
    arch = arch or {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg.architecture]
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}.get(
        arch, gguf.MODEL_ARCH.LLAMA)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, t in state_dict.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name in drop:
            continue
        a = t.float().numpy()
        if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            a = llamacpp_permute(a, cfg.num_heads if ".q_proj." in key else cfg.num_kv_heads)
        if quant is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["llama_gqa_untied", "llama_mqa_tied", "qwen2_bias_tied"])
def test_gguf_logits_match_transformers(name, tmp_path):
    cfg = {
        "llama_gqa_untied": tiny_config(rope_theta=50000.0),
        "llama_mqa_tied": tiny_config(num_kv_heads=1, tie_word_embeddings=True),
        "qwen2_bias_tied": tiny_config(architecture="Qwen2ForCausalLM", attention_bias=True,
                                       tie_word_embeddings=True, rms_norm_eps=1e-6),
    }[name]
    model = torch_model(cfg, seed=7)
    write_tiny_gguf(tmp_path / "m.gguf", cfg, model.state_dict())
    got_cfg, params = load_gguf(tmp_path / "m.gguf", scan_layers=False)
    assert got_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    assert (got_cfg.num_heads, got_cfg.num_kv_heads, got_cfg.rope_theta) == (
        cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta)
    sd = model.state_dict()
    q = params["layers_1"]["attn"]["q_proj"].reshape(cfg.hidden_size, -1).T
    np.testing.assert_array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"].numpy())
    assert logits_diff(got_cfg, params, model) <= 1e-4


def test_gguf_quantized_q8_0(tmp_path):
    cfg = tiny_config()
    model = torch_model(cfg, seed=8)
    write_tiny_gguf(tmp_path / "q.gguf", cfg, model.state_dict(), quant=gguf.GGMLQuantizationType.Q8_0)
    _, params = load_gguf(tmp_path / "q.gguf", dtype="bfloat16")
    assert params["embed"]["embedding"].dtype.name == "bfloat16"
    _, params = load_gguf(tmp_path / "q.gguf")
    # Quantization works on 32-wide blocks within a row, so it commutes with the row
    # permutation: the result must be exactly the dequantized HF tensor.
    for key, path in [("model.layers.0.self_attn.k_proj.weight", ("attn", "k_proj")),
                      ("model.layers.1.self_attn.q_proj.weight", ("attn", "q_proj")),
                      ("model.layers.1.mlp.down_proj.weight", ("mlp", "down_proj"))]:
        w = model.state_dict()[key].numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
        layer = int(key.split(".")[2])
        ours = params["layers"][path[0]][path[1]][layer]
        ours = ours.reshape(ours.shape[0], -1).T if path[1] != "down_proj" else ours.T
        np.testing.assert_array_equal(ours, expected)


def test_gguf_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_gguf(tmp_path / "none.gguf")
    assert "none.gguf" in str(e.value)


def test_gguf_bad_magic(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        load_gguf(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("keep", [10, 200, 0.5, -8])
def test_gguf_truncated_names_file(tmp_path, hf_dir, keep):
    full = tmp_path / "full.gguf"
    write_tiny_gguf(full, tiny_config(), hf_dir[2].state_dict())
    data = full.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_gguf(cut)
    assert str(cut) in str(e.value)


def test_gguf_missing_tensor(tmp_path, hf_dir):
    p = tmp_path / "m.gguf"
    write_tiny_gguf(p, tiny_config(), hf_dir[2].state_dict(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight'") as e:
        load_gguf(p)
    assert str(p) in str(e.value)


def test_gguf_unsupported_architecture(tmp_path, hf_dir):
    p = tmp_path / "g.gguf"
    write_tiny_gguf(p, tiny_config(), hf_dir[2].state_dict(), arch="gpt2")
    with pytest.raises(ConfigError, match="gpt2"):
        load_gguf(p)
