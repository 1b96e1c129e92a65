"""Ahead-of-time compilation for TPU topologies (``medusa_jax.aot``) with libtpu's compiler on
this CPU machine: the tiny config's Medusa-2 train step and decoding loop fit a v5e:2x2 and
report sane numbers, an oversized config is refused with a "does not fit" message, and bad
topology names and meshes are clear errors."""

import os

import jax
import pytest

from medusa_jax import aot
from medusa_jax.config import MedusaConfig, ModelConfig, tiny_config
from medusa_jax.sharding import MeshConfig
from medusa_jax.training.run_config import TrainConfig

if not aot.libtpu_available():
    pytest.skip(
        "libtpu is not installed (the TPU compiler; pip install 'jax[tpu]' with the installed "
        "jax version): no TPU topology can be compiled for",
        allow_module_level=True,
    )

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY_YAML = os.path.join(CONFIGS, "tiny.yaml")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(scan_layers=True, dtype="bfloat16", remat_policy="full")
    return cfg, MedusaConfig.for_model(cfg, num_heads=4, num_layers=1)


def _check_fits(rep: aot.AOTReport):
    assert rep.fits, rep.error
    assert rep.error is None
    m = rep.memory
    assert 0 < m["total"] < rep.hbm_bytes
    assert m["argument"] > 0 and m["temp"] >= 0
    assert rep.hbm_bytes == 16 * aot.GiB  # a v5e chip
    assert rep.param_bytes > 0 and rep.model_flops > 0 and rep.compile_s > 0
    assert "FITS" in rep.summary()


def test_tiny_medusa2_train_step_fits_v5e_2x2(tiny):
    cfg, mcfg = tiny
    tcfg = TrainConfig(mode="medusa2", batch_size=4, seq_len=64, kd=True)
    rep = aot.compile_train(cfg, mcfg, tcfg, "v5e:2x2", MeshConfig(fsdp=2, tensor=2))
    _check_fits(rep)
    assert (rep.num_devices, rep.num_hosts, rep.chip) == (4, 1, "v5e")
    assert rep.mesh == {"data": 1, "fsdp": 2, "tensor": 2}
    assert rep.opt_state_bytes > rep.param_bytes  # two Adam moments per parameter
    # the state is donated: the new state is written into the old one's buffers
    assert rep.memory["alias"] > 0
    assert rep.extra["frozen_base_bytes"] > 0  # kd: the teacher's copy is an argument
    # the other tests keep running on the CPU backend
    assert jax.default_backend() == "cpu"


def test_tiny_decode_loop_fits_v5e_2x2(tiny):
    cfg, mcfg = tiny
    rep = aot.compile_decode(cfg, mcfg, "v5e:2x2", MeshConfig(fsdp=1, tensor=2, data=2),
                             batch_size=2, cache_len=128)
    _check_fits(rep)
    assert rep.extra["tree_nodes"] == 64  # mc_sim_7b_63 and its root
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    assert rep.kv_cache_total_bytes == 2 * L * 2 * 128 * K * H * 2  # k and v, bf16
    assert rep.kv_cache_bytes == rep.kv_cache_total_bytes // 4  # rows over data, heads over TP


def test_multi_host_topology_from_one_process(tiny):
    cfg, mcfg = tiny
    topo = aot.get_topology("v5p:4x4x4")
    assert (topo.num_devices, topo.num_hosts, topo.chip) == (64, 16, "v5p")
    tcfg = TrainConfig(mode="medusa2", batch_size=32, seq_len=32)
    rep = aot.compile_train(cfg, mcfg, tcfg, topo, MeshConfig(data=2, fsdp=-1, tensor=2))
    assert rep.fits and rep.mesh == {"data": 2, "fsdp": 16, "tensor": 2}
    assert 0 < rep.memory["total"] < 95 * aot.GiB


def test_oversized_config_does_not_fit(capsys):
    # 4096-wide, 256k vocabulary, fp32 master weights + Adam on one v5e chip
    rc = aot.main([
        "--config", TINY_YAML, "--topology", "v5e:1x1", "train.mode=medusa2",
        "model.tiny_hidden_size=4096", "model.tiny_vocab_size=262144", "train.batch_size=1",
        "train.seq_len=256",
    ])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "does not fit on v5e:1x1: needs" in err and "GiB per chip, chip has 16.00 GiB" in err
    assert "try a slice about" in err and "model.param_dtype=bfloat16" in err


def test_oversized_decode_raises_with_check():
    cfg = ModelConfig(vocab_size=256000, hidden_size=8192, intermediate_size=8192, num_layers=1,
                      num_heads=64, num_kv_heads=8, max_position_embeddings=4096)
    mcfg = MedusaConfig.for_model(cfg, num_heads=4)
    with pytest.raises(aot.AOTError, match=r"does not fit on v5e:1x1: needs [\d.]+ GiB per chip") as e:
        aot.compile_decode(cfg, mcfg, "v5e:1x1", MeshConfig(fsdp=1), cache_len=256, check=True)
    assert not e.value.report.fits
    assert "tensor parallelism" in str(e.value) and "bf16 weights" in str(e.value)


def test_unknown_topology_is_a_clear_error(capsys):
    with pytest.raises(aot.AOTError, match=r"unknown TPU topology 'v5e-16'.*examples: v5e:1x1"):
        aot.get_topology("v5e-16")
    with pytest.raises(aot.AOTError, match=r"unknown TPU topology 'v9z:2x2'.*examples"):
        aot.get_topology("v9z:2x2")
    assert aot.main(["--config", TINY_YAML, "--topology", "nope"]) == 2
    assert "unknown TPU topology 'nope'" in capsys.readouterr().err
    # train.py compile is the same command line
    import train

    assert train.main(["compile", "--config", TINY_YAML, "--topology", "nope"]) == 2
    assert "unknown TPU topology 'nope'" in capsys.readouterr().err


def test_mesh_not_matching_the_topology_is_a_clear_error():
    with pytest.raises(aot.AOTError, match=r"does not match topology v5e:2x2 \(4 v5e devices\)"
                       r".*needs 8 devices but 4"):
        aot.topology_mesh("v5e:2x2", MeshConfig(data=1, fsdp=2, tensor=4))
    with pytest.raises(aot.AOTError, match="not divisible by the product 3"):
        aot.topology_mesh("v5e:4x4", MeshConfig(fsdp=-1, tensor=3))
    mesh = aot.topology_mesh("v5e:4x4", MeshConfig(fsdp=-1, tensor=4))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 4}


def test_parse_oom_messages():
    assert aot.parse_oom(
        "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm. "
        "Exceeded hbm capacity by 4.75G."
    ) == (int(20.5 * aot.GiB), int(15.75 * aot.GiB))
    assert aot.parse_oom(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (32.00G) exceeds available HBM (15.75G)."
    ) == (32 * aot.GiB, int(15.75 * aot.GiB))
    assert aot.parse_oom("something else") is None


def test_model_presets_and_missing_model_path():
    from medusa_jax.training.run_config import load_run_config

    run = load_run_config(os.path.join(CONFIGS, "vicuna7b_medusa2_pod.yaml"))
    cfg, mcfg = aot.model_from_run_config(run, "llama2-13b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.dtype, cfg.param_dtype) == (
        5120, 40, "bfloat16", "float32")
    assert round(cfg.num_params / 1e9, 1) == 13.0 and mcfg.num_heads == 5
    with pytest.raises(aot.AOTError, match="give --model a preset"):
        aot.model_from_run_config(run)  # /mnt/models/... is not here
