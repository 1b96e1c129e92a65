"""Medusa-1/2 train steps on a tiny random model: learning, frozen base, learning rates,
non-finite skipping, cached hidden states, KD and packed segments."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from medusa_jax.config import ConfigError, MedusaConfig, tiny_config
from medusa_jax.training.optimizer import base_schedule, heads_schedule
from medusa_jax.training.run_config import TrainConfig
from medusa_jax.training.step import (
    abstract_params,
    init_train_state,
    make_hidden_fn,
    make_medusa1_step_from_hidden,
    make_train_step,
)

B, T = 8, 32
CFG = tiny_config()  # scanned layers, as in training
MCFG = MedusaConfig.for_model(CFG, num_heads=3)
M1 = TrainConfig(mode="medusa1", steps=30, batch_size=B, seq_len=T, heads_lr=0.1, warmup_steps=3)


def make_batch(seed: int) -> dict:
    """Arithmetic sequences ``(a + 3t) mod V``: token t determines every later token, so the
    heads can learn them from the base hidden state at t. The first 4 tokens are "prompt"."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, CFG.vocab_size, (B, 1))
    ids = (start + 3 * np.arange(T)[None]) % CFG.vocab_size
    mask = np.ones((B, T), np.int32)
    mask[:, :4] = 0
    return {"input_ids": ids.astype(np.int32), "loss_mask": mask}


def random_params(seed: int = 0) -> dict:
    """Host (numpy) parameters shaped by ``abstract_params``: N(0, 0.02) weights, unit norm
    scales, zero Medusa ResBlocks (their real init). Filling numpy arrays avoids compiling
    the init; ``sharded_init`` itself is tested in test_sharding."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        if path[0].key == "medusa":
            return np.zeros(x.shape, x.dtype)
        if path[-1].key == "scale":
            return np.ones(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, nn.meta.unbox(abstract_params(CFG, MCFG)))


@pytest.fixture(scope="module")
def params():
    """Host copies, so every test gets fresh device arrays the step may donate."""
    return random_params()


@pytest.fixture(scope="module")
def m1_step():
    return make_train_step(CFG, MCFG, M1)


def fresh(tree):
    return jax.tree.map(jax.numpy.array, tree)


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_medusa1_heads_learn_and_base_is_bit_identical(params, m1_step):
    state = init_train_state(CFG, MCFG, M1, fresh(params))
    step = m1_step
    batches = [make_batch(i) for i in range(3)]
    losses = []
    for i in range(M1.steps):
        state, m = step(state, batches[i % 3])
        losses.append(np.asarray(m["head_loss"]))
    first, last = np.mean(losses[:3], axis=0), np.mean(losses[-3:], axis=0)
    assert np.all(last < 0.6 * first), (first, last)
    assert float(m["lr_base"]) == 0.0 and int(m["skipped_updates"]) == 0
    assert int(m["num_tokens"]) == B * (T - 4)
    # Every target position 4..T-1 is predicted by each head (from t = target - k - 2).
    np.testing.assert_array_equal(m["head_count"], [B * (T - 4)] * 3)
    assert tree_equal(host(state.params["base"]), params["base"])
    assert not tree_equal(host(state.params["medusa"]), params["medusa"])
    assert int(state.step) == M1.steps


def test_step_from_cached_hidden_and_nonfinite_skip(params, m1_step):
    """The cached-hidden step equals the full step; a NaN batch is skipped and counted."""
    batch = make_batch(0)
    _, m_full = m1_step(init_train_state(CFG, MCFG, M1, fresh(params)), batch)

    hidden = make_hidden_fn(CFG)(fresh(params["base"]), batch)  # [B, T, D]
    step = make_medusa1_step_from_hidden(CFG, MCFG, M1)
    state = init_train_state(CFG, MCFG, M1, fresh(params))

    bad = np.array(hidden)
    bad[0, 5, 0] = np.nan
    state, m = step(state, bad, batch)
    assert int(m["update_skipped"]) == 1 and int(m["skipped_updates"]) == 1
    assert int(m["nonfinite_consecutive"]) == 1 and int(state.step) == 1
    assert tree_equal(host(state.params), params)

    state, m = step(state, hidden, batch)
    assert int(m["update_skipped"]) == 0 and int(m["skipped_updates"]) == 1
    assert int(m["nonfinite_consecutive"]) == 0
    # The skipped step did not advance the schedules: this is the first applied update.
    np.testing.assert_allclose(m["lr_heads"], heads_schedule(M1)(0))
    np.testing.assert_allclose(m["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["head_top1"], m_full["head_top1"])
    assert not tree_equal(host(state.params["medusa"]), params["medusa"])


def test_medusa2_learning_rates_are_applied(params):
    """With b1 = b2 = 0 Adam is sign-SGD, so the largest parameter change of a group equals
    its learning rate: the heads move from step 0, the base only after the heads warmup."""
    tcfg = TrainConfig(
        mode="medusa2",
        steps=8,
        batch_size=B,
        seq_len=T,
        base_lr=1e-3,
        heads_lr_multiplier=4.0,
        warmup_steps=2,
        heads_warmup_steps=2,
        adam_b1=0.0,
        adam_b2=0.0,
        grad_clip=None,
    )
    state = init_train_state(CFG, MCFG, tcfg, fresh(params))
    step = make_train_step(CFG, MCFG, tcfg)
    for i in range(4):
        before = host(state.params)
        state, m = step(state, make_batch(i))
        after = host(state.params)
        np.testing.assert_allclose(m["lr_heads"], heads_schedule(tcfg)(i), rtol=1e-6)
        np.testing.assert_allclose(m["lr_base"], base_schedule(tcfg)(i), rtol=1e-6)
        dh = max_abs_diff(after["medusa"], before["medusa"])
        np.testing.assert_allclose(dh, float(m["lr_heads"]), rtol=1e-3)
        if i < tcfg.heads_warmup_steps:
            assert float(m["lr_base"]) == 0.0
            assert tree_equal(after["base"], before["base"])
        else:
            assert float(m["lr_base"]) > 0.0
            db = max_abs_diff(after["base"], before["base"])
            np.testing.assert_allclose(db, float(m["lr_base"]), rtol=1e-3)
        assert np.isfinite(float(m["lm_loss"])) and float(m["grad_norm"]) > 0


def test_medusa2_kd_against_frozen_base(params):
    tcfg = TrainConfig(
        mode="medusa2",
        steps=10,
        batch_size=B,
        seq_len=T,
        base_lr=1e-2,
        heads_lr=1e-2,
        warmup_steps=0,
        kd=True,
    )
    state = init_train_state(CFG, MCFG, tcfg, fresh(params))
    frozen = fresh(params["base"])
    step = make_train_step(CFG, MCFG, tcfg)
    with pytest.raises(ValueError, match="frozen_base"):
        step(state, make_batch(0))
    state, m0 = step(state, make_batch(0), frozen)
    assert abs(float(m0["kd_loss"])) < 1e-6  # student == teacher before the first update
    for i in range(1, 3):
        state, m = step(state, make_batch(i), frozen)
    assert float(m["kd_loss"]) > 1e-4
    assert tree_equal(host(frozen), params["base"])  # the teacher is never donated or moved
    assert not tree_equal(host(state.params["base"]), params["base"])


def test_packed_segments_match_separate_rows(params):
    """Two sequences packed in one row (segment_ids + positions) give the hidden states of
    the same sequences run on their own rows."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 128, 10), rng.integers(3, 128, 12)
    ids = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    ids[0, :10], ids[0, 10:22] = a, b
    seg[0, :10], seg[0, 10:22] = 1, 2
    pos[0, :10], pos[0, 10:22] = np.arange(10), np.arange(12)
    ids[1, :10], seg[1, :10], pos[1, :10] = a, 1, np.arange(10)
    ids[2, :12], seg[2, :12], pos[2, :12] = b, 1, np.arange(12)
    batch = {
        "input_ids": ids,
        "loss_mask": (seg > 0).astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
    }
    h = np.asarray(make_hidden_fn(CFG)(fresh(params["base"]), batch))
    np.testing.assert_allclose(h[0, :10], h[1, :10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[0, 10:22], h[2, :12], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="medusa3"), "mode='medusa3'"),
        (dict(kd=True), "kd=True needs mode='medusa2'"),
        (dict(heads_warmup_steps=5), "heads_warmup_steps=5 only applies"),
        (dict(mode="medusa2", heads_warmup_steps=20, steps=10), "heads_warmup_steps must be"),
        (dict(heads_lr=1e-3, heads_lr_multiplier=4.0), "not both"),
        (dict(schedule="linear"), "schedule='linear'"),
        (dict(grad_clip=0.0), "grad_clip must be > 0"),
    ],
)
def test_train_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_heads_lr_resolution():
    assert TrainConfig().peak_heads_lr == 1e-3
    assert TrainConfig(base_lr=1e-5, heads_lr_multiplier=4.0).peak_heads_lr == 4e-5
    assert TrainConfig(heads_lr=2e-3).peak_heads_lr == 2e-3
