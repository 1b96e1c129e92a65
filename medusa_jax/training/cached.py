"""Medusa-1 from cached hidden states: the base runs once, the heads train for many epochs.

Medusa-1 never changes the base model, so its final hidden states are a fixed function of the
data. This path computes them once (one forward per row, no gradients), keeps only the positions
that have at least one head target (the assistant tokens), and trains the heads on those flat
``[N, D]`` states: each step is a small MLP update over ``train.token_batch`` positions. On a
small machine this is many times faster than :class:`~medusa_jax.training.loop.Trainer`, whose
every step runs the base forward over whole padded rows, prompts included.

With ``medusa.draft_vocab_size`` the heads also get a draft vocabulary (the most frequent target
tokens of the training data, :func:`~medusa_jax.training.setup.choose_draft_ids`): training and
proposal project onto those rows of the LM head only. Same loss as the trainer (``Σ_k decay^k
CE_k``, one optimizer, the same schedule); targets outside the draft vocabulary are not trained
on, and the evaluation counts them as misses.

    summary = train_cached(load_run_config("configs/smollm2_medusa1.yaml"))

There are no checkpoints in the middle (training a few hundred thousand positions takes minutes);
a run writes ``metrics.jsonl``, ``summary.json`` and the exported heads like the trainer does.
The hidden states are kept next to the tokenised-data cache, so a rerun with other training
settings (steps, learning rate, draft vocabulary) skips the base forward.

Both head types train here: Hydra heads (``medusa.head_type: hydra``) read the teacher-forced
tokens t+1 .. t+k of their path from ``HiddenSet.tokens``. With ``train.head_target: base`` each
head learns the base model's own distribution for its token instead of the data's token: the LM
head applied to the cached state of the position before that token (``HiddenSet.teacher``),
renormalised over the draft vocabulary when there is one (the heads can propose nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.errors import DataError
from medusa_jax.model.heads import head_logits, heads_module, path_embeddings, vocab_to_draft
from medusa_jax.model.llama import lm_head_weight
from medusa_jax.training.hidden_set import HiddenSet, sidecar_for, sidecar_sets
from medusa_jax.training.losses import ce_stats, heads_total, shifted_targets
from medusa_jax.training.optimizer import learning_rates, make_optimizer
from medusa_jax.training.run_config import RunConfig, TrainConfig, dump_yaml, to_dict
from medusa_jax.training.setup import (
    MetricsLog,
    build_base,
    choose_draft_ids,
    export_run,
    fresh_heads,
    medusa_config,
)
from medusa_jax.training.step import make_hidden_fn

log = logging.getLogger("medusa_jax.train")
_BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def collect_hidden(model_cfg: ModelConfig, base_params, arrays: dict, num_heads: int,
                   batch_size: int, desc: str = "hidden states") -> HiddenSet:
    """Run the base over tokenised rows (``input_ids``/``loss_mask``/... ``[R, T]``, as
    :func:`~medusa_jax.training.prepare.prepare_data` makes them) and keep the states of every
    position that has a head target or whose next token (t+1) is a training target (it is then
    a teacher row), with the token inputs and teacher rows of :class:`HiddenSet`."""
    hidden_fn = make_hidden_fn(model_cfg)
    rows = arrays["input_ids"].shape[0]
    hs, ts, toks, teach, base = [], [], [], [], 0
    for i in tqdm(range(0, rows, batch_size), desc=desc, unit="batch", leave=False):
        batch = {k: np.asarray(arrays[k][i: i + batch_size]) for k in _BATCH_KEYS if k in arrays}
        n = batch["input_ids"].shape[0]
        if n < batch_size:  # one compiled shape: zero rows have no targets
            batch = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        seg = batch.get("segment_ids")
        targets, tokens = [], []
        ones = np.ones_like(batch["loss_mask"])
        for k in range(num_heads + 1):  # k = 0: token t+1 and whether it is a target
            t, v = shifted_targets(batch["input_ids"], batch["loss_mask"], k + 1, seg)
            t, v = np.asarray(t)[:n], np.asarray(v)[:n]
            _, inside = shifted_targets(batch["input_ids"], ones, k + 1, seg)  # same row/segment
            targets.append(np.where(v, t, -1))
            tokens.append(np.where(np.asarray(inside)[:n], t, -1))
        nxt, targets = targets[0], np.stack(targets[1:], -1)  # [n, T], [n, T, M]
        tokens = np.stack(tokens, -1)  # [n, T, M+1]
        keep = (targets >= 0).any(-1) | (nxt >= 0)
        if not keep.any():
            continue
        h = np.asarray(hidden_fn(base_params, batch))[:n]
        T = keep.shape[1]
        row = base + np.cumsum(keep.reshape(-1)).reshape(keep.shape) - 1  # [n, T]: set row
        pos = np.arange(T)[None, :, None] + 1 + np.arange(num_heads)[None, None, :]  # t+k+1
        tr = row[np.arange(n)[:, None, None], np.minimum(pos, T - 1)]  # [n, T, M]
        teacher = np.where(targets >= 0, tr, -1)  # a target's teacher position is always kept
        hs.append(h[keep].astype(np.float32))
        ts.append(targets[keep].astype(np.int32))
        toks.append(tokens[keep].astype(np.int32))
        teach.append(teacher[keep].astype(np.int32))
        base += int(keep.sum())
    if not hs:
        raise DataError(f"{desc}: no position has a training target (all loss masks are 0)")
    return HiddenSet(np.concatenate(hs), np.concatenate(ts), np.concatenate(toks),
                     np.concatenate(teach))


def draft_coverage(targets: np.ndarray, draft_ids: tuple[int, ...] | None) -> float:
    """Fraction of head-0 targets that lie in the draft vocabulary."""
    t = targets[:, 0]
    t = t[t >= 0]
    if draft_ids is None or t.size == 0:
        return 1.0
    return float(np.isin(t, np.asarray(draft_ids)).mean())


def _logits_and_targets(mcfg: MedusaConfig, params, lm, hidden, targets, tokens=None, emb=None):
    """Head logits ``[b, M, V or V']`` on flat states, the targets as their columns and which
    targets count (those inside the draft vocabulary) and exist. Hydra heads also need
    ``tokens [b, M+1]`` (``HiddenSet.tokens``) and ``emb [V, E]`` (the base's input embeddings)."""
    inputs = [hidden]
    if mcfg.is_hydra:
        if tokens is None or emb is None:
            raise ValueError("Hydra heads need the teacher-forced tokens (HiddenSet.tokens) and "
                             "the base model's input embeddings")
        inputs.append(path_embeddings(emb, tokens[:, : mcfg.num_heads]))
    heads = heads_module(mcfg, dtype=hidden.dtype)
    hh = heads.apply({"params": {k: v for k, v in params.items() if k != "lm_head"}}, *inputs)
    logits = head_logits(mcfg, params, hh, lambda x: (x @ lm.astype(x.dtype)).astype(jnp.float32),
                         lm)
    cols = vocab_to_draft(mcfg, jnp.maximum(targets, 0))
    has = targets >= 0
    return logits, jnp.maximum(cols, 0), has & (cols >= 0), has


def _base_logits(mcfg: MedusaConfig, lm, x):
    """The base model's logits from states ``x: [..., D]`` over the heads' columns (the draft
    vocabulary when there is one)."""
    if mcfg.draft_ids is not None:
        lm = jnp.take(lm, np.asarray(mcfg.draft_ids, np.int32), axis=1)
    return (x @ lm.astype(x.dtype)).astype(jnp.float32)


def _heads_stats(mcfg: MedusaConfig, tcfg: TrainConfig, params, lm, hidden, targets,
                 tokens=None, emb=None, teacher_hidden=None):
    """Per-head CE statistics on flat states. Targets outside the draft vocabulary are no
    training targets; ``missed`` counts them per head (the evaluation adds them as misses).

    With ``teacher_hidden [b, M, D]`` (the cached states of the positions before each target,
    ``train.head_target: base``) the CE is against the base's own distribution there instead,
    over every position with a target (top-1/top-5 still count the data's token)."""
    logits, cols, valid, has = _logits_and_targets(mcfg, params, lm, hidden, targets, tokens, emb)
    stats = [ce_stats(logits[:, k], cols[:, k], valid[:, k]) for k in range(mcfg.num_heads)]
    missed = jnp.sum(has & ~valid, axis=0).astype(jnp.float32)
    if teacher_hidden is not None:
        p = jax.nn.softmax(jax.lax.stop_gradient(_base_logits(mcfg, lm, teacher_hidden)), -1)
        ce = -jnp.sum(p * jax.nn.log_softmax(logits, -1), -1)  # [b, M]
        w = has.astype(jnp.float32)
        stats = [(jnp.sum(ce[:, k] * w[:, k]), top1, top5, jnp.sum(w[:, k]))
                 for k, (_, top1, top5, _) in enumerate(stats)]
        missed = jnp.zeros_like(missed)  # every target is trained on
    return stats, missed


RANKS = 10  # per-rank accuracies reported for tree design (tree.best_nodes_tree)


def _rank_hits(mcfg: MedusaConfig, params, lm, hidden, targets, tokens=None, emb=None):
    """``[M, RANKS]``: how many targets each head ranked 0, 1, ... (ties as ``ce_stats``), the
    same given that every earlier head's top-1 was right at that position, and ``[M]``: how
    many positions had head k's target with every earlier head right (the condition's count)."""
    logits, cols, valid, has = _logits_and_targets(mcfg, params, lm, hidden, targets, tokens, emb)
    tgt = jnp.take_along_axis(logits, cols[..., None], axis=-1)  # [b, M, 1]
    idx = jnp.arange(logits.shape[-1])
    rank = jnp.sum((logits > tgt) | ((logits == tgt) & (idx < cols[..., None])), axis=-1)
    onehot = (rank[..., None] == jnp.arange(RANKS)) & valid[..., None]  # [b, M, R]
    right = onehot[..., 0].astype(jnp.int32)  # [b, M]
    before = jnp.concatenate([jnp.ones_like(right[:, :1]), jnp.cumprod(right, 1)[:, :-1]], 1) > 0
    cond = onehot & before[..., None]
    return (jnp.sum(onehot, axis=0).astype(jnp.float32), jnp.sum(cond, axis=0).astype(jnp.float32),
            jnp.sum(before & has, axis=0).astype(jnp.float32))


def minibatch(data: HiddenSet, idx, mcfg: MedusaConfig, head_target: str = "tokens") -> dict:
    """The arrays one step reads for rows ``idx`` of ``data``: ``hidden``, ``targets``, and
    ``tokens`` for Hydra heads, ``teacher_hidden [b, M, D]`` for ``head_target='base'``."""
    b = {"hidden": data.hidden[idx], "targets": data.targets[idx]}
    if mcfg.is_hydra or head_target == "base":
        if data.tokens is None or data.teacher is None:
            raise DataError("these hidden states have no token inputs / teacher rows (made "
                            "before HiddenSet had them): collect them again")
    if mcfg.is_hydra:
        b["tokens"] = data.tokens[idx]
    if head_target == "base":
        b["teacher_hidden"] = data.hidden[np.maximum(data.teacher[idx], 0)]
    return b


def make_cached_step(mcfg: MedusaConfig, tcfg: TrainConfig):
    """``(step(params, opt_state, lm, emb, batch) -> (params, opt_state, metrics), tx)``;
    ``batch`` from :func:`minibatch`, ``emb [V, E]`` the base's input embeddings (Hydra)."""
    tx = make_optimizer(tcfg)

    def loss_fn(params, lm, emb, batch):
        stats, _ = _heads_stats(mcfg, tcfg, params, lm, batch["hidden"], batch["targets"],
                                batch.get("tokens"), emb, batch.get("teacher_hidden"))
        return heads_total(stats, tcfg.decay)

    @jax.jit
    def step(params, opt_state, lm, emb, batch):
        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(params, lm, emb, batch)
        lrs = learning_rates(tcfg, opt_state)
        updates, opt_state = tx.update({"medusa": g}, opt_state, {"medusa": params})
        params = jax.tree.map(lambda p, u: p + u, params, updates["medusa"])
        return params, opt_state, {"loss": loss, **metrics, **lrs}

    return step, tx


def evaluate_cached(mcfg: MedusaConfig, tcfg: TrainConfig, params, lm, data: HiddenSet,
                    batch: int = 1024, emb=None) -> dict:
    """Per-head top-1 / top-5 accuracy and CE on held-out states against the data's tokens, and
    conditional acceptance. Accuracy counts every target: one outside the draft vocabulary is a
    miss (the heads cannot propose it). Hydra heads need ``emb`` (the base's input embeddings).

    ``head_cond_top1[k]``: P(head k's top-1 is right | heads 0 .. k-1's top-1 were right at the
    same position), i.e. how often a chain of top-1 guesses that reached depth k goes one
    further. For Hydra heads the path tokens are teacher-forced (the data's tokens); under that
    condition they are exactly what the heads before would have drafted, so it is what decoding
    sees. ``head_cond_rank_acc [M, RANKS]``: the same for head k's rank-r guess."""

    @jax.jit
    def fn(params, b):
        hidden, targets, tokens = b["hidden"], b["targets"], b.get("tokens")
        stats, missed = _heads_stats(mcfg, tcfg, params, lm, hidden, targets, tokens, emb)
        ce, top1, top5, count = (jnp.stack(s) for s in zip(*stats, strict=True))
        return (ce, top1, top5, count, missed,
                *_rank_hits(mcfg, params, lm, hidden, targets, tokens, emb))

    tot = None
    n = len(data)
    for i in range(0, n, batch):
        b = minibatch(data, np.arange(i, min(i + batch, n)), mcfg)
        if b["hidden"].shape[0] < batch:  # one compiled shape: padding rows have no targets
            pad = batch - b["hidden"].shape[0]
            b = {k: np.concatenate([v, np.full((pad, *v.shape[1:]), 0 if k == "hidden" else -1,
                                               v.dtype)]) for k, v in b.items()}
        out = [np.asarray(x, np.float64) for x in fn(params, b)]
        tot = out if tot is None else [a + b for a, b in zip(tot, out, strict=True)]
    ce, top1, top5, count, missed, ranks, cond_ranks, cond_count = tot
    total = np.maximum(count + missed, 1.0)
    return {
        # [M, RANKS]: P(head k's rank-r guess is the target), tree.best_nodes_tree's input
        "head_rank_acc": (ranks / total[:, None]).round(5).tolist(),
        "head_top1": (top1 / total).tolist(),
        "head_top5": (top5 / total).tolist(),
        "head_loss": (ce / np.maximum(count, 1.0)).tolist(),  # over in-draft targets
        "head_count": (count + missed).tolist(),
        "head_cond_top1": (cond_ranks[:, 0] / np.maximum(cond_count, 1.0)).tolist(),
        "head_cond_rank_acc": (cond_ranks / np.maximum(cond_count, 1.0)[:, None]).round(5).tolist(),
        "head_cond_count": cond_count.tolist(),
        "draft_coverage": draft_coverage(data.targets, mcfg.draft_ids),
    }


def _hidden_cache_path(run_cfg: RunConfig, data_cache_file: str | None,
                       num_heads: int) -> str | None:
    """Where this run's hidden states are kept between runs: next to the tokenised-data cache,
    keyed by that cache (itself keyed by the data and its settings), the model section of the
    config, the model file's size and mtime and the number of heads. None without a data
    cache (``data.cache: false``)."""
    if not data_cache_file:
        return None
    from medusa_jax.training.prepare import file_identity  # noqa: PLC0415

    model = to_dict(run_cfg)["model"]
    path = model.get("path")
    ident = file_identity(path) if path and os.path.exists(path) else None
    key = json.dumps([os.path.basename(data_cache_file), model, ident, num_heads,
                      run_cfg.train.seq_len, "tokens+teacher"], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(os.path.dirname(data_cache_file), f"hidden-{digest}.npz")


_SET_FIELDS = ("hidden", "targets", "tokens", "teacher")


def _save_hidden(path: str, train_set: HiddenSet, eval_set: HiddenSet | None) -> None:
    arrays = {}
    for name, hs in (("train", train_set), ("eval", eval_set)):
        if hs is not None:
            arrays |= {f"{name}_{f}": getattr(hs, f) for f in _SET_FIELDS
                       if getattr(hs, f) is not None}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    os.replace(tmp, path)  # readers never see a half-written cache


def _load_hidden(path: str) -> tuple[HiddenSet, HiddenSet | None] | None:
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            def one(name):
                return HiddenSet(*(z[f"{name}_{f}"] if f"{name}_{f}" in z else None
                                   for f in _SET_FIELDS))

            train = one("train")
            ev = one("eval") if "eval_hidden" in z else None
    # damaged: recompute (and overwrite); a cut file is a BadZipFile, which is no OSError
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        log.warning("ignoring the damaged hidden-state cache %s (%s: %s)", path,
                    type(e).__name__, e)
        return None
    log.info("hidden states from the cache %s", path)
    return train, ev


def fresh_start(run_cfg: RunConfig, model_cfg: ModelConfig, base: dict,
                targets: np.ndarray) -> tuple[MedusaConfig, dict]:
    """Fresh heads to train, as ``(MedusaConfig, host params)``, with a draft vocabulary chosen
    from the training ``targets`` when the medusa section asks for one."""
    m = run_cfg.medusa
    draft = None
    if m.draft_vocab_size:
        draft = choose_draft_ids(targets, m.draft_vocab_size, model_cfg.vocab_size,
                                 tuple(model_cfg.eos_token_ids))
    mcfg = medusa_config(run_cfg, model_cfg, draft)
    return mcfg, fresh_heads(mcfg, model_cfg, base)


def saved_start(run_cfg: RunConfig, model_cfg: ModelConfig) -> tuple[MedusaConfig, dict]:
    """The saved head set at ``train.init_heads`` to go on training, as ``(MedusaConfig, host
    params)``, with its own draft vocabulary whatever its size. Needs no data, so it is checked
    before any is read: a ``medusa`` section that describes other heads is a
    :class:`ConfigError`."""
    from medusa_jax.weights.medusa_io import load_heads  # noqa: PLC0415

    m, path = run_cfg.medusa, run_cfg.train.init_heads
    saved, params = load_heads(path, model_cfg, dtype=m.param_dtype)  # checks the base model
    wanted = {"head_type": m.head_type, "num_heads": m.num_heads, "num_layers": m.num_layers,
              "shared_lm_head": m.shared_lm_head,
              "a draft vocabulary": bool(m.draft_vocab_size)}
    have = {"head_type": saved.head_type, "num_heads": saved.num_heads,
            "num_layers": saved.num_layers, "shared_lm_head": saved.shared_lm_head,
            "a draft vocabulary": saved.draft_ids is not None}
    differ = [f"{k} {wanted[k]!r} (heads: {have[k]!r})" for k in wanted if wanted[k] != have[k]]
    if differ:
        raise ConfigError(f"train.init_heads={path!r}: the medusa section describes other heads "
                          f"than the saved ones: {'; '.join(differ)}")
    return medusa_config(run_cfg, model_cfg, saved.draft_ids), params


def train_cached(run_cfg: RunConfig) -> dict:
    """Medusa-1 heads from cached hidden states (see the module docstring); returns a summary
    like :meth:`~medusa_jax.training.loop.Trainer.run`'s."""
    from medusa_jax.training.prepare import prepare_data  # noqa: PLC0415

    tcfg, m = run_cfg.train, run_cfg.medusa
    if tcfg.mode != "medusa1":
        raise ConfigError(f"train.cache_hidden needs train.mode='medusa1', got {tcfg.mode!r}")
    paths = run_cfg.check_paths()  # before the data and the model: a bad dir fails at once
    t_origin = time.perf_counter()
    os.makedirs(paths.root, exist_ok=True)
    dump_yaml(to_dict(run_cfg), paths.config)
    sidecar = sidecar_for(run_cfg.data.path, run_cfg.data.hidden_states)
    model_cfg, base = build_base(run_cfg)
    # saved heads that do not fit are refused before minutes of data loading, not after
    start = saved_start(run_cfg, model_cfg) if tcfg.init_heads else None
    data = None if sidecar else prepare_data(run_cfg)
    t = time.perf_counter()
    if sidecar:  # the distiller kept the states: no base pass over the data
        train_set, eval_set, report = sidecar_sets(run_cfg.data.path, model_cfg.hidden_size,
                                                   m.num_heads, run_cfg.data.eval_fraction,
                                                   run_cfg.data.max_records)
        cache_path, hidden_cache = None, None
    else:
        report = data.report
        base_dev = jax.device_put(base)
        cache_path = _hidden_cache_path(run_cfg, data.cache_file, m.num_heads)
        sets = _load_hidden(cache_path) if cache_path else None
        hidden_cache = "loaded" if sets else None
        if sets is None:
            train_set = collect_hidden(model_cfg, base_dev, data.train, m.num_heads,
                                       tcfg.batch_size, "hidden states (train)")
            eval_set = (collect_hidden(model_cfg, base_dev, data.eval, m.num_heads,
                                       tcfg.batch_size, "hidden states (eval)")
                        if data.eval is not None else None)
            if cache_path:
                _save_hidden(cache_path, train_set, eval_set)
                hidden_cache = "saved"
        else:
            train_set, eval_set = sets
    log.info("data: %s", report["summary"])
    collect_s = time.perf_counter() - t
    log.info("cached %d train / %d eval positions in %.0fs", len(train_set),
             0 if eval_set is None else len(eval_set), collect_s)

    mcfg, params = start or fresh_start(run_cfg, model_cfg, base, train_set.targets)
    draft = mcfg.draft_ids
    lm = jnp.asarray(lm_head_weight(base, model_cfg))
    emb = jnp.asarray(base["embed"]["embedding"]) if mcfg.is_hydra else None
    params = jax.tree.map(jnp.asarray, params)
    step_fn, tx = make_cached_step(mcfg, tcfg)
    opt_state = tx.init({"medusa": params})

    rng = np.random.default_rng(tcfg.seed)
    n, bt = len(train_set), tcfg.token_batch
    if n < bt:
        raise DataError(f"only {n} training positions for train.token_batch={bt}: add data or "
                        "lower train.token_batch")
    per_epoch = n // bt
    order, metrics, window = None, MetricsLog(paths.metrics, True, None, append=False), []
    t = time.perf_counter()
    bar = tqdm(range(tcfg.steps), desc="medusa1 (cached)", unit="step")
    for s in bar:
        if s % per_epoch == 0:
            order = rng.permutation(n)
        idx = np.sort(order[(s % per_epoch) * bt: (s % per_epoch + 1) * bt])
        params, opt_state, met = step_fn(params, opt_state, lm, emb,
                                         minibatch(train_set, idx, mcfg, tcfg.head_target))
        window.append(met)
        if (s + 1) % run_cfg.log.every_steps == 0 or s + 1 == tcfg.steps:
            w = jax.device_get(window)
            rec = {"step": s + 1, "epoch": round((s + 1) / per_epoch, 3),
                   "loss": float(np.mean([x["loss"] for x in w])),
                   "head_top1": np.mean([x["head_top1"] for x in w], 0).round(4).tolist(),
                   "lr_heads": float(w[-1]["lr_heads"])}
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", top1=rec["head_top1"][0])
            window = []
    train_s = time.perf_counter() - t
    metrics.close()

    ev = evaluate_cached(mcfg, tcfg, params, lm, eval_set, emb=emb) if eval_set is not None else None
    summary = {
        "mode": "medusa1", "cache_hidden": True, "head_type": mcfg.head_type,
        "head_target": tcfg.head_target, "step": tcfg.steps, "steps": tcfg.steps,
        "interrupted": False, "signal": None, "run_dir": paths.root,
        "checkpoint_dir": None, "data": report, "hidden_states": sidecar or "base forward",
        "train_positions": len(train_set), "eval_positions": 0 if eval_set is None else len(eval_set),
        "epochs": round(tcfg.steps / per_epoch, 2), "token_batch": bt,
        "draft_vocab_size": None if draft is None else len(draft),
        "draft_coverage_train": draft_coverage(train_set.targets, draft),
        "collect_s": round(collect_s, 1), "train_s": round(train_s, 1),
        "hidden_cache": None if cache_path is None else {"path": cache_path, "status": hidden_cache},
        "wall_time_s": time.perf_counter() - t_origin, "eval": ev,
    }
    metadata = {
        "mode": "medusa1 (cached hidden states)", "steps": tcfg.steps,
        "head_type": mcfg.head_type, "head_target": tcfg.head_target,
        "init_heads": tcfg.init_heads,
        "data": {k: report[k] for k in ("source", "summary", "train_rows")},
        "train_positions": summary["train_positions"], "epochs": summary["epochs"],
        "wall_time_s": round(summary["wall_time_s"], 1), "eval": ev,
    }
    exports = export_run(run_cfg, paths, mcfg, model_cfg, jax.tree.map(np.asarray, params), base,
                         metadata)
    summary["exports"] = exports
    with open(os.path.join(paths.root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary
