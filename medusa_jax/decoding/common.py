"""Prompt batching, validation and the host-side driver shared by the decoding loops."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import ModelConfig
from medusa_jax.decoding.sampling import SamplingConfig
from medusa_jax.errors import GenerationError
from medusa_jax.model import llama

PROMPT_BUCKET_MIN = 16


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Static settings of one compiled loop."""

    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        # a tuple keeps the settings hashable (they are a static jit argument)
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


def bucket(n: int, minimum: int = PROMPT_BUCKET_MIN) -> int:
    """Round a length up to a power of two (then multiples of 256) so few shapes compile."""
    b = minimum
    while b < n and b < 256:
        b *= 2
    return b if b >= n else -(-n // 256) * 256


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to a bucketed length: ``tokens [B, Tp]``, ``lengths [B]``."""
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    lens = np.array([len(p) for p in prompts], np.int32)
    for i, n in enumerate(lens):
        if n == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
    Tp = bucket(int(lens.max()))
    toks = np.full((len(prompts), Tp), pad_id, np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = np.asarray(p, np.int32)
    return toks, lens


def check_lengths(cfg: ModelConfig, prompt_len: int, max_new_tokens: int, extra: int = 0,
                  cache_len: int | None = None) -> int:
    """Validate that prompt + new tokens (+ ``extra`` scratch slots, e.g. a Medusa tree) fit the
    model's context and the cache; return the cache length to allocate."""
    need = prompt_len + max_new_tokens
    if need > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
            f"model's context of {cfg.max_position_embeddings} tokens"
        )
    want = bucket(prompt_len) + max_new_tokens + extra
    want = -(-want // 64) * 64
    if cache_len is None:
        return want
    if prompt_len + max_new_tokens + extra > cache_len:
        raise GenerationError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})"
            + (f" + {extra} tree slots" if extra else "")
            + f" does not fit the KV cache of {cache_len} slots"
        )
    return cache_len


def prefill(cfg: ModelConfig, params, tokens, prompt_lens, cache):
    """Run the prompts through the model. Returns the final hidden state at each row's last
    prompt token ``[B, D]`` and the cache advanced to ``prompt_lens``."""
    hidden, cache = llama.forward(cfg, params, tokens, cache=cache)  # [B, Tp, D]
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    return last, cache.advance(prompt_lens)


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


# Steps the loops run on device between returns to the host when nothing is streamed: the host
# then checks for Ctrl-C, so an interrupted run stops within a chunk and keeps what it generated.
# A return costs one small device-to-host copy (benchmarks/bench_streaming.py: no measurable
# cost at 8 steps).
HOST_CHUNK_STEPS = 32


class _InterruptLatch:
    """While active (main thread only), the first SIGINT only sets ``hit``; a second one raises
    KeyboardInterrupt at once, as usual."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def drive(step_fn: Callable, state, limit: int, chunk: int | None,
          on_chunk: Callable | None = None):
    """Advance a decode ``state`` with ``step_fn(state, stop_step)`` until ``state.finished``.

    Returns ``(state, interrupted)``. ``chunk=None`` runs the whole loop on device in one call;
    otherwise the loop returns to the host every ``chunk`` steps (same compiled function), where
    ``on_chunk(state)`` can stream text and a Ctrl-C (SIGINT) ends the loop with the state so
    far and ``interrupted=True``."""
    if chunk is None:
        return step_fn(state, jnp.int32(limit)), False
    stop = 0
    with _InterruptLatch() as latch:
        while True:
            stop = min(stop + chunk, limit)
            state = step_fn(state, jnp.int32(stop))
            if on_chunk is not None:
                on_chunk(state)
            if stop >= limit or bool(state.finished()):
                return state, False
            if latch.hit:
                return state, True


class Timer:
    """Wall time of the host and device work between ``mark()`` calls, less the compile time of
    the calls made through ``compiled`` in between (the caller blocks on results before
    marking). ``compile_seconds``: all compile time so far."""

    def __init__(self):
        self.compile_seconds = 0.0
        self._t, self._compile_at_mark = time.perf_counter(), 0.0

    def compiled(self, fn, *args, **static):
        """``compiled_call(fn, *args, **static)``'s result; its compile time is counted here."""
        out, seconds = compiled_call(fn, *args, **static)
        self.compile_seconds += seconds
        return out

    def mark(self) -> float:
        t = time.perf_counter()
        dt = (t - self._t) - (self.compile_seconds - self._compile_at_mark)
        self._t, self._compile_at_mark = t, self.compile_seconds
        return max(dt, 0.0)


def trim_outputs(out: np.ndarray, n_out: np.ndarray) -> list[list[int]]:
    return [out[b, : int(n_out[b])].tolist() for b in range(out.shape[0])]


_COMPILED: dict = {}
_LAST: dict = {}  # fn -> the executable compiled_call last ran for it


def last_executable(fn):
    """The compiled executable :func:`compiled_call` last ran for ``fn`` (None if none): its
    optimised HLO names the ops a profile of that run shows (:mod:`medusa_jax.profiling`)."""
    return _LAST.get(fn)


def compiled_call(fn, *args, **static):
    """Call the jitted ``fn`` through an ahead-of-time compiled executable cached per static
    settings and argument shapes, so compile time is measured apart from run time. Returns
    ``(result, seconds spent compiling in this call)`` (0.0 when the executable was cached)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, tuple(sorted(static.items())), treedef,
           tuple((np.shape(x), jnp.result_type(x), getattr(x, "weak_type", False)) for x in leaves))
    exe, seconds = _COMPILED.get(key), 0.0
    if exe is None:
        t = time.perf_counter()
        exe = _COMPILED[key] = fn.lower(*args, **static).compile()
        seconds = time.perf_counter() - t
    _LAST[fn] = exe
    return exe(*args), seconds
