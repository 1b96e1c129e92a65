"""Medusa head save/load: our format, the original v1 / version 2 layouts written by PyTorch the
way the original code does, Medusa-2 full-model state dicts, export, and error messages."""

import json
import sys
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

from medusa_jax.config import ConfigError, MedusaConfig, tiny_config
from medusa_jax.model.heads import MedusaHeads, head_logits, init_medusa_params
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import write_safetensors
from medusa_jax.weights.medusa_io import (
    detect_format,
    export_v1,
    load_heads,
    load_heads_from_state_dict,
    read_heads_metadata,
    save_heads,
)

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

D, V, M = 16, 40, 3


class ResBlock(torch.nn.Module):
    """The original Medusa ResBlock: ``x + SiLU(linear(x))``."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def torch_heads(n_layers, own_vocab=True, seed=0):
    """The original ``medusa_head`` ModuleList (each ResBlock its own instance), random weights."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList()
    for _ in range(M):
        mods = [ResBlock(D) for _ in range(n_layers)]
        if own_vocab:
            mods.append(torch.nn.Linear(D, V, bias=False))
        heads.append(torch.nn.Sequential(*mods))
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return heads.eval()


def torch_logits(heads, hidden, base_lm=None):
    """Per-head logits ``[B, M, V]`` of the torch heads; ``base_lm [D, V]`` for shared heads."""
    h = torch.as_tensor(hidden)
    with torch.no_grad():
        outs = [head(h) if base_lm is None else head(h) @ torch.as_tensor(base_lm)
                for head in heads]
    return torch.stack(outs, dim=-2).numpy()


def our_logits(mcfg, params, hidden, base_lm=None):
    hh = MedusaHeads(mcfg).apply({"params": params}, hidden)
    fn = None if base_lm is None else (lambda x: (x @ base_lm).astype(np.float32))
    return np.asarray(head_logits(mcfg, params, hh, fn))


def hidden_states(seed=1):
    return np.random.default_rng(seed).normal(size=(4, D)).astype(np.float32)


def write_v1(tmp_path, heads, cfg, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.contiguous() for k, v in heads.state_dict().items()}
    save_file(sd, str(d / "medusa_lm_head.safetensors"))
    dpt = tmp_path / (name + "_pt")
    dpt.mkdir()
    (dpt / "config.json").write_text(json.dumps(cfg))
    torch.save(heads.state_dict(), str(dpt / "medusa_lm_head.pt"))
    return d, dpt


# --------------------------------------------------------------------------- our format
@pytest.mark.parametrize("n_layers,shared", [(1, True), (2, False)])
def test_our_format_round_trip(tmp_path, n_layers, shared):
    mcfg = MedusaConfig(num_heads=M, num_layers=n_layers, hidden_size=D, vocab_size=V,
                        shared_lm_head=shared)
    base_lm = np.random.default_rng(3).normal(size=(D, V)).astype(np.float32)
    params = init_medusa_params(mcfg, rng=jax.random.PRNGKey(2), scale=0.3)
    meta = {"step": np.int64(100), "loss": np.float32(1.5), "base": "tiny"}
    save_heads(tmp_path / "h", mcfg, params, metadata=meta)
    assert detect_format(tmp_path / "h") == "medusa_jax"
    mcfg2, p2 = load_heads(tmp_path / "h")
    assert mcfg2 == mcfg
    assert set(p2) == set(params)
    for k in params:
        assert isinstance(p2[k], np.ndarray)
        np.testing.assert_array_equal(p2[k], np.asarray(params[k]))
    h = hidden_states()
    bl = base_lm if shared else None
    np.testing.assert_array_equal(our_logits(mcfg2, p2, h, bl), our_logits(mcfg, params, h, bl))
    assert read_heads_metadata(tmp_path / "h") == {"step": 100, "loss": 1.5, "base": "tiny"}


def test_our_format_flax_boxes_and_bfloat16(tmp_path):
    mcfg = MedusaConfig(num_heads=M, num_layers=1, hidden_size=D, vocab_size=V,
                        shared_lm_head=False, param_dtype="bfloat16")
    # MedusaHeads.init returns flax Partitioned boxes; save_heads unboxes them.
    boxed = MedusaHeads(mcfg).init(jax.random.PRNGKey(0), np.zeros((1, D), np.float32))["params"]
    boxed = {**boxed, "lm_head": np.ones((M, D, V), ml_dtypes.bfloat16)}
    save_heads(tmp_path / "h", mcfg, {"params": boxed})
    mcfg2, p2 = load_heads(tmp_path / "h")
    assert mcfg2.param_dtype == "bfloat16" and p2["lm_head"].dtype == ml_dtypes.bfloat16
    _, p3 = load_heads(tmp_path / "h", dtype="float32")
    assert p3["res_kernel"].dtype == np.float32 and float(p3["lm_head"].sum()) == M * D * V


# --------------------------------------------------------------------------- original layouts
@pytest.mark.parametrize("n_layers", [1, 2])
def test_v1_written_by_torch(tmp_path, n_layers):
    heads = torch_heads(n_layers)
    cfg = {"medusa_num_heads": M, "medusa_num_layers": n_layers,
           "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}
    st_dir, pt_dir = write_v1(tmp_path, heads, cfg, "v1")
    h = hidden_states()
    want = torch_logits(heads, h)
    for d in (st_dir, pt_dir):
        assert detect_format(d) == "v1"
        mcfg, params = load_heads(d)
        assert mcfg == MedusaConfig(num_heads=M, num_layers=n_layers, hidden_size=D,
                                    vocab_size=V, shared_lm_head=False)
        assert np.abs(our_logits(mcfg, params, h) - want).max() <= 1e-5


def test_version2_written_by_torch(tmp_path):
    heads = torch_heads(1, own_vocab=False)
    base_lm = np.random.default_rng(5).normal(size=(D, V)).astype(np.float32)
    cfg = {"medusa_num_heads": M, "medusa_num_layers": 1, "version": "2",
           "base_model_name_or_path": "x"}
    st_dir, pt_dir = write_v1(tmp_path, heads, cfg, "v2")
    h = hidden_states()
    want = torch_logits(heads, h, base_lm)
    base_cfg = tiny_config(hidden_size=D, vocab_size=V, num_heads=2, num_kv_heads=2)
    for d in (st_dir, pt_dir):
        assert detect_format(d) == "v2"
        # version 2 stores no vocab projection: the vocab size comes from the base model.
        with pytest.raises(CheckpointError, match="vocab size"):
            load_heads(d)
        mcfg, params = load_heads(d, base_cfg=base_cfg)
        assert mcfg.shared_lm_head and mcfg.num_layers == 1 and "lm_head" not in params
        assert np.abs(our_logits(mcfg, params, h, base_lm) - want).max() <= 1e-5


def test_version2_needs_one_layer(tmp_path):
    heads = torch_heads(2, own_vocab=False)
    st_dir, _ = write_v1(tmp_path, heads, {"version": "2", "vocab_size": V}, "v2")
    with pytest.raises(CheckpointError, match="exactly 1 ResBlock"):
        load_heads(st_dir)


def test_config_head_count_disagrees_with_keys(tmp_path):
    heads = torch_heads(1)
    cfg = {"medusa_num_heads": 5, "medusa_num_layers": 1, "base_model_name_or_path": "x"}
    st_dir, _ = write_v1(tmp_path, heads, cfg, "v1")
    with pytest.warns(UserWarning, match=r"medusa_num_heads=5.*3 heads"):
        mcfg, _ = load_heads(st_dir)
    assert mcfg.num_heads == M


def test_pt_without_torch_says_so(tmp_path, monkeypatch):
    _, pt_dir = write_v1(tmp_path, torch_heads(1), {"medusa_num_heads": M}, "v1")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(CheckpointError, match="needs torch"):
        load_heads(pt_dir)


def test_medusa2_full_model_state_dict(tmp_path):
    heads = torch_heads(2, seed=7)
    sd = {f"medusa_head.{k}": v.numpy() for k, v in heads.state_dict().items()}
    sd["model.embed_tokens.weight"] = np.zeros((V, D), np.float32)
    mcfg, params = load_heads_from_state_dict(sd)
    h = hidden_states()
    assert mcfg.num_heads == M and mcfg.num_layers == 2 and not mcfg.shared_lm_head
    assert np.abs(our_logits(mcfg, params, h) - torch_logits(heads, h)).max() <= 1e-5
    # torch tensors are accepted as they are.
    mcfg_t, _ = load_heads_from_state_dict({f"medusa_head.{k}": v
                                           for k, v in heads.state_dict().items()})
    assert mcfg_t == mcfg

    # The same as an HF checkpoint directory: load_heads finds the medusa_head.* tensors.
    d = tmp_path / "full"
    d.mkdir()
    hf_cfg = {**tiny_config(hidden_size=D, vocab_size=V).to_hf_config(),
              "medusa_num_heads": M, "medusa_num_layers": 2}
    (d / "config.json").write_text(json.dumps(hf_cfg))
    write_safetensors(d / "model.safetensors", sd)
    assert detect_format(d) == "hf"
    mcfg2, params2 = load_heads(d)
    assert mcfg2 == mcfg
    for k in params:
        np.testing.assert_array_equal(params2[k], params[k])


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("n_layers,shared", [(1, True), (1, False), (2, False)])
def test_export_v1_round_trip_and_torch(tmp_path, n_layers, shared):
    mcfg = MedusaConfig(num_heads=M, num_layers=n_layers, hidden_size=D, vocab_size=V,
                        shared_lm_head=shared)
    base_lm = np.random.default_rng(3).normal(size=(D, V)).astype(np.float32)
    params = {k: np.asarray(v) for k, v in
              init_medusa_params(mcfg, rng=jax.random.PRNGKey(4), scale=0.3).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N > 1 with distinct ResBlocks: expected warning
        export_v1(tmp_path / "e", mcfg, params, base_lm_head=base_lm if shared else None,
                  base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["medusa_num_heads"] == M and cfg["medusa_num_layers"] == n_layers
    mcfg2, p2 = load_heads(tmp_path / "e")
    assert mcfg2 == MedusaConfig(num_heads=M, num_layers=n_layers, hidden_size=D, vocab_size=V,
                                 shared_lm_head=False)
    np.testing.assert_array_equal(p2["res_kernel"], params["res_kernel"])
    np.testing.assert_array_equal(p2["res_bias"], params["res_bias"])
    want_lm = np.broadcast_to(base_lm, (M, D, V)) if shared else params["lm_head"]
    np.testing.assert_array_equal(p2["lm_head"], want_lm)

    # The original torch module reads the exported file with load_state_dict(strict=True).
    from safetensors.torch import load_file

    heads = torch_heads(n_layers, seed=99)
    heads.load_state_dict(load_file(str(tmp_path / "e" / "medusa_lm_head.safetensors")))
    h = hidden_states()
    ours = our_logits(mcfg, params, h, base_lm if shared else None)
    assert np.abs(torch_logits(heads, h) - ours).max() <= 1e-5


def test_export_version2(tmp_path):
    mcfg = MedusaConfig(num_heads=M, num_layers=1, hidden_size=D, vocab_size=V)
    params = init_medusa_params(mcfg, rng=jax.random.PRNGKey(4), scale=0.3)
    export_v1(tmp_path / "e", mcfg, params, version2=True)
    assert detect_format(tmp_path / "e") == "v2"
    mcfg2, p2 = load_heads(tmp_path / "e")  # config.json states vocab_size
    assert mcfg2 == mcfg
    np.testing.assert_array_equal(p2["res_kernel"], np.asarray(params["res_kernel"]))
    with pytest.raises(ValueError, match="base_lm_head"):
        export_v1(tmp_path / "f", mcfg, params)


def test_export_warns_on_distinct_resblocks(tmp_path):
    mcfg = MedusaConfig(num_heads=M, num_layers=2, hidden_size=D, vocab_size=V,
                        shared_lm_head=False)
    params = init_medusa_params(mcfg, rng=jax.random.PRNGKey(4), scale=0.3)
    with pytest.warns(UserWarning, match="shares one ResBlock"):
        export_v1(tmp_path / "e", mcfg, params)


# --------------------------------------------------------------------------- errors
def test_hidden_size_mismatch_with_base_model(tmp_path):
    mcfg = MedusaConfig(num_heads=M, num_layers=1, hidden_size=D, vocab_size=V)
    save_heads(tmp_path / "h", mcfg, init_medusa_params(mcfg))
    with pytest.raises(ConfigError, match="hidden size 16 but the base model has 64"):
        load_heads(tmp_path / "h", base_cfg=tiny_config())
    st_dir, _ = write_v1(tmp_path, torch_heads(1), {"medusa_num_heads": M}, "v1")
    with pytest.raises(ConfigError, match="another model"):
        load_heads(st_dir, base_cfg=tiny_config())


def test_missing_key_is_named(tmp_path):
    heads = torch_heads(1)
    sd = {k: v.contiguous() for k, v in heads.state_dict().items() if k != "2.0.linear.bias"}
    d = tmp_path / "v1"
    d.mkdir()
    save_file(sd, str(d / "medusa_lm_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor '2\.0\.linear\.bias'"):
        load_heads(d)


def test_bad_shape_is_named(tmp_path):
    sd = {k: v.numpy() for k, v in torch_heads(1).state_dict().items()}
    sd["1.0.linear.weight"] = np.zeros((D, D + 1), np.float32)
    with pytest.raises(CheckpointError, match=r"'medusa_head\.1\.0\.linear\.weight'.*\(16, 17\)"):
        load_heads_from_state_dict({f"medusa_head.{k}": v for k, v in sd.items()})


def test_truncated_files(tmp_path):
    mcfg = MedusaConfig(num_heads=M, num_layers=1, hidden_size=D, vocab_size=V,
                        shared_lm_head=False)
    save_heads(tmp_path / "h", mcfg, init_medusa_params(mcfg))
    f = tmp_path / "h" / "heads.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_heads(tmp_path / "h")
    _, pt_dir = write_v1(tmp_path, torch_heads(1), {"medusa_num_heads": M}, "v1")
    f = pt_dir / "medusa_lm_head.pt"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="medusa_lm_head.pt"):
        load_heads(pt_dir)


def test_missing_and_unrecognised_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_heads(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty directory"):
        load_heads(tmp_path / "empty")
    d = tmp_path / "other"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    (d / "config.json").write_text(json.dumps({"medusa_num_heads": 3}))
    with pytest.raises(CheckpointError, match=r"found: config\.json, notes\.txt.*missing"):
        load_heads(d)
    # A base-model checkpoint without medusa_head.* tensors.
    b = tmp_path / "base"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(tiny_config().to_hf_config()))
    write_safetensors(b / "model.safetensors", {"model.norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="without Medusa heads"):
        load_heads(b)
