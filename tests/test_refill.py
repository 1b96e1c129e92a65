"""Continuous batching (decoding/refill.py) on the random tiny model: every answer equals the prompt
decoded alone by the vanilla loop (greedy, answers of different lengths so rows are refilled
while others run), the kept hidden states equal a full forward over prompt + answer, and a
sampled answer depends only on its prompt and seed, not on the batch it shared."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from medusa_jax.decoding.common import GenerationError, GenerationSettings
from medusa_jax.decoding.refill import RefillingGenerator
from medusa_jax.decoding.sampling import SamplingConfig
from medusa_jax.decoding.vanilla import generate
from medusa_jax.model import llama

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3], [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42],
           [7, 7, 2, 9], [30, 31]]
G = GenerationSettings(max_new_tokens=16)


def _run(cfg, params, settings, prompts, seeds=None, batch_size=2, keep_hidden=False):
    gen = RefillingGenerator(cfg, params, settings, batch_size=batch_size, max_prompt_len=16,
                             keep_hidden=keep_hidden)
    seeds = seeds or [0] * len(prompts)
    q = collections.deque((i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)))
    got = {tag: (toks, hid) for tag, toks, hid in gen.run(q)}
    assert sorted(got) == list(range(len(prompts)))
    return [got[i] for i in range(len(prompts))], gen


@pytest.fixture(scope="module")
def eos_settings(tiny_cfg, tiny_params):
    """An EOS token that the greedy answers hit at different depths (some never)."""
    alone = [generate(tiny_cfg, tiny_params, [p], G)["tokens"][0] for p in PROMPTS]
    counts = collections.Counter(t for a in alone for t in a[2:12])
    eos = counts.most_common(1)[0][0]
    return GenerationSettings(max_new_tokens=16, eos_token_ids=(eos,))


def test_refilled_rows_equal_each_prompt_decoded_alone(tiny_cfg, tiny_params, eos_settings):
    alone = [generate(tiny_cfg, tiny_params, [p], eos_settings)["tokens"][0] for p in PROMPTS]
    assert len({len(a) for a in alone}) > 1, "the test needs answers of different lengths"
    got, gen = _run(tiny_cfg, tiny_params, eos_settings, PROMPTS, keep_hidden=True)
    assert [t for t, _ in got] == alone
    assert gen.refills == len(PROMPTS)
    # every decode step advanced a full batch except near the end: fewer steps than the
    # static batches of 2 need (each as long as its longer answer)
    static = sum(max(len(a) for a in alone[i:i + 2]) - 1 for i in range(0, len(alone), 2))
    assert gen.steps <= static
    # each answer's first token is drawn by its refill, every other one by a decode step in
    # which its row was live; near the end rows wait for the queue's last answer
    assert gen.busy_row_steps == sum(len(a) for a in alone) - len(PROMPTS)
    assert 0 < gen.occupancy == gen.busy_row_steps / (2 * gen.steps) < 1
    # the queue ran empty once every prompt was admitted (each refill drew a token), before
    # the last answers were done
    assert gen.queue_seconds > 0
    assert len(PROMPTS) <= gen.queue_tokens < sum(len(a) for a in alone)


def test_kept_hidden_states_are_the_full_forward_states(tiny_cfg, tiny_params, eos_settings):
    got, _ = _run(tiny_cfg, tiny_params, eos_settings, PROMPTS, keep_hidden=True)
    for p, (toks, hid) in zip(PROMPTS, got, strict=True):
        seq = np.zeros((1, 32), np.int32)  # one shape: right padding is invisible to a causal
        seq[0, : len(p) + len(toks)] = p + toks  # forward
        h, _ = llama.forward(tiny_cfg, tiny_params, jax.numpy.asarray(seq))
        want = np.asarray(h[0, len(p) - 1: len(p) - 1 + len(toks)])
        assert hid.shape == want.shape
        np.testing.assert_allclose(hid, want, atol=1e-4, rtol=1e-4)
        # the state at answer position j chose token j
        lg = np.asarray(llama.logits(tiny_cfg, tiny_params, jax.numpy.asarray(hid)))
        assert lg.argmax(-1).tolist() == toks


def test_a_sampled_answer_depends_only_on_its_prompt_and_seed(tiny_cfg, tiny_params):
    s = GenerationSettings(max_new_tokens=16, sampling=SamplingConfig(1.0, 1.0))
    mixed, _ = _run(tiny_cfg, tiny_params, s, PROMPTS, seeds=[11, 12, 13, 14, 15, 16],
                    batch_size=3)
    alone, _ = _run(tiny_cfg, tiny_params, s, PROMPTS[3:4], seeds=[14], batch_size=3)
    assert mixed[3][0] == alone[0][0]
    other, _ = _run(tiny_cfg, tiny_params, s, PROMPTS[3:4], seeds=[99], batch_size=3)
    assert other[0][0] != alone[0][0]


def test_a_prompt_longer_than_the_cache_allows_is_refused(tiny_cfg, tiny_params):
    with pytest.raises(GenerationError, match="prompt of 17 tokens"):
        _run(tiny_cfg, tiny_params, G, [list(range(1, 18))])
