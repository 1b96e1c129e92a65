"""The length-aware attention (prefix in blocks up to the longest live row + the new tokens,
merged by log-sum-exp) equals the dense reference: tree masks, causal chunks, long prompts,
ragged row lengths, batch > 1, GQA and MQA, several prefix blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.model.attention import attention, attention_reference, prefix_block_size
from medusa_jax.tree import build_tree, get_tree


def _case(rng, B, T, N, K, H, L=2, S=96):
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    kc = rng.standard_normal((L, B, K, S, H)).astype(np.float32)
    vc = rng.standard_normal((L, B, K, S, H)).astype(np.float32)
    kn = rng.standard_normal((B, T, K, H)).astype(np.float32)
    vn = rng.standard_normal((B, T, K, H)).astype(np.float32)
    return [jnp.asarray(a) for a in (q, kc, vc, kn, vn)]


_TREE = build_tree(get_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))


@pytest.mark.parametrize("N, K", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("mask", ["tree", "causal", "tree_per_row"])
@pytest.mark.parametrize("block", [None, 16])  # one block, or several (96 slots / 16)
def test_attention_equals_reference(N, K, mask, block):
    rng = np.random.default_rng(0)
    B, T, H = 3, _TREE.num_nodes, 8
    q, kc, vc, kn, vn = _case(rng, B, T, N, K, H)
    lengths = jnp.array([0, 37, 80], jnp.int32)  # ragged: empty, mid-block, several blocks
    cm = {"tree": jnp.asarray(_TREE.attn_mask), "causal": None,
          "tree_per_row": jnp.asarray(np.stack([_TREE.attn_mask, np.eye(T, dtype=bool),
                                                _TREE.attn_mask]))}[mask]
    for layer in (0, 1):
        out, kc2, vc2 = attention(q, kc, vc, layer, lengths, kn, vn, cm, block=block)
        ref = attention_reference(q, kc, vc, layer, lengths, kn, vn, cm)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
        assert kc2 is kc or np.array_equal(np.asarray(kc2), np.asarray(kc))


def test_slots_past_the_lengths_are_masked_and_blocks_past_them_never_read():
    """Garbage beyond a row's length does not leak into its attention: huge values inside a
    live block are masked, and blocks past the longest row are not read at all (NaN there
    would poison the result)."""
    rng = np.random.default_rng(1)
    q, kc, vc, kn, vn = _case(rng, 2, 4, 4, 2, 8)
    lengths = jnp.array([10, 50], jnp.int32)  # blocks of 16: rows live in blocks 0 and 0-3
    k_bad = kc.at[:, 0, :, 10:64].set(1e4).at[:, 1, :, 50:64].set(1e4).at[:, :, :, 64:].set(jnp.nan)
    v_bad = vc.at[:, 0, :, 10:64].set(1e4).at[:, 1, :, 50:64].set(1e4).at[:, :, :, 64:].set(jnp.nan)
    out, _, _ = attention(q, k_bad, v_bad, 0, lengths, kn, vn, None, block=16)
    ref = attention_reference(q, kc, vc, 0, lengths, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_long_prompt_blocks_equal_reference():
    """A prompt longer than one new-token block is attended causally block by block."""
    rng = np.random.default_rng(2)
    q, kc, vc, kn, vn = _case(rng, 2, 512, 4, 2, 8, L=1, S=600)
    lengths = jnp.array([0, 64], jnp.int32)
    out, _, _ = attention(q, kc, vc, 0, lengths, kn, vn, None)
    ref = attention_reference(q, kc, vc, 0, lengths, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_stay_close_to_the_f32_reference():
    rng = np.random.default_rng(3)
    q, kc, vc, kn, vn = _case(rng, 2, 6, 4, 2, 16)
    lengths = jnp.array([20, 90], jnp.int32)
    bf = [a.astype(jnp.bfloat16) for a in (q, kc, vc, kn, vn)]
    out, _, _ = attention(bf[0], bf[1], bf[2], 0, lengths, bf[3], bf[4], None, block=32)
    ref = attention_reference(q, kc, vc, 0, lengths, kn, vn, None)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2)


def test_prefix_block_divides_the_cache():
    for S in (48, 512, 1024, 2048, 8192, 8256, 640):
        b = prefix_block_size(S)
        assert S % b == 0 and b <= max(512, S if S <= 512 else 512)


def test_prefix_loop_runs_only_over_live_blocks():
    """The trip count follows the longest row: with lengths 0 the prefix is not read at all
    (its values would poison the result if it were)."""
    rng = np.random.default_rng(4)
    q, kc, vc, kn, vn = _case(rng, 2, 3, 4, 2, 8)
    nan = jnp.full_like(kc, jnp.nan)
    out, _, _ = jax.jit(lambda *a: attention(*a, None, block=16))(
        q, nan, nan, 0, jnp.zeros((2,), jnp.int32), kn, vn)
    ref = attention_reference(q, None, None, None, None, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_new_tokens_already_in_the_cache_read_with_the_prefix(T):
    """A decode step writes its K/V first and reads them in the prefix loop (one pass)."""
    rng = np.random.default_rng(5)
    q, kc, vc, kn, vn = _case(rng, 3, T, 4, 2, 8)
    lengths = jnp.array([0, 15, 70], jnp.int32)
    rows, slots = jnp.arange(3)[:, None], lengths[:, None] + jnp.arange(T)[None]
    kw, vw = kc.at[1, rows, :, slots].set(kn), vc.at[1, rows, :, slots].set(vn)
    out, _, _ = attention(q, kw, vw, 1, lengths, kn, vn, None, block=16, new_in_cache=True)
    ref = attention_reference(q, kc, vc, 1, lengths, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ Pallas kernels (interpret)
KERNELS = ["pallas_gpu", "pallas_tpu"]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("N, K", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_kernel_prefix_merged_with_the_tree_block_equals_reference(impl, N, K):
    """The kernel reads the committed prefix (ragged rows: empty, mid-block, several blocks;
    the GPU one in several slot splits), the tree block is dense, the two merge by LSE."""
    rng = np.random.default_rng(6)
    B, T, H = 3, _TREE.num_nodes, 8
    q, kc, vc, kn, vn = _case(rng, B, T, N, K, H)
    lengths = jnp.array([0, 37, 80], jnp.int32)
    per_row = jnp.asarray(np.stack([_TREE.attn_mask, np.eye(T, dtype=bool), _TREE.attn_mask]))
    for layer, cm in ((0, jnp.asarray(_TREE.attn_mask)), (1, per_row), (1, None)):
        out, kc2, _ = attention(q, kc, vc, layer, lengths, kn, vn, cm, impl=impl, block=16)
        ref = attention_reference(q, kc, vc, layer, lengths, kn, vn, cm)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
        assert kc2 is kc


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_decode_step_reads_itself_in_the_cache(impl):
    """A one-token step already written to the cache: the kernel reads slots < length + 1."""
    rng = np.random.default_rng(7)
    q, kc, vc, kn, vn = _case(rng, 3, 1, 4, 2, 8)
    lengths = jnp.array([0, 15, 70], jnp.int32)
    rows, slots = jnp.arange(3)[:, None], lengths[:, None]
    kw, vw = kc.at[1, rows, :, slots].set(kn), vc.at[1, rows, :, slots].set(vn)
    out, _, _ = attention(q, kw, vw, 1, lengths, kn, vn, None, impl=impl, block=16,
                          new_in_cache=True)
    ref = attention_reference(q, kc, vc, 1, lengths, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_never_reads_past_the_lengths(impl):
    """Garbage past a row's length stays out: huge values inside its last live block are
    masked, NaN in the blocks past it is never read (as for the XLA loop above)."""
    rng = np.random.default_rng(8)
    q, kc, vc, kn, vn = _case(rng, 2, 4, 4, 2, 8)
    lengths = jnp.array([10, 50], jnp.int32)  # blocks of 16: live blocks 0 and 0-3
    slot = jnp.arange(kc.shape[3])[None, None, :, None]
    past = slot >= lengths[None, :, None, None, None]
    dead = slot >= jnp.array([16, 64])[None, :, None, None, None]
    k_bad = jnp.where(dead, jnp.nan, jnp.where(past, 1e4, kc))
    v_bad = jnp.where(dead, jnp.nan, jnp.where(past, 1e4, vc))
    out, _, _ = attention(q, k_bad, v_bad, 0, lengths, kn, vn, None, impl=impl, block=16)
    ref = attention_reference(q, kc, vc, 0, lengths, kn, vn, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_backend_choice_keeps_the_xla_loop_on_cpu():
    from medusa_jax.model.attention import resolve_impl

    assert resolve_impl("auto") == "xla"  # this suite runs on CPU
    assert resolve_impl("auto", "cpu") == "xla" and resolve_impl("auto", "gpu") == "xla"
    assert resolve_impl("pallas_tpu", "cpu") == "pallas_tpu"
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        resolve_impl("flash")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_their_hardware(platform):
    """The kernels at the shapes the device check runs lower to Triton / Mosaic on this CPU
    (Triton loads must be powers of two, Mosaic blocks tile; compiling needs the chip)."""
    from medusa_jax.model import kernels

    fn = kernels.prefix_state_gpu if platform == "cuda" else kernels.prefix_state_tpu
    sd = jax.ShapeDtypeStruct
    for T, N, K, H in ((64, 32, 32, 128), (1, 32, 32, 128), (64, 9, 3, 64)):  # 7B, SmolLM2
        args = (sd((1, T, N, H), jnp.bfloat16), sd((2, 1, K, 1024, H), jnp.bfloat16),
                sd((2, 1, K, 1024, H), jnp.bfloat16), sd((), jnp.int32), sd((1,), jnp.int32))
        block = 64 if platform == "cuda" else 128
        low = jax.jit(functools.partial(fn, T=T, G=N // K, block=block)).trace(*args).lower(
            lowering_platforms=(platform,))
        assert "medusa_prefix_attention" in low.as_text()


def test_decoding_through_a_kernel_gives_the_xla_loops_tokens(tiny_cfg, tiny_params, monkeypatch):
    """The model reaches the kernel through ModelConfig.attention_impl: prefill, decode steps
    and a Medusa verification (ragged rows, batch 2) give the tokens of the XLA loop."""
    from medusa_jax.config import MedusaConfig
    from medusa_jax.decoding.common import GenerationSettings
    from medusa_jax.decoding.medusa import make_settings, medusa_generate
    from medusa_jax.decoding.vanilla import generate
    from medusa_jax.model import kernels
    from medusa_jax.model.heads import init_medusa_params

    traced = []
    original = kernels.prefix_state_gpu
    monkeypatch.setattr(kernels, "prefix_state_gpu",
                        lambda *a, **k: traced.append(k["T"]) or original(*a, **k))
    prompts, gen = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]], GenerationSettings(max_new_tokens=6)
    mcfg = MedusaConfig.for_model(tiny_cfg, num_heads=2)
    params = {"base": tiny_params, "medusa": init_medusa_params(mcfg, scale=0.3)}
    st = make_settings([[0], [1], [0, 0]], 2, gen)
    kcfg = tiny_cfg.replace(attention_impl="pallas_gpu")
    assert generate(kcfg, tiny_params, prompts, gen)["tokens"] == \
        generate(tiny_cfg, tiny_params, prompts, gen)["tokens"]
    assert medusa_generate(kcfg, mcfg, params, prompts, st)["tokens"] == \
        medusa_generate(tiny_cfg, mcfg, params, prompts, st)["tokens"]
    assert {1, st.tree.num_nodes} <= set(traced)  # decode steps and verifications used it


@pytest.mark.parametrize("impl", ["xla", "reference"] + KERNELS)
@pytest.mark.parametrize("new_in_cache", [False, True], ids=["tree", "decode_step"])
def test_per_layer_buffers_equal_the_stacked_cache(impl, new_in_cache):
    """A cache stored as one buffer per layer (unrolled layers, batch > 1) gives the stacked
    cache's attention on every path, and comes back with only that layer's buffer touched."""
    rng = np.random.default_rng(9)
    T = 1 if new_in_cache else _TREE.num_nodes
    q, kc, vc, kn, vn = _case(rng, 3, T, 4, 2, 8)
    lengths = jnp.array([0, 37, 80], jnp.int32)
    cm = None if new_in_cache else jnp.asarray(_TREE.attn_mask)
    k_layers, v_layers = tuple(kc), tuple(vc)  # [B, K, S, H] each
    for layer in (0, 1):
        for block in (None, 16):
            kw = dict(impl=impl, block=block, new_in_cache=new_in_cache)
            want, _, _ = attention(q, kc, vc, layer, lengths, kn, vn, cm, **kw)
            got, k2, v2 = attention(q, k_layers, v_layers, layer, lengths, kn, vn, cm, **kw)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
            assert isinstance(k2, tuple) and len(k2) == 2 and isinstance(v2, tuple)
            for a, b in zip(k2 + v2, k_layers + v_layers):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
