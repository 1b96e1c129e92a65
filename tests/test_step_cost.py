"""A Medusa verification step and a vanilla step hold no copy of a cache-sized array, compiled
for a TPU (libtpu, here on the CPU) with a 4-layer model of Llama-2-7B width and for this CPU
with the tiny model; the step-cost report refuses what it cannot compile with one clear error;
aot's decode FLOPs count every scanned layer."""

import dataclasses

import pytest

from medusa_jax import aot
from medusa_jax.config import MedusaConfig, ModelConfig, tiny_config
from medusa_jax.sharding import MeshConfig
from medusa_jax.step_cost import StepCostError, relayout_copies, step_cost

TPU = "v5p:1x1x1"
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="needs libtpu (test extra)")


@pytest.fixture(scope="module")
def wide():
    cfg = ModelConfig(**{**aot.MODEL_PRESETS["llama2-7b"], "num_layers": 4}, dtype="bfloat16",
                      param_dtype="bfloat16", scan_layers=False)
    return cfg, MedusaConfig.for_model(cfg, num_heads=4, param_dtype="bfloat16")


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_tpu_steps_copy_no_cache_sized_array(wide, batch):
    cfg, mcfg = wide
    van = step_cost(cfg, None, TPU, batch=batch, cache_len=2048)
    med = step_cost(cfg, mcfg, TPU, tree="mc_sim_7b_63", batch=batch, cache_len=2048)
    assert med.tree_nodes == 64 and van.tree_nodes == 1
    assert van.cache_copies == [], van.cache_copies
    assert med.cache_copies == [], med.cache_copies
    assert med.big_copies == [] and van.big_copies == []  # weights in the compiler's layouts
    if batch == 1:  # 4 layers: the heads' own LM heads (4 x 4096 x 32000 bf16, 1 GB) dominate
        heads = 4 * 4096 * 32000 * 2
        assert med.bytes < van.bytes + heads * 1.3
    # the vanilla step's HBM traffic is the weights it reads plus the live K/V, not the cache
    floor = van.weight_bytes + van.live_kv_bytes
    assert abs(van.hbm_bytes / floor - 1) < 0.1, (van.hbm_bytes, floor)


@needs_libtpu
def test_hbm_bytes_count_a_prefetched_weight_once():
    """One row through q/k/v and then o at 7B width, compiled for a v5p: the compiler
    prefetches a weight into VMEM and its cost analysis counts that weight several times; the
    HBM bytes are the weights' and the row's bytes, once."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.layout import Format, Layout

    from medusa_jax.step_cost import _target, on_chip_bytes

    mesh, rep = _target(TPU)
    shapes = [(1, 4096), (4096, 32, 128), (4096, 32, 128), (4096, 32, 128), (32, 128, 4096)]

    def f(x, q, k, v, o):
        qkv = sum(jnp.einsum("md,dhk->mhk", x, w) for w in (q, k, v))
        return jnp.einsum("mhk,hkn->mn", qkv, o)

    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rep) for s in shapes]
    ins = (rep,) + (Format(Layout.AUTO, rep),) * 4
    with jax.set_mesh(mesh):
        compiled = jax.jit(f, in_shardings=ins).lower(*args).compile()
    cost = compiled.cost_analysis()
    raw = (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]
    moved = sum(2 * a.size for a in args) + 2 * 4096  # inputs and the output row, bf16
    hlo = compiled.as_text()
    assert "copy-start" in hlo  # the prefetch this guards is there
    chip = on_chip_bytes(hlo)
    assert raw > 1.5 * moved  # the raw count is well above what HBM moves
    assert abs(raw - chip - moved) / moved < 0.02, (raw, chip, moved)


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_steps_copy_no_cache_sized_array(batch):
    """Vanilla, a 64-node tree and a chain (the CPU tree: one path, so the committed path is a
    constant; the cache was copied 4 times per step until the write depended on acceptance)."""
    cfg = tiny_config(scan_layers=False)
    mcfg = MedusaConfig.for_model(cfg, num_heads=4)
    for mc, tree in ((None, None), (mcfg, "mc_sim_7b_63"), (mcfg, [[0], [0, 0], [0, 0, 0]])):
        r = step_cost(cfg, mc, "cpu", tree=tree, batch=batch, cache_len=192, live=64)
        assert r.cache_copies == [], r.cache_copies


def test_relayout_copies_finds_a_cache_copy():
    """The detector itself: a copy and a pure-move fusion of the cache's shape, in any order of
    dimensions, outside fused computations; a fused computation's own copy is not counted."""
    hlo = """HloModule m

%fused_computation.1 (param_0: bf16[2,1,64,4,8]) -> bf16[2,1,4,64,8] {
  %param_0 = bf16[2,1,64,4,8]{4,3,2,1,0} parameter(0)
  ROOT %copy.9 = bf16[2,1,4,64,8]{4,3,2,1,0} copy(%param_0)
}

ENTRY %main (p: bf16[2,1,64,4,8]) -> (bf16[2,1,64,4,8], bf16[2,1,4,64,8]) {
  %p = bf16[2,1,64,4,8]{4,3,2,1,0} parameter(0)
  %copy.1 = bf16[2,1,64,4,8]{4,2,3,1,0} copy(%p)
  %fusion.2 = bf16[2,1,4,64,8]{4,3,2,1,0} fusion(%p), kind=kLoop, calls=%fused_computation.1
  ROOT %t = (bf16[2,1,64,4,8], bf16[2,1,4,64,8]) tuple(%copy.1, %fusion.2)
}
"""
    found = relayout_copies(hlo, shape=(2, 1, 64, 4, 8))
    assert sorted(c["name"] for c in found) == ["copy.1", "fusion.2"]
    assert all(c["computation"] == "main" for c in found)


@pytest.mark.parametrize("kw, message", [
    (dict(tree="mc_sim_7b_63", cache_len=64, live=32), "do not fit a cache of 64 slots"),
    (dict(tree=None, cache_len=100), "multiple of 64"),
    (dict(tree=None, batch=0), "batch must be >= 1"),
])
def test_report_refuses_what_it_cannot_compile(kw, message):
    cfg = tiny_config(scan_layers=False)
    mcfg = MedusaConfig.for_model(cfg, num_heads=4)
    with pytest.raises(StepCostError, match=message):
        step_cost(cfg, mcfg, "cpu", **kw)


def test_step_cost_cli_bad_input(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import step_cost as bench

    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--models", "nope"])
    assert bench.main(["--models", "llama2-7b", "--batches", "x"]) == 2
    assert "comma-separated" in capsys.readouterr().err


@needs_libtpu
def test_aot_decode_flops_count_every_scanned_layer():
    cfg = tiny_config(scan_layers=True, dtype="bfloat16", num_layers=4)
    mcfg = MedusaConfig.for_model(cfg, num_heads=4)
    kw = dict(batch_size=1, cache_len=128)
    scanned = aot.compile_decode(cfg, mcfg, "v5e:1x1", MeshConfig(fsdp=1), **kw)
    unrolled = aot.compile_decode(dataclasses.replace(cfg, scan_layers=False), mcfg, "v5e:1x1",
                                  MeshConfig(fsdp=1), **kw)
    assert scanned.extra["xla_flops_as_counted_scanned"] < 0.6 * unrolled.xla_flops
    assert scanned.xla_flops == pytest.approx(unrolled.xla_flops, rel=0.05)


@needs_libtpu
@pytest.mark.slow
def test_hbm_bytes_of_a_vanilla_step_agree_between_v5e_and_v5p():
    """v5e prefetches through asynchronous slices, v5p through copies: the same 2-layer
    7B-width step moves the same HBM bytes on both, its weights plus the live K/V."""
    cfg = ModelConfig(**{**aot.MODEL_PRESETS["llama2-7b"], "num_layers": 2}, dtype="bfloat16",
                      param_dtype="bfloat16", scan_layers=False)
    e, p = (step_cost(cfg, None, t, batch=1, cache_len=2048) for t in ("v5e:1x1", TPU))
    assert "slice-start" in e.hlo and "slice-start" not in p.hlo
    assert abs(e.hbm_bytes / p.hbm_bytes - 1) < 0.02, (e.hbm_bytes, p.hbm_bytes)
    floor = p.weight_bytes + p.live_kv_bytes
    assert abs(e.hbm_bytes / floor - 1) < 0.1
