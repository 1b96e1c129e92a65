"""Meshes, the rules table and sharded training on 8 simulated CPU devices (see conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medusa_jax.config import MedusaConfig, tiny_config
from medusa_jax.sharding import (
    LOGICAL_AXIS_RULES,
    MeshConfig,
    ShardingError,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_batch,
    shard_params,
    sharded_init,
)
from medusa_jax.training.run_config import TrainConfig
from medusa_jax.training.step import (
    abstract_params,
    init_train_state,
    make_train_step,
    model_init_fn,
)

B, T = 8, 16
CFG = tiny_config()
MCFG = MedusaConfig.for_model(CFG, num_heads=3)
TCFG = TrainConfig(
    mode="medusa2", steps=10, batch_size=B, seq_len=T, base_lr=1e-2, heads_lr=2e-2, warmup_steps=1
)
STEPS = 3

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
        mask = (rng.random((B, T)) < 0.8).astype(np.int32)
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def run(params, mesh=None):
    """``STEPS`` Medusa-2 steps from host ``params``; returns (losses, final state)."""
    if mesh is None:
        placed = jax.tree.map(jax.numpy.array, params)
    else:
        placed = shard_params(params, param_shardings(abstract_params(CFG, MCFG), mesh))
    state = init_train_state(CFG, MCFG, TCFG, placed, mesh)
    step = make_train_step(CFG, MCFG, TCFG, mesh)
    losses = []
    for b in batches():
        state, m = step(state, b if mesh is None else shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def init_and_baseline():
    """Sharded random init on (2, 2, 2) (random ResBlocks), gathered to the host, and the
    single-device run from those parameters."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = sharded_init(model_init_fn(CFG, MCFG, medusa_scale=0.02), mesh, jax.random.PRNGKey(0))
    host = jax.tree.map(np.asarray, sharded)
    return sharded, host, run(host)


@needs_8
def test_sharded_init_places_every_parameter(init_and_baseline):
    sharded, host, _ = init_and_baseline
    gate = sharded["base"]["layers"]["mlp"]["gate_proj"]  # [L, D, F]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (CFG.num_layers, 32, 64)
    assert sharded["base"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert sharded["base"]["layers"]["attn"]["k_proj"].sharding.spec == P(
        None, "fsdp", "tensor", None
    )
    assert sharded["medusa"]["res_kernel"].sharding.spec == P(None, None, "fsdp", None)
    assert np.std(host["base"]["layers"]["mlp"]["gate_proj"]) > 0.01
    assert np.all(host["base"]["final_norm"]["scale"] == 1.0)


@needs_8
@pytest.mark.parametrize(
    "mcfg",
    [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, fsdp=8, tensor=1)],
    ids=["d2f2t2", "f8"],
)
def test_sharded_training_matches_single_device(init_and_baseline, mcfg):
    _, host, (base_losses, base_state) = init_and_baseline
    mesh = make_mesh(mcfg)
    losses, state = run(host, mesh)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    # Parameters and optimizer moments stay sharded across steps.
    kernel = state.params["base"]["layers"]["attn"]["q_proj"]  # [L, D, N, H]
    expected = P(None, "fsdp", "tensor", None)  # a size-1 axis is named too
    assert kernel.sharding.spec == expected
    multi = state.opt_state.inner_state[-1].inner_states["base"].inner_state[0]
    assert multi.mu["base"]["layers"]["attn"]["q_proj"].sharding.spec == expected
    # Adam divides by sqrt(v): near-zero gradients turn fp32 reduction-order noise into
    # visible update noise, so parameters get a looser bound (1% of one step's lr).
    final = jax.tree.map(np.asarray, state.params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
        final,
        jax.tree.map(np.asarray, base_state.params),
    )


@needs_8
def test_mesh_sizes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ShardingError, match=r"needs 3 devices but 8 are available"):
        make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ShardingError, match=r"8 devices are not divisible by the product 3"):
        make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))
    with pytest.raises(ShardingError, match="at most one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ShardingError, match="tensor=0"):
        MeshConfig(tensor=0)


@needs_8
def test_non_dividing_dimension_is_a_clear_error():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))  # 4 query heads, 2 kv heads
    with pytest.raises(
        ShardingError,
        match=r"base/layers/attn/\w_proj: dimension 2 \(logical "
        r"'k?v?_?heads'\) of size [24] is not divisible by "
        r"mesh axis tensor of size 8",
    ):
        param_shardings(abstract_params(CFG, MCFG), mesh)
    odd = tiny_config(vocab_size=129)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(
        ShardingError,
        match=r"base/embed/embedding: dimension 0 \(logical "
        r"'vocab'\) of size 129 is not divisible",
    ):
        param_shardings(abstract_params(odd, MedusaConfig.for_model(odd, num_heads=1)), mesh)


@needs_8
def test_batch_must_split_over_data_and_fsdp():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with pytest.raises(ShardingError, match=r"batch_size=6 is not divisible by data x fsdp"):
        make_train_step(CFG, MCFG, TCFG.replace(batch_size=6), mesh)


def test_rules_table_checks():
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("medusa_heads", "embed", "vocab")) == P(None, "fsdp", "tensor")
    clash = (("embed", "fsdp"), ("mlp", "fsdp"))
    with pytest.raises(ShardingError, match="mesh axis 'fsdp' would shard both dimension 0"):
        logical_to_spec(("embed", "mlp"), clash, where="w")
    with pytest.raises(ShardingError, match="logical axis 'experts' has no rule"):
        logical_to_spec(("experts", "embed"))
    # Every logical name the model and heads use has a rule.
    names = {n for n, _ in LOGICAL_AXIS_RULES}
    boxed = abstract_params(CFG, MedusaConfig.for_model(CFG, shared_lm_head=False))
    used = {
        n
        for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        for n in leaf.names
    }
    assert used <= names
