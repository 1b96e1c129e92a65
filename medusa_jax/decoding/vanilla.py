"""Plain autoregressive decoding: one jitted ``lax.while_loop``, weights passed as arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from medusa_jax.config import ModelConfig
from medusa_jax.decoding.common import (
    GenerationSettings,
    Timer,
    check_lengths,
    drive,
    is_eos,
    pad_prompts,
    prefill,
    trim_outputs,
)
from medusa_jax.decoding.sampling import sample
from medusa_jax.model import llama
from medusa_jax.model.cache import KVCache


@struct.dataclass
class VanillaState:
    cache: KVCache
    last: jax.Array  # [B] the newest token, fed at the next step
    out: jax.Array  # [B, max_new] generated tokens (pad after n_out)
    n_out: jax.Array  # [B]
    done: jax.Array  # [B] row hit EOS or max_new
    rng: jax.Array
    step: jax.Array  # scalar: forward passes after prefill

    def finished(self):
        return jnp.all(self.done)


def _append(state_out, n_out, done, tok, eos_ids, max_new):
    """Write ``tok: [B]`` at each live row's next output slot."""
    B = tok.shape[0]
    live = ~done
    idx = jnp.where(live, n_out, max_new)  # done rows write out of bounds: dropped
    out = state_out.at[jnp.arange(B), idx].set(tok, mode="drop")
    n_out = n_out + live.astype(jnp.int32)
    done = done | (live & is_eos(tok, eos_ids)) | (n_out >= max_new)
    return out, n_out, done


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "cache_len"))
def vanilla_prefill(params, tokens, prompt_lens, rng, *, cfg: ModelConfig,
                    settings: GenerationSettings, cache_len: int) -> VanillaState:
    """The decode loop's first state: the padded prompts ``tokens [B, P]`` (``prompt_lens
    [B]``) in a fresh ``cache_len``-slot KV cache, the first token drawn."""
    B = tokens.shape[0]
    cache = KVCache.init(cfg, B, cache_len)
    last_h, cache = prefill(cfg, params, tokens, prompt_lens, cache)
    logits = llama.logits(cfg, params, last_h)  # [B, V]
    rng, sub = jax.random.split(rng)
    tok = sample(logits, sub, settings.sampling)
    out = jnp.full((B, settings.max_new_tokens), settings.pad_token_id, jnp.int32)
    out, n_out, done = _append(out, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool), tok,
                               settings.eos_token_ids, settings.max_new_tokens)
    return VanillaState(cache, tok, out, n_out, done, rng, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("cfg", "settings"), donate_argnames=("state",))
def vanilla_decode(params, state: VanillaState, stop_step, *, cfg: ModelConfig,
                   settings: GenerationSettings) -> VanillaState:
    """One token per row per step until ``state.step`` reaches ``stop_step`` or every row is
    done: the whole ``lax.while_loop``, ``state`` donated."""
    def cond(s: VanillaState):
        return (s.step < stop_step) & ~jnp.all(s.done)

    def body(s: VanillaState):
        # the phases' named scopes match the Medusa step's (medusa_jax.profiling)
        with jax.named_scope("verify"):
            h, cache = llama.forward(cfg, params, s.last[:, None], cache=s.cache)  # [B, 1, D]
            logits = llama.logits(cfg, params, h[:, 0])  # [B, V]
        with jax.named_scope("accept"):
            rng, sub = jax.random.split(s.rng)
            tok = sample(logits, sub, settings.sampling)
        with jax.named_scope("commit"):
            out, n_out, done = _append(s.out, s.n_out, s.done, tok, settings.eos_token_ids,
                                       settings.max_new_tokens)
        return VanillaState(cache.advance(jnp.ones_like(s.n_out)), tok, out, n_out, done, rng,
                            s.step + 1)

    return jax.lax.while_loop(cond, body, state)


def abstract_vanilla_state(params, batch_size: int, cache_len: int, *, cfg: ModelConfig,
                           settings: GenerationSettings) -> VanillaState:
    """The loop's state as ``jax.ShapeDtypeStruct`` leaves (what :func:`vanilla_prefill`
    returns for ``batch_size`` rows and a ``cache_len``-slot cache), from abstract or real
    base ``params``: the input :func:`vanilla_decode` is compiled for ahead of time."""
    fn = functools.partial(vanilla_prefill, cfg=cfg, settings=settings, cache_len=cache_len)
    return jax.eval_shape(fn, params, jax.ShapeDtypeStruct((batch_size, 16), jnp.int32),
                          jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                          jax.eval_shape(lambda: jax.random.PRNGKey(0)))


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]],
             settings: GenerationSettings, seed: int = 0, cache_len: int | None = None,
             stream_every: int | None = None, on_chunk: Callable | None = None) -> dict:
    """Generate for a batch of token-id prompts (any lengths). Returns ``tokens`` (one list per
    prompt, EOS included when hit) and ``steps``. ``stream_every=n`` returns to the host every
    ``n`` tokens and calls ``on_chunk(out [B, max_new], n_out [B])``; there a Ctrl-C stops the
    loop and the result says ``interrupted``. ``prefill_seconds`` / ``decode_seconds``: wall time
    of each part, compile time excluded (``compile_seconds``)."""
    timer = Timer()
    tokens, lens = pad_prompts(prompts, settings.pad_token_id)
    cache_len = check_lengths(cfg, int(lens.max()), settings.max_new_tokens, cache_len=cache_len)
    cache_len = max(cache_len, tokens.shape[1] + settings.max_new_tokens)
    state = timer.compiled(vanilla_prefill, params, jnp.asarray(tokens), jnp.asarray(lens),
                          jax.random.PRNGKey(seed), cfg=cfg, settings=settings,
                          cache_len=cache_len)
    jax.block_until_ready(state)
    prefill_s = timer.mark()

    def step(state, stop):
        return timer.compiled(vanilla_decode, params, state, stop, cfg=cfg, settings=settings)

    cb = None if on_chunk is None else (lambda s: on_chunk(np.asarray(s.out), np.asarray(s.n_out)))
    state, interrupted = drive(step, state, settings.max_new_tokens, stream_every, cb)
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    return {"tokens": trim_outputs(out, n_out), "steps": int(state.step) + 1,
            "interrupted": interrupted, "prefill_seconds": prefill_s,
            "decode_seconds": timer.mark(), "compile_seconds": timer.compile_seconds}
