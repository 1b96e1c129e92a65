"""Continuous batching for plain decoding: a fixed set of ``B`` rows, each refilled with the next
prompt of a queue as soon as its answer finishes, so the batch stays full.

The static-batch loop (:mod:`medusa_jax.decoding.vanilla`) runs every row until the longest
answer of the batch ends; with answers of very different lengths most rows idle for most of the
batch. Here the host keeps a queue: whenever a row finishes, the decode loop returns, the
answer is handed out, and that row's KV cache slice is overwritten by the next prompt's prefill
(one row, in place: the state is donated). Rows are independent, so a row's answer is the one the
prompt gets decoded alone (greedy), and with sampling each row draws from its own key
(``fold_in(PRNGKey(seed), i)`` for its ``i``-th token), so the answer depends only on the
prompt and its seed, never on which other prompts share the batch or when it was admitted.

With ``keep_hidden`` the base model's final-normed hidden state at every answer position (the
state whose LM-head logits chose the token) comes out with the answer: what
:meth:`medusa_jax.training.hidden_set.HiddenSet.from_answers` trains heads on, without a second pass
over the data.

Two compiled programs: :func:`refill_row` (one per prompt-length bucket of ``PROMPT_STEP``
tokens) and :func:`decode_until_free`.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from medusa_jax.config import ModelConfig
from medusa_jax.decoding.common import GenerationSettings, check_lengths, is_eos, prefill
from medusa_jax.decoding.sampling import sample
from medusa_jax.errors import GenerationError
from medusa_jax.model import llama
from medusa_jax.model.cache import KVCache

PROMPT_STEP = 64  # refill prompts are padded to a multiple of this (few compiled shapes)


@struct.dataclass
class RefillState:
    cache: KVCache
    last: jax.Array  # [B] the newest token of each row
    out: jax.Array  # [B, max_new] the answer so far (pad after n_out)
    n_out: jax.Array  # [B]
    done: jax.Array  # [B] finished, or holding no prompt
    seeds: jax.Array  # [B] int32: the row's sampling seed
    hidden: jax.Array  # [B, max_new, D] (or [B, 0, D] without keep_hidden)
    step: jax.Array  # scalar: decode steps run


def init_state(cfg: ModelConfig, batch_size: int, cache_len: int, max_new: int,
               keep_hidden: bool, per_layer: bool | None = None) -> RefillState:
    """All rows empty (``done``); ``per_layer``: the cache's layout (``KVCache.init``)."""
    B = batch_size
    hid = (B, max_new if keep_hidden else 0, cfg.hidden_size)
    return RefillState(KVCache.init(cfg, B, cache_len, per_layer=per_layer), jnp.zeros((B,), jnp.int32),
                       jnp.zeros((B, max_new), jnp.int32), jnp.zeros((B,), jnp.int32),
                       jnp.ones((B,), bool), jnp.zeros((B,), jnp.int32),
                       jnp.zeros(hid, jnp.dtype(cfg.dtype)), jnp.int32(0))


def _draw(logits, seeds, index, settings: GenerationSettings):
    """Each row's token from its own key: ``fold_in(PRNGKey(seed), index)``."""
    if settings.sampling.greedy:
        return sample(logits, jax.random.PRNGKey(0), settings.sampling)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, index)
    return jax.vmap(lambda lg, k: sample(lg[None], k, settings.sampling)[0])(logits, keys)


@functools.partial(jax.jit, static_argnames=("cfg", "settings"), donate_argnames=("state",))
def refill_row(params, state: RefillState, tokens, length, row, seed, *, cfg: ModelConfig,
               settings: GenerationSettings) -> RefillState:
    """Put the prompt ``tokens [1, P]`` (``length`` real tokens) in row ``row``: its cache slice
    is prefilled from scratch and its first answer token drawn."""
    one = state.cache.row(row)
    last_h, one = prefill(cfg, params, tokens, length[None], one)  # [1, D]
    tok = _draw(llama.logits(cfg, params, last_h), seed[None], jnp.zeros((1,), jnp.int32),
                settings)
    cache = state.cache.put_row(row, one, length)
    max_new = settings.max_new_tokens
    out = state.out.at[row].set(jnp.full((max_new,), settings.pad_token_id, jnp.int32))
    out = out.at[row, 0].set(tok[0])
    hidden = state.hidden
    if hidden.shape[1]:
        hidden = hidden.at[row, 0].set(last_h[0].astype(hidden.dtype))
    done = is_eos(tok[0], settings.eos_token_ids) | (max_new <= 1)
    return state.replace(cache=cache, last=state.last.at[row].set(tok[0]), out=out,
                         n_out=state.n_out.at[row].set(1), done=state.done.at[row].set(done),
                         seeds=state.seeds.at[row].set(seed), hidden=hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "settings"), donate_argnames=("state",))
def decode_until_free(params, state: RefillState, want_done, *, cfg: ModelConfig,
                      settings: GenerationSettings) -> RefillState:
    """Decode one token per live row per step until at least ``want_done`` rows are done (a
    finished answer frees its row) or every row is."""
    max_new = settings.max_new_tokens
    B = state.last.shape[0]
    rows = jnp.arange(B)

    def cond(s: RefillState):
        n = jnp.sum(s.done)
        return (n < want_done) & (n < B)

    def body(s: RefillState):
        h, cache = llama.forward(cfg, params, s.last[:, None], cache=s.cache)
        h = h[:, 0]
        tok = _draw(llama.logits(cfg, params, h), s.seeds, s.n_out, settings)
        live = ~s.done
        slot = jnp.where(live, s.n_out, max_new)  # done rows write out of bounds: dropped
        hidden = s.hidden
        if hidden.shape[1]:
            hidden = hidden.at[rows, slot].set(h.astype(hidden.dtype), mode="drop")
        out = s.out.at[rows, slot].set(tok, mode="drop")
        n_out = s.n_out + live.astype(jnp.int32)
        done = s.done | (live & is_eos(tok, settings.eos_token_ids)) | (n_out >= max_new)
        last = jnp.where(live, tok, s.last)
        return s.replace(cache=cache.advance(live.astype(jnp.int32)), last=last, out=out,
                         n_out=n_out, done=done, hidden=hidden, step=s.step + 1)

    return jax.lax.while_loop(cond, body, state)


@jax.jit
def _rows(hidden, idx):
    return jnp.take(hidden, idx, axis=0)


def prompt_width(n: int) -> int:
    return -(-n // PROMPT_STEP) * PROMPT_STEP


class RefillingGenerator:
    """``B`` rows decoding the prompts of a queue; see the module docstring.

    ``max_prompt_len`` bounds every prompt (the cache holds ``max_prompt_len`` rounded up to
    ``PROMPT_STEP`` plus ``max_new_tokens`` slots)."""

    def __init__(self, cfg: ModelConfig, params, settings: GenerationSettings, *,
                 batch_size: int, max_prompt_len: int, keep_hidden: bool = False,
                 per_layer: bool | None = None):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise GenerationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.cfg, self.params, self.settings = cfg, params, settings
        self.batch_size, self.keep_hidden = batch_size, keep_hidden
        self.per_layer = per_layer  # the cache's layout (KVCache.init's default when None)
        self.max_prompt_len = int(max_prompt_len)
        check_lengths(cfg, self.max_prompt_len, settings.max_new_tokens)
        self.cache_len = prompt_width(self.max_prompt_len) + settings.max_new_tokens
        self.steps = 0  # decode steps run (each advances every live row by one token)
        self.refills = 0
        self.tokens_yielded = 0  # in the answers handed out
        # the run until its queue first ran empty (every row busy; after it the rows drain):
        # wall seconds and tokens drawn (the refills' first tokens and the decode steps' ones)
        self.queue_seconds: float | None = None
        self.queue_tokens = 0

    @property
    def busy_row_steps(self) -> int:
        """Of the decode steps' ``batch_size`` rows each, the live ones (after a run: every
        token of an answer but its first, which its refill drew, came from one)."""
        return self.tokens_yielded - self.refills

    @property
    def occupancy(self) -> float:
        """The share of the decode steps' rows that held a live answer (the rest computed for
        nothing: rows waiting for the queue's last answers to finish, the tail of a run)."""
        return self.busy_row_steps / (self.steps * self.batch_size) if self.steps else 0.0

    def run(self, queue: collections.deque) -> Iterator[tuple[Any, list[int], np.ndarray | None]]:
        """Yield ``(tag, tokens, hidden)`` for each entry ``(tag, prompt_ids, seed)`` of
        ``queue`` as its answer finishes (EOS included when hit; ``hidden [n, D]`` float32 with
        ``keep_hidden``, else None). The caller may add entries to ``queue`` between yields (a
        conversation's next turn); the run ends when the queue is empty and every row is done."""
        cfg, st = self.cfg, self.settings
        B = self.batch_size
        state = init_state(cfg, B, self.cache_len, st.max_new_tokens, self.keep_hidden,
                           self.per_layer)
        tags: list[Any] = [None] * B
        t0 = time.perf_counter()
        while True:
            for r in range(B):
                if tags[r] is None and queue:
                    tag, prompt, seed = queue.popleft()
                    n = len(prompt)
                    if not 0 < n <= self.max_prompt_len:
                        raise GenerationError(f"prompt of {n} tokens for {tag!r}: need 1 to "
                                              f"{self.max_prompt_len}")
                    toks = np.full((1, prompt_width(n)), st.pad_token_id, np.int32)
                    toks[0, :n] = prompt
                    state = refill_row(self.params, state, jnp.asarray(toks), jnp.int32(n),
                                       jnp.int32(r), jnp.int32(seed), cfg=cfg, settings=st)
                    tags[r] = tag
                    self.refills += 1
            if not queue and self.queue_seconds is None:
                n_out = np.asarray(state.n_out)  # waits for the refills just dispatched
                self.queue_seconds = time.perf_counter() - t0
                self.queue_tokens = self.tokens_yielded + int(
                    sum(n_out[r] for r in range(B) if tags[r] is not None))
            if all(t is None for t in tags):
                return
            done = np.asarray(state.done)
            if not any(done[r] for r in range(B) if tags[r] is not None):
                before = int(state.step)
                state = decode_until_free(self.params, state, jnp.int32(int(done.sum()) + 1),
                                          cfg=cfg, settings=st)
                self.steps += int(state.step) - before
                done = np.asarray(state.done)
            out, n_out = np.asarray(state.out), np.asarray(state.n_out)
            free = [r for r in range(B) if tags[r] is not None and done[r]]
            hid = None
            if self.keep_hidden and free:
                # the finished rows' states in one gather and one transfer; the row list padded
                # to a power of two so that few gather shapes ever compile
                idx = free + free[:1] * ((1 << (len(free) - 1).bit_length()) - len(free))
                hid = np.asarray(_rows(state.hidden, jnp.asarray(idx, jnp.int32)), np.float32)
            for j, r in enumerate(free):
                n = int(n_out[r])
                tag, tags[r] = tags[r], None
                self.tokens_yielded += n
                yield tag, out[r, :n].tolist(), None if hid is None else hid[j, :n]
