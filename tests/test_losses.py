"""Loss math on hand-checkable inputs: shifts, decay weights, target-side masks, top-k, KD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.training.losses import (
    kd_loss,
    lm_loss,
    medusa_loss,
    medusa_loss_from_hidden,
    shifted_targets,
)

T, V, M = 12, 16, 3
TOKENS = np.array([[3, 7, 1, 9, 12, 0, 5, 14, 2, 11, 8, 6]], np.int32)  # distinct ids


def _logits_for_shift(tokens, shift, big=30.0):
    """``[B, T, V]`` logits that put all mass on ``tokens[t + shift]`` (uniform past the end)."""
    B, T_ = tokens.shape
    out = np.zeros((B, T_, V), np.float32)
    for t in range(T_ - shift):
        out[np.arange(B), t, tokens[:, t + shift]] = big
    return out


def _np_ce(logits, target):
    logits = logits.astype(np.float64)
    m = logits.max()
    return np.log(np.exp(logits - m).sum()) + m - logits[target]


def test_perfect_heads_for_their_own_shift():
    """Head k is scored against token t+k+2: logits built for that shift give CE≈0, top-1 = 1."""
    ones = np.ones_like(TOKENS)
    logits = np.stack([_logits_for_shift(TOKENS, k + 2) for k in range(M)], axis=2)
    total, m = medusa_loss(jnp.asarray(logits), TOKENS, ones)
    np.testing.assert_allclose(m["head_loss"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["head_top1"], 1.0)
    np.testing.assert_allclose(m["head_count"], [T - 2, T - 3, T - 4])
    assert float(total) < 1e-5


def test_wrong_shift_is_punished():
    """Logits for the base-head shift (t+1) or one too far (t+k+3) are wrong for every head."""
    ones = np.ones_like(TOKENS)
    for off in (1, 3):
        logits = np.stack([_logits_for_shift(TOKENS, k + off) for k in range(M)], axis=2)
        _, m = medusa_loss(jnp.asarray(logits), TOKENS, ones)
        assert np.all(np.asarray(m["head_loss"]) > 20.0)
        np.testing.assert_allclose(m["head_top1"], 0.0)


def test_decay_weights_and_per_head_mean():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, T, M, V)).astype(np.float32)
    tokens = rng.integers(0, V, (2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    decay = 0.7
    total, m = medusa_loss(jnp.asarray(logits), tokens, mask, decay=decay)
    expected = []
    for k in range(M):
        s = k + 2
        ces = [_np_ce(logits[b, t, k], tokens[b, t + s]) for b in range(2) for t in range(T - s)]
        expected.append(np.mean(ces))
    np.testing.assert_allclose(m["head_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(total, sum(decay**k * e for k, e in enumerate(expected)), rtol=1e-5)


def test_mask_is_read_at_the_target_position():
    """Positions whose *target* is masked do not count, whatever their logits say."""
    mask = np.ones_like(TOKENS)
    mask[0, :6] = 0  # the prompt: targets at positions 0..5 are not trained
    logits = np.stack([_logits_for_shift(TOKENS, k + 2) for k in range(M)], axis=2)
    # Ruin the logits of every position whose target (for head 0: t+2) lies in the prompt.
    logits[0, :4, 0] = -logits[0, :4, 0]
    _, m = medusa_loss(jnp.asarray(logits), TOKENS, mask)
    np.testing.assert_allclose(m["head_count"], [T - 6] * M)  # targets 6..T-1, every head
    np.testing.assert_allclose(m["head_loss"], 0.0, atol=1e-6)
    # Ruining a position whose target is trained does show up.
    logits[0, 4, 0] = -logits[0, 4, 0]
    _, m = medusa_loss(jnp.asarray(logits), TOKENS, mask)
    assert float(m["head_loss"][0]) > 1.0


def test_top5_counts_rank():
    logits = np.zeros((1, T, 1, V), np.float32)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, 2] = 4
    # At position 0 (target tokens[2] = 4) the target is ranked 3rd.
    logits[0, 0, 0] = np.arange(V)[::-1] * 0.1  # token 0 best, then 1, 2, ...
    logits[0, 0, 0, 4] = logits[0, 0, 0, 1] + 0.01  # above token 1 -> rank 2 (0-based)
    mask = np.zeros((1, T), np.int32)
    mask[0, 2] = 1
    _, m = medusa_loss(jnp.asarray(logits), tokens, mask)
    assert float(m["head_top1"][0]) == 0.0 and float(m["head_top5"][0]) == 1.0
    logits[0, 0, 0, 4] = logits[0, 0, 0, 6] - 0.01  # rank 7
    _, m = medusa_loss(jnp.asarray(logits), tokens, mask)
    assert float(m["head_top5"][0]) == 0.0


def test_segments_stop_targets_at_the_boundary():
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0]], np.int32)
    mask = (seg > 0).astype(np.int32)
    _, valid = shifted_targets(jnp.asarray(TOKENS), mask, 2, jnp.asarray(seg))
    expected = np.zeros((1, T), bool)
    expected[0, [0, 1, 4, 5, 6]] = True  # t and t+2 in the same (non-padding) segment
    np.testing.assert_array_equal(valid, expected)


def test_from_hidden_matches_logits_version_and_grads():
    """One-head-at-a-time projection (with remat) equals projecting all heads at once."""
    rng = np.random.default_rng(1)
    D = 8
    hidden = jnp.asarray(rng.normal(size=(2, T, M, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(M, D, V)), jnp.float32)
    tokens = rng.integers(0, V, (2, T)).astype(np.int32)
    mask = rng.integers(0, 2, (2, T)).astype(np.int32)

    def full(w):
        return medusa_loss(jnp.einsum("btmd,mdv->btmv", hidden, w), tokens, mask)

    def looped(w):
        return medusa_loss_from_hidden(hidden, lambda k, h: h @ w[k], tokens, mask)

    (l1, m1), g1 = jax.value_and_grad(full, has_aux=True)(w)
    (l2, m2), g2 = jax.value_and_grad(looped, has_aux=True)(w)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for key in m1:
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_lm_loss_hand_computed():
    tokens = np.array([[0, 2, 1]], np.int32)
    mask = np.array([[0, 1, 0]], np.int32)  # only the target at position 1 (token 2) counts
    logits = np.array([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]], np.float32)
    loss, m = lm_loss(jnp.asarray(logits), tokens, mask)
    # Position 0 predicts token 2: CE = logsumexp(1, 0, 2) - 2.
    np.testing.assert_allclose(loss, np.log(np.e + 1 + np.e**2) - 2.0, rtol=1e-6)
    assert float(m["lm_count"]) == 1 and float(m["lm_top1"]) == 1.0


def test_kd_loss():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    mask = np.ones((2, 5), np.int32)
    zero, m = kd_loss(a, a, mask)
    assert abs(float(zero)) < 1e-6 and float(m["kd_count"]) == 8
    assert float(kd_loss(a, a[::-1], mask)[0]) > 0.0
    # Hand case: teacher (0.5, 0.5), student (0.25, 0.75) at the one valid position.
    teacher = np.zeros((1, 2, 2), np.float32)
    student = np.zeros((1, 2, 2), np.float32)
    student[0, 0] = [0.0, np.log(3.0)]
    student[0, 1] = [100.0, -100.0]  # position 1 has no next token: ignored
    kl, _ = kd_loss(jnp.asarray(student), jnp.asarray(teacher), np.ones((1, 2), np.int32))
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_empty_mask_gives_zero_not_nan():
    logits = jnp.zeros((1, T, M, V))
    total, m = medusa_loss(logits, TOKENS, np.zeros_like(TOKENS))
    assert float(total) == 0.0 and not np.any(np.isnan(np.asarray(m["head_top1"])))


@pytest.mark.parametrize("shift", [1, 2, T + 3])
def test_shift_past_the_end(shift):
    targets, valid = shifted_targets(jnp.asarray(TOKENS), np.ones_like(TOKENS), shift)
    n = max(T - shift, 0)
    np.testing.assert_array_equal(targets[0, :n], TOKENS[0, shift:])
    assert int(valid.sum()) == n
