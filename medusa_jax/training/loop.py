"""The Medusa training loop: data, model, sharded state, resumable steps, metrics, eval, export.

    summary = train(load_run_config("configs/smollm2_medusa1.yaml"))

:class:`Trainer` does the set-up in its constructor (mesh, tokenised data, base weights) and the
training in :meth:`Trainer.run`; :func:`train` is both in one call. A run directory
(``checkpoint.dir``) holds the resolved ``config.yaml``, orbax checkpoints, ``metrics.jsonl``,
the tokenised-data cache and the exports. Running again with the same directory resumes from the
latest checkpoint and ends exactly where an uninterrupted run ends (same batches, same updates).

SIGTERM / SIGINT (e.g. a preempted job) ask the loop to stop: it finishes the current step,
saves a checkpoint and returns with ``summary["interrupted"]`` set. A second SIGINT stops at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.distributed import global_batch_from_local
from medusa_jax.errors import DataError
from medusa_jax.model.heads import heads_module
from medusa_jax.model.llama import LlamaModel
from medusa_jax.sharding import (
    ShardingError,
    check_batch_size,
    make_mesh,
    mesh_context,
    shard_params,
)
from medusa_jax.training.checkpoint import (
    CheckpointError,
    TrainCheckpointer,
    abstract_checkpoint_tree,
    checkpoint_tree,
    state_from_tree,
)
from medusa_jax.training.data import BatchIterator
from medusa_jax.training.files import replace_file
from medusa_jax.training.prepare import (  # noqa: F401  (re-exported for callers of loop)
    ByteTokenizer,
    PreparedData,
    load_run_tokenizer,
    prepare_data,
)
from medusa_jax.training.run_config import RunConfig, TrainConfig, dump_yaml, to_dict
from medusa_jax.training.setup import (
    MetricsLog,
    build_base,
    choose_draft_ids,
    export_run,
    fresh_heads,
    medusa_config,
)
from medusa_jax.training.step import (
    base_hidden,
    heads_loss,
    init_train_state,
    make_train_step,
    state_shardings,
)

log = logging.getLogger("medusa_jax.train")

# Changing one of these between a checkpoint and its resumption changes parameter shapes or the
# data stream: refuse rather than train on something else.
_MUST_MATCH = ("model.path", "model.tiny", "model.tiny_vocab_size", "model.tiny_hidden_size",
               "model.tokenizer", "model.scan_layers", "model.param_dtype", "medusa.",
               "train.mode", "train.seed", "train.batch_size", "train.seq_len", "data.path",
               "data.max_records", "data.mode", "data.drop_leading_assistant",
               "data.eval_fraction")
_LAST = ("lr_base", "lr_heads", "skipped_updates", "nonfinite_consecutive")
_SUM = ("num_tokens", "update_skipped", "head_count", "lm_count", "kd_count")
_MAX_NONFINITE = 100


# Jitted functions outlive one Trainer, so a notebook or a test that trains several times with
# the same settings compiles once.
_train_step = functools.lru_cache(maxsize=4)(make_train_step)


@functools.lru_cache(maxsize=4)
def _eval_fn(model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig):
    """``fn(params, batch) -> per-head sums`` (top-1 / top-5 hits, cross entropy, count),
    through the training loss's own per-head statistics (``step.heads_loss``)."""
    model = LlamaModel(model_cfg)
    heads = heads_module(medusa_cfg, dtype=model_cfg.dtype)

    @jax.jit
    def fn(params, batch):
        hidden = base_hidden(model, params["base"], batch)
        _, m = heads_loss(model, heads, tcfg, params["base"], params["medusa"], hidden, batch)
        n = m["head_count"]
        return {"top1": m["head_top1"] * n, "top5": m["head_top5"] * n,
                "ce": m["head_loss"] * n, "count": n}

    return fn


def _to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-host) arrays; every process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _any_process(flag: bool) -> bool:
    """True when ``flag`` is set on any process (a signal may reach only one host)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# ------------------------------------------------------------------------------------------
# Signals and metrics
# ------------------------------------------------------------------------------------------


class _StopRequest:
    """Set by SIGTERM / SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.signal: str | None = None


@contextlib.contextmanager
def _stop_on_signals(stop: _StopRequest):
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        if stop.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        stop.signal = signal.Signals(signum).name
        # no logging here: a handler may run while the logging lock is held
        os.write(2, f"\nreceived {stop.signal}: saving a checkpoint after this step\n".encode())

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _trim_metrics(path: str, step: int) -> None:
    """Drop training lines past ``step``: a run killed without a checkpoint logged steps
    the resumed run will log again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if not (rec.get("kind") == "train" and rec.get("step", 0) > step):
            keep.append(line)
    if len(keep) != len(lines):
        with replace_file(path) as f:  # a crash here must not lose the lines kept
            f.writelines(keep)


def _reduce(window: list[dict]) -> dict:
    """Host metrics of several steps -> one record (means; sums of counts; last of rates)."""
    out = {}
    for k in window[-1]:
        vals = np.stack([np.asarray(m[k], np.float64) for m in window])
        v = vals[-1] if k in _LAST else vals.sum(0) if k in _SUM else vals.mean(0)
        out[k] = v.tolist() if v.ndim else (int(v) if k in _SUM + _LAST[2:] else float(v))
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------


class Trainer:
    """One training run. The constructor prepares everything that does not depend on a
    checkpoint (mesh, data, base weights); :meth:`run` restores or initialises the state,
    trains, evaluates and exports. Attributes of interest after ``run``: ``state`` (the final
    :class:`~medusa_jax.training.step.TrainState`), ``base_host`` (the original base, numpy)."""

    def __init__(self, run_cfg: RunConfig):
        # the output paths first: a checkpoint.dir that is a file must not wait for the data
        self.cfg, self.tcfg, self.paths = run_cfg, run_cfg.train, run_cfg.check_paths()
        devices = jax.devices()
        if run_cfg.devices is not None:
            if run_cfg.devices > len(devices):
                raise ShardingError(f"devices={run_cfg.devices} but only {len(devices)} exist")
            devices = devices[: run_cfg.devices]
        self.mesh = make_mesh(run_cfg.mesh, devices)
        check_batch_size(self.tcfg.batch_size, self.mesh)
        self.data = prepare_data(run_cfg)  # before the weights: bad data fails fast
        rep = self.data.report
        (log.warning if rep["skipped"] else log.info)("data: %s", rep["summary"])
        if self.data.train["input_ids"].shape[0] < self.tcfg.batch_size:
            raise DataError(
                f"only {rep['train_rows']} training rows for train.batch_size="
                f"{self.tcfg.batch_size} ({rep['summary']}): add data or lower the batch size")
        self.model_cfg, self.base_host = build_base(run_cfg)
        top = int(max(self.data.train["input_ids"].max(), 0))
        if top >= self.model_cfg.vocab_size:
            raise ConfigError(f"token id {top} >= the model's vocab_size "
                              f"{self.model_cfg.vocab_size}: the tokenizer does not fit the model")
        m = run_cfg.medusa
        draft = None
        if m.draft_vocab_size:  # from the training targets only (the split is fixed by the ids)
            tr = self.data.train
            draft = choose_draft_ids(tr["input_ids"][tr["loss_mask"] > 0], m.draft_vocab_size,
                                     self.model_cfg.vocab_size, tuple(self.model_cfg.eos_token_ids))
        self.medusa_cfg = medusa_config(run_cfg, self.model_cfg, draft)
        self.shardings = state_shardings(self.model_cfg, self.medusa_cfg, self.tcfg, self.mesh)
        self.state = None
        self._warned_diff: list[str] | None = None

    # ------------------------------------------------------------------------------ state
    def _place_base(self):
        return shard_params(self.base_host, self.shardings.params["base"])

    def _fresh_state(self):
        base = self._place_base()
        medusa = shard_params(fresh_heads(self.medusa_cfg, self.model_cfg, self.base_host),
                              self.shardings.params["medusa"])
        return init_train_state(self.model_cfg, self.medusa_cfg, self.tcfg,
                                {"base": base, "medusa": medusa}, self.mesh)

    def _check_resumable(self, meta: dict) -> None:
        old, new = _flatten(meta.get("config", {})), _flatten(to_dict(self.cfg))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        bad = [k for k in diff if k.startswith(_MUST_MATCH)]
        if bad:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
            raise CheckpointError(
                f"the checkpoints in {self.paths.checkpoints} belong to another run ({shown}); "
                "use another checkpoint.dir, or delete it to start afresh")
        if diff and diff != self._warned_diff:  # once, though several steps may be tried
            log.warning("resuming with changed settings: %s", ", ".join(diff))
            self._warned_diff = diff

    # -------------------------------------------------------------------------------- run
    def _restore(self, ckpt: TrainCheckpointer, it: BatchIterator) -> float:
        """Set ``self.state`` from the latest checkpoint (moving ``it`` to its position) or
        fresh; returns the wall time the checkpointed run had already spent."""
        latest = ckpt.latest_step()
        if latest is None:
            self.state = self._fresh_state()
            return 0.0
        if not self.cfg.checkpoint.resume:
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest step "
                                  f"{latest}) and checkpoint.resume=false: use another "
                                  "checkpoint.dir or delete it")
        abstract = abstract_checkpoint_tree(self.model_cfg, self.medusa_cfg, self.tcfg, self.mesh)
        # a damaged newest step falls back to the newest readable one (with a warning); if
        # none is readable this raises: never a silent fresh start over a run's checkpoints
        start, tree, meta = ckpt.restore_newest_readable(abstract, self._check_resumable)
        base = self._place_base() if self.tcfg.mode == "medusa1" else None
        self.state = state_from_tree(self.tcfg, tree, base)
        it.restore(meta["data"])
        log.info("resumed from step %d of %s", start, ckpt.directory)
        return float(meta.get("extra", {}).get("wall_time_s", 0.0))

    def run(self, should_stop: Callable[[int], bool] | None = None) -> dict:
        """Train to ``train.steps`` (resuming from the latest checkpoint), then evaluate and
        export. ``should_stop(step)`` is asked after every step; True (like SIGTERM) saves a
        checkpoint and returns early with ``interrupted`` set. Returns the summary dict."""
        t0 = time.perf_counter()
        cfg, tcfg, paths = self.cfg, self.tcfg, self.paths
        main = jax.process_index() == 0
        it = BatchIterator(self.data.train, tcfg.batch_size, tcfg.seed, jax.process_index(),
                           jax.process_count())
        ckpt = TrainCheckpointer(paths.checkpoints, keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
        stop = _StopRequest()
        try:
            prev_wall = self._restore(ckpt, it)
            first = int(jax.device_get(self.state.step))
            if main:  # only now: a refused resume must not overwrite the run's config
                dump_yaml(cfg, paths.config)
                _trim_metrics(paths.metrics, first)
            metrics = MetricsLog(paths.metrics, main,
                                 paths.tensorboard if cfg.log.tensorboard else None)
            try:
                with _stop_on_signals(stop):
                    step, last, compile_s = self._loop(ckpt, it, metrics, stop, should_stop,
                                                       t0 - prev_wall)
                interrupted = step < tcfg.steps
                summary = {
                    "mode": tcfg.mode, "start_step": first, "step": step, "steps": tcfg.steps,
                    "interrupted": interrupted, "signal": stop.signal, "run_dir": paths.root,
                    "checkpoint_dir": paths.checkpoints, "metrics_path": paths.metrics,
                    "data": self.data.report, "data_state": it.state(), "last_metrics": last,
                    "compile_s": compile_s, "wall_time_s": prev_wall + time.perf_counter() - t0,
                    "eval": None, "exports": {},
                }
                if not interrupted and self.data.eval is not None:
                    summary["eval"] = self.evaluate()
                    metrics.write({"kind": "eval", "step": step, **summary["eval"]})
            finally:
                metrics.close()
        finally:
            ckpt.close()  # waits for background writes
        if not interrupted and cfg.export.enabled:
            summary["exports"] = self.export(summary)
        return summary

    def _loop(self, ckpt, it, metrics, stop, should_stop, t_origin) -> tuple[int, dict, float]:
        """Steps until ``train.steps`` or a stop request, logging and checkpointing; the last
        step is always saved. Returns ``(step, last logged metrics, compile seconds)``."""
        cfg, tcfg = self.cfg, self.tcfg
        kd = tcfg.mode == "medusa2" and tcfg.kd
        frozen = self._place_base() if kd else None  # the original base, never donated
        step_fn = _train_step(self.model_cfg, self.medusa_cfg, tcfg, self.mesh)
        row_tokens = tcfg.batch_size * tcfg.seq_len
        step = int(jax.device_get(self.state.step))

        def save() -> None:
            meta = {"data": it.state(), "config": to_dict(cfg),
                    "extra": {"wall_time_s": time.perf_counter() - t_origin}}
            ckpt.save(step, checkpoint_tree(tcfg, self.state), meta)

        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.log.progress and jax.process_index() == 0))
        window, last, compile_s, t_win, timed = [], {}, None, time.perf_counter(), 0
        try:
            while step < tcfg.steps:
                batch = global_batch_from_local(next(it), self.mesh)
                args = (self.state, batch, frozen) if kd else (self.state, batch)
                self.state, m = step_fn(*args)
                step += 1
                window.append(m)
                if compile_s is None:  # keep the compilation out of the throughput
                    jax.block_until_ready(m)
                    compile_s = time.perf_counter() - t_win
                    t_win, timed = time.perf_counter(), 0
                else:
                    timed += 1
                bar.update(1)
                stopping = _any_process(
                    stop.signal is not None or bool(should_stop and should_stop(step)))
                if step % cfg.log.every_steps == 0 or step == tcfg.steps or stopping:
                    dt = time.perf_counter() - t_win
                    last = _reduce(jax.device_get(window))
                    last.update(kind="train", step=step,
                                wall_time_s=round(time.perf_counter() - t_origin, 3),
                                tokens_per_s=timed * row_tokens / dt if timed else None)
                    metrics.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}",
                                    tok_s=f"{last['tokens_per_s'] or 0:.0f}")
                    window, t_win, timed = [], time.perf_counter(), 0
                    if last["nonfinite_consecutive"] >= _MAX_NONFINITE:
                        raise FloatingPointError(
                            f"{last['nonfinite_consecutive']} consecutive steps with "
                            "non-finite gradients (all skipped): lower the learning rate")
                if step % cfg.checkpoint.every_steps == 0 or stopping:
                    save()
                if stopping:
                    break
            save()  # no-op when this step is saved already
        finally:
            bar.close()
        return step, last, compile_s

    # ------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """Per-head top-1 / top-5 accuracy and cross entropy on the held-out split."""
        tcfg = self.tcfg
        fn = _eval_fn(self.model_cfg, self.medusa_cfg, tcfg)
        it = BatchIterator(self.data.eval, tcfg.batch_size, tcfg.seed, jax.process_index(),
                           jax.process_count(), drop_last=False, num_epochs=1)
        total = None
        with mesh_context(self.mesh):
            for b in it:
                b.pop("valid")  # filler rows already have loss_mask 0
                batch = global_batch_from_local(b, self.mesh)
                out = jax.device_get(fn(self.state.params, batch))
                total = out if total is None else jax.tree.map(np.add, total, out)
        n = np.maximum(total["count"], 1.0)
        return {"head_top1": (total["top1"] / n).tolist(),
                "head_top5": (total["top5"] / n).tolist(),
                "head_loss": (total["ce"] / n).tolist(), "head_count": total["count"].tolist()}

    # ----------------------------------------------------------------------------- export
    def export(self, summary: dict) -> dict:
        """Write the heads (our format + v1 layout) and, in Medusa-2 (or on a tiny random
        model), the base as a complete Hugging Face checkpoint with its tokenizer: the run
        directory then decodes with ``decode.py --model RUN`` (:func:`setup.export_run`)."""
        medusa = _to_host(self.state.params["medusa"])  # every process gathers
        medusa2 = self.tcfg.mode == "medusa2"
        base = _to_host(self.state.params["base"]) if medusa2 else self.base_host
        metadata = {
            "mode": self.tcfg.mode, "steps": summary["step"],
            "data": {k: self.data.report[k] for k in ("source", "summary", "train_rows")},
            "wall_time_s": round(summary["wall_time_s"], 1), "eval": summary["eval"],
        }
        return export_run(self.cfg, self.paths, self.medusa_cfg, self.model_cfg, medusa, base,
                          metadata, with_base=medusa2)


def train(run_cfg: RunConfig, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Run (or resume) one training run end to end; returns :meth:`Trainer.run`'s summary."""
    return Trainer(run_cfg).run(should_stop)
