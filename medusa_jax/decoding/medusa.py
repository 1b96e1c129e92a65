"""Medusa tree decoding: one jitted, static-shape ``lax.while_loop``.

Each step, per row: the root token (drawn by the acceptance rule after the last accepted
position); the heads' top-k at that position; tree tokens gathered from ``[root, head0 top-k,
head1 top-k, ...]`` (Hydra heads: depth by depth, head d run once over the depth-d nodes that
have children, each told its path's tokens, see :func:`hydra_proposer`); one verification
forward over all ``T`` tree nodes (static tree mask, positions = length + depth); the acceptance
rule (:mod:`medusa_jax.decoding.acceptance`) picks a path, its ``n`` tokens and the token after
them (the next root); the path's K/V slots are committed to the cache; the next step's head
input is the accepted leaf's hidden state (no extra forward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.decoding.acceptance import AcceptanceError, Rule, get_rule
from medusa_jax.decoding.common import (
    GenerationError,
    GenerationSettings,
    Timer,
    check_lengths,
    drive,
    is_eos,
    pad_prompts,
    prefill,
    trim_outputs,
)
from medusa_jax.model import llama
from medusa_jax.model.cache import KVCache
from medusa_jax.model.heads import MedusaHeads, draft_to_vocab, head_logits, hydra_hidden
from medusa_jax.model.llama import lm_head_weight
from medusa_jax.tree import TreeBuffers, TreeError, build_tree, get_tree


@dataclasses.dataclass(frozen=True)
class MedusaSettings:
    """Static settings of one compiled Medusa loop (hashable: the tree is a tuple of paths)."""

    gen: GenerationSettings = GenerationSettings()
    choices: tuple[tuple[int, ...], ...] = ()
    # a rule object (:mod:`medusa_jax.decoding.acceptance`) or its name; a name becomes the
    # object here (``typical`` with ``posterior_threshold`` / ``posterior_alpha``)
    acceptance: Rule | str = "greedy"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self):
        try:
            rule = get_rule(self.acceptance, self.posterior_threshold, self.posterior_alpha)
        except AcceptanceError as e:
            raise GenerationError(str(e)) from None
        object.__setattr__(self, "acceptance", rule)
        object.__setattr__(self, "choices", tuple(tuple(int(r) for r in c) for c in self.choices))

    @property
    def tree(self) -> TreeBuffers:
        return _tree(self.choices)


@functools.lru_cache(maxsize=64)
def _tree(choices) -> TreeBuffers:
    return build_tree([list(c) for c in choices])


def make_settings(tree, num_heads: int, gen: GenerationSettings, proposal_size: int | None = None,
                  **kw) -> MedusaSettings:
    """Validate a tree (name, JSON file or list of paths) against the heads and build settings.
    ``proposal_size``: how many tokens a head ranks (its draft vocabulary, else the vocabulary).
    The empty tree (root only: one token per step, like vanilla) is allowed here; user-facing
    entry points refuse it with :func:`check_tree`."""
    choices = check_tree(tree, num_heads, proposal_size, allow_empty=True)
    return MedusaSettings(gen=gen, choices=tuple(tuple(c) for c in choices), **kw)


def check_tree(tree, num_heads: int | None = None, proposal_size: int | None = None,
               allow_empty: bool = False) -> list[list[int]]:
    """The tree's paths, validated (TreeError with a clear message): at least one node (unless
    ``allow_empty``), no deeper than ``num_heads``, no rank a head cannot propose."""
    choices = get_tree(tree)
    if not choices and not allow_empty:
        raise TreeError("the tree has no nodes, so Medusa cannot speculate with it: give at least "
                        "one path (e.g. [[0]]), or decode without heads (--medusa none)")
    build_tree(choices, num_heads=num_heads)
    worst = max((r for path in choices for r in path), default=0)
    if proposal_size is not None and worst >= proposal_size:
        raise TreeError(f"the tree uses rank {worst}, but the heads rank only {proposal_size} "
                        f"tokens (their draft vocabulary): use ranks below {proposal_size}")
    return choices


@struct.dataclass
class MedusaState:
    cache: KVCache
    root: jax.Array  # [B] the next step's root: the token after the last accepted one
    hidden: jax.Array  # [B, D] base hidden state there (the heads' input)
    out: jax.Array  # [B, max_new]
    n_out: jax.Array  # [B]
    done: jax.Array  # [B]
    rng: jax.Array
    step: jax.Array  # scalar: verification steps so far
    row_steps: jax.Array  # [B] steps each row was live for
    hist: jax.Array  # [B, depth + 2] histogram of accepted lengths (index = tokens accepted)

    def finished(self):
        return jnp.all(self.done)


PROJ_KEY = "decode_proj"


def with_decode_projections(cfg: ModelConfig, mcfg: MedusaConfig | None, params: dict,
                            backend: str | None = None) -> dict:
    """``params`` plus (under ``"decode_proj"``) the output projections the loop multiplies
    every step, laid out once before it instead of re-derived inside it; no-op if present.

    - ``verify`` (CPU, tied embeddings): the embedding transposed to ``[D, V]``. The
      verification step projects all T tree rows through the tied LM head; XLA:CPU's
      matrix-matrix kernel over a handful of rows is markedly faster with the weight as
      ``[D, V]`` than as ``x @ E.T`` (5 rows of SmolLM2's 49152 x 576: about 6 vs 8 ms; the
      loop side by side: ``benchmarks/bench_projections.py``). It costs one more copy of the
      embedding in host memory; accelerators lay out dots themselves, so they get none.
    - ``draft`` (heads with a draft vocabulary): the ``[D, V']`` columns of the LM head the
      heads project through, gathered once rather than every step.

    The products are the same numbers in another memory layout: the logits are equal."""
    if PROJ_KEY in params or "base" not in params:
        return params
    base = params["base"]
    proj = {}
    backend = backend or jax.default_backend()
    if backend == "cpu" and cfg.tie_word_embeddings:
        proj["verify"] = _transposed(base["embed"]["embedding"])
    if mcfg is not None and mcfg.draft_ids is not None and "medusa" in params:
        proj["draft"] = _draft_columns(lm_head_weight(base, cfg),
                                       jnp.asarray(np.asarray(mcfg.draft_ids, np.int32)))
    return {**params, PROJ_KEY: proj} if proj else params


@jax.jit
def _transposed(w):
    return w.T


@jax.jit
def _draft_columns(lm, ids):
    return jnp.take(lm, ids, axis=1)


def verify_logits(cfg: ModelConfig, params: dict, hidden) -> jax.Array:
    """The base model's float32 logits over the tree rows ``hidden [B, T, D]`` (through the
    ``[D, V]`` copy when :func:`with_decode_projections` made one)."""
    w = params.get(PROJ_KEY, {}).get("verify")
    if w is None:
        return llama.logits(cfg, params["base"], hidden)
    return (hidden @ w.astype(hidden.dtype)).astype(jnp.float32)


def _draft_proj(params: dict):
    return params.get(PROJ_KEY, {}).get("draft")


@functools.lru_cache(maxsize=32)
def heads_proposer(mcfg: MedusaConfig, base_cfg: ModelConfig, topk: int, depth: int | None = None):
    """The default proposer: the heads' top-k at the last accepted position ``[B, M, k]``.
    ``depth``: run only the first ``depth`` heads (a shallower tree never reads the others)."""
    full = mcfg
    if depth is not None and depth < mcfg.num_heads:
        mcfg = dataclasses.replace(mcfg, num_heads=max(depth, 1))

    def propose(params, hidden, state):
        medusa = params["medusa"]
        if mcfg.num_heads < full.num_heads:  # parameters are stacked over heads: [M, ...]
            medusa = {k: v[: mcfg.num_heads] for k, v in medusa.items()}
        hh = MedusaHeads(mcfg, dtype=base_cfg.dtype).apply({"params": medusa}, hidden)

        def base_proj(x):
            return llama.logits(base_cfg, params["base"], x)

        lm = lm_head_weight(params["base"], base_cfg) if mcfg.draft_ids is not None else None
        lg = head_logits(mcfg, medusa, hh, base_proj, lm,
                         draft_proj=_draft_proj(params))  # [B, M, V or V']
        return draft_to_vocab(mcfg, jax.lax.top_k(lg, topk)[1].astype(jnp.int32))

    return propose


@functools.lru_cache(maxsize=32)
def hydra_proposer(mcfg: MedusaConfig, base_cfg: ModelConfig, choices: tuple[tuple[int, ...], ...]):
    """The proposer for Hydra heads: ``propose(params, hidden, state, root) -> [B, T]`` tree
    tokens (it carries ``drafts_tree = True``; ``_step`` then skips the Medusa gather).

    The tree is drafted depth by depth: at depth d the nodes at depth d-1 that have children
    (``tree.expand_nodes``) know their path tokens, so head d-1 runs once over all of them in one
    batched call; each takes its top ``level_topk`` and the depth-d nodes pick theirs by static
    gathers (``level_indices``). A node's rank is thus its rank among its parent's candidates."""
    if not mcfg.is_hydra:
        raise GenerationError(f"hydra_proposer needs Hydra heads, got head_type={mcfg.head_type!r}")
    tree = _tree(choices)

    def propose(params, hidden, state, root):
        medusa, base = params["medusa"], params["base"]
        embedding = base["embed"]["embedding"]  # [V, E]: the base model's input embeddings

        def base_proj(x):
            return llama.logits(base_cfg, base, x)

        lm = lm_head_weight(base, base_cfg) if mcfg.draft_ids is not None else None
        B = root.shape[0]
        tokens = root[:, None]  # [B, 1 + nodes drafted so far]
        for d in range(1, tree.depth + 1):
            anc = tree.ancestors[tree.expand_nodes[d - 1], :d]  # [P, d] root .. parent, static
            path = jnp.take(tokens, np.asarray(anc), axis=1)  # [B, P, d]
            e = jnp.take(embedding, path, axis=0)  # [B, P, d, E]
            hh = hydra_hidden(mcfg, medusa, hidden[:, None, :], e, head=d - 1,
                              dtype=base_cfg.dtype)  # [B, P, D]
            lg = head_logits(mcfg, medusa, hh[..., None, :], base_proj, lm,
                             draft_proj=_draft_proj(params))[..., 0, :]  # [B, P, V']
            cand = draft_to_vocab(mcfg, jax.lax.top_k(lg, tree.level_topk[d - 1])[1])
            idx = np.asarray(tree.level_indices[tree.level_slice(d)])
            level = jnp.take(cand.reshape(B, -1).astype(jnp.int32), idx, axis=1)  # [B, n_d]
            tokens = jnp.concatenate([tokens, level], axis=1)
        return tokens

    propose.drafts_tree = True
    return propose


def default_proposer(mcfg: MedusaConfig, base_cfg: ModelConfig, settings: MedusaSettings):
    """The proposer ``medusa_generate`` uses for these heads and this tree."""
    if mcfg.is_hydra:
        return hydra_proposer(mcfg, base_cfg, settings.choices)
    tree = settings.tree
    return heads_proposer(mcfg, base_cfg, tree.topk, tree.depth)


def _append_many(out, n_out, done, toks, n, eos_ids, max_new):
    """Append the first ``n[b]`` of ``toks: [B, P]`` to each live row, stopping after EOS."""
    B, P = toks.shape
    j = jnp.arange(P)[None, :]
    eos = is_eos(toks, eos_ids) & (j < n[:, None])
    first_eos = jnp.where(eos.any(-1), jnp.argmax(eos, axis=-1) + 1, P + 1)  # [B]
    take = jnp.minimum(jnp.minimum(n, first_eos), max_new - n_out)
    take = jnp.where(done, 0, take)
    # entries not written go out of bounds and are dropped (clipping would collide)
    idx = jnp.where(j < take[:, None], n_out[:, None] + j, max_new)
    out = out.at[jnp.arange(B)[:, None], idx].set(toks, mode="drop")
    n_out = n_out + take
    done = done | (first_eos <= n) | (n_out >= max_new)
    return out, n_out, done, take


def _step(params, s: MedusaState, *, cfg: ModelConfig, settings: MedusaSettings, propose):
    tree = settings.tree
    depth = tree.depth
    sc = settings.gen.sampling
    with jax.named_scope("accept"):
        rng, k_accept = jax.random.split(s.rng)
    root = s.root  # [B]
    B = root.shape[0]
    # named scopes (op_name metadata only, nothing at run time) let a profile attribute each
    # op to its phase: medusa_jax.profiling
    with jax.named_scope("propose"):
        if getattr(propose, "drafts_tree", False):  # Hydra: drafted depth by depth from the root
            tree_tokens = propose(params, s.hidden, s, root)  # [B, T]
        else:
            cand = propose(params, s.hidden, s)[:, :depth, : tree.topk]  # [B, depth, k]
            flat = jnp.concatenate([root[:, None], cand.reshape(B, -1)], axis=1)
            tree_tokens = jnp.take(flat, np.asarray(tree.tree_indices), axis=1)  # [B, T]

    with jax.named_scope("verify"):
        positions = s.cache.lengths[:, None] + np.asarray(tree.depth_offsets)[None, :]  # [B, T]
        # the tree's K/V stay apart from the cache; only the accepted path is committed below
        hidden, (cache, (tree_k, tree_v)) = llama.forward(
            cfg, params["base"], tree_tokens, positions, s.cache, np.asarray(tree.attn_mask),
            write=False)  # [B, T, D], [L, B, T, K, H] x 2
        logits = verify_logits(cfg, params, hidden)  # [B, T, V]

    with jax.named_scope("accept"):
        # the rule picks the path, its length and the token after it (per-row randomness: the
        # key is split over rows inside the rule's draws)
        best, n, next_root = settings.acceptance.accept(tree_tokens, logits, tree, sc, k_accept)
    with jax.named_scope("commit"):
        path = jnp.take(np.asarray(tree.retrieve_indices), best, axis=0)  # [B, depth+1]
        path = jnp.where(path >= 0, path, 0)
        toks = jnp.take_along_axis(tree_tokens, path, axis=1)  # [B, depth+1]
        live = ~s.done
        out, n_out, done, _ = _append_many(s.out, s.n_out, s.done, toks, n,
                                           settings.gen.eos_token_ids, settings.gen.max_new_tokens)
        cache = cache.commit_tree(tree_k, tree_v, path, jnp.where(live, n, 0))
        leaf = jnp.take_along_axis(path, (n - 1)[:, None], axis=1)  # [B, 1]
        new_hidden = jnp.take_along_axis(hidden, leaf[:, :, None], axis=1)[:, 0]
        hist = s.hist.at[jnp.arange(B), n].add(live.astype(jnp.int32))
    return MedusaState(cache, next_root, new_hidden, out, n_out, done, rng, s.step + 1,
                       s.row_steps + live.astype(jnp.int32), hist)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "cache_len"))
def medusa_prefill(params, tokens, prompt_lens, rng, *, cfg: ModelConfig,
                   settings: MedusaSettings, cache_len: int) -> MedusaState:
    """The decode loop's first state: the padded prompts ``tokens [B, P]`` (``prompt_lens
    [B]``) in a fresh ``cache_len``-slot KV cache, the first root token drawn."""
    B = tokens.shape[0]
    cache = KVCache.init(cfg, B, cache_len)
    hidden, cache = prefill(cfg, params["base"], tokens, prompt_lens, cache)
    logits = llama.logits(cfg, params["base"], hidden)
    depth = settings.tree.depth
    rng, k_root = jax.random.split(rng)
    root = settings.acceptance.first_root(logits, k_root, settings.gen.sampling)
    return MedusaState(
        cache, root, hidden,
        out=jnp.full((B, settings.gen.max_new_tokens), settings.gen.pad_token_id, jnp.int32),
        n_out=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool), rng=rng,
        step=jnp.int32(0), row_steps=jnp.zeros((B,), jnp.int32),
        hist=jnp.zeros((B, depth + 2), jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "propose"),
                   donate_argnames=("state",))
def medusa_decode(params, state: MedusaState, stop_step, *, cfg: ModelConfig,
                  settings: MedusaSettings, propose) -> MedusaState:
    """Verification steps until ``state.step`` reaches ``stop_step`` or every row is done:
    the whole ``lax.while_loop``, ``state`` donated (``propose``: a proposer such as
    :func:`heads_proposer`)."""
    def cond(s):
        return (s.step < stop_step) & ~jnp.all(s.done)

    body = functools.partial(_step, params, cfg=cfg, settings=settings, propose=propose)
    return jax.lax.while_loop(cond, body, state)


def abstract_medusa_state(params, batch_size: int, cache_len: int, *, cfg: ModelConfig,
                          settings: MedusaSettings) -> MedusaState:
    """The loop's state as ``jax.ShapeDtypeStruct`` leaves (what :func:`medusa_prefill`
    returns for ``batch_size`` rows and a ``cache_len``-slot cache), from abstract or real
    ``params``: the input :func:`medusa_decode` is compiled for ahead of time. Nothing runs."""
    fn = functools.partial(medusa_prefill, cfg=cfg, settings=settings, cache_len=cache_len)
    return jax.eval_shape(fn, params, jax.ShapeDtypeStruct((batch_size, 16), jnp.int32),
                          jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                          jax.eval_shape(lambda: jax.random.PRNGKey(0)))


def medusa_generate(cfg: ModelConfig, mcfg: MedusaConfig, params, prompts: Sequence[Sequence[int]],
                    settings: MedusaSettings, seed: int = 0, cache_len: int | None = None,
                    stream_every: int | None = None, on_chunk: Callable | None = None,
                    propose: Callable | None = None, projections: bool = True) -> dict:
    """Medusa generation for token-id prompts. ``params = {"base": ..., "medusa": ...}``
    (``projections``: add :func:`with_decode_projections` first when missing; False runs the
    loop on the parameters as given, for side-by-side measurements).

    Returns ``tokens`` (lists), ``steps`` (verification steps per row), ``mean_accepted``
    (tokens per step per row), ``accept_hist`` (``[B, depth+2]``: steps that accepted ``i``
    tokens) and ``head_accept`` (``[B, depth]``: steps where head ``k``'s guess was accepted).
    ``stream_every=n`` returns to the host every ``n`` steps and calls
    ``on_chunk(out, n_out)``; there a Ctrl-C stops the loop and the result says ``interrupted``.
    ``prefill_seconds`` / ``decode_seconds``: wall time of each part, compile time excluded
    (``compile_seconds``)."""
    timer = Timer()
    tree = settings.tree
    mcfg.check_compatible(cfg)
    if tree.depth > mcfg.num_heads:
        raise GenerationError(
            f"tree depth {tree.depth} needs at least {tree.depth} Medusa heads, the model has "
            f"{mcfg.num_heads}")
    if projections:
        params = with_decode_projections(cfg, mcfg, params)
    tokens, lens = pad_prompts(prompts, settings.gen.pad_token_id)
    max_new = settings.gen.max_new_tokens
    extra = tree.num_nodes + tree.depth
    cache_len = check_lengths(cfg, int(lens.max()), max_new, extra=extra, cache_len=cache_len)
    cache_len = max(cache_len, tokens.shape[1], int(lens.max()) + max_new + extra)
    state = timer.compiled(medusa_prefill, params, jnp.asarray(tokens), jnp.asarray(lens),
                          jax.random.PRNGKey(seed), cfg=cfg, settings=settings,
                          cache_len=cache_len)
    jax.block_until_ready(state)
    prefill_s = timer.mark()
    propose = propose or default_proposer(mcfg, cfg, settings)

    def step(state, stop):
        return timer.compiled(medusa_decode, params, state, stop, cfg=cfg, settings=settings,
                              propose=propose)

    cb = None if on_chunk is None else (lambda s: on_chunk(np.asarray(s.out), np.asarray(s.n_out)))
    state, interrupted = drive(step, state, max_new, stream_every, cb)
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    hist, row_steps = np.asarray(state.hist), np.asarray(state.row_steps)
    # head k's guess was accepted in every step that accepted more than k + 1 tokens
    head_accept = np.cumsum(hist[:, ::-1], axis=-1)[:, ::-1][:, 2:]  # [B, depth], also depth 0
    return {
        "tokens": trim_outputs(out, n_out),
        "steps": row_steps.tolist(),
        "mean_accepted": ((hist * np.arange(hist.shape[1])).sum(-1) / np.maximum(row_steps, 1)).tolist(),
        "accept_hist": hist,
        "head_accept": head_accept,
        "interrupted": interrupted,
        "prefill_seconds": prefill_s,
        "decode_seconds": timer.mark(),
        "compile_seconds": timer.compile_seconds,
    }
