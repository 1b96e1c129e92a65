"""Training checkpoints: an orbax ``CheckpointManager`` around the train state and run metadata.

Each checkpoint step holds two items:

* ``state``: ``{"step", "rng", "params", "opt_state"}``, where ``params`` is the *trainable*
  part of the parameters (:func:`medusa_jax.training.step.trainable`). In Medusa-1 the base is
  frozen, so it is not saved: a resumed run reloads it from its source, which keeps a Medusa-1
  checkpoint of a 7B model at the size of its heads instead of 28 GB.
* ``meta`` (JSON): the data iterator position (``data``), the resolved run config
  (``config``) and anything else the loop wants back (``extra``).

Restoring goes through an abstract target whose leaves carry the *current* mesh's shardings
(:func:`abstract_checkpoint_tree`), so a checkpoint written on 8 devices restores on 1 and the
other way round: orbax reads each device's slice straight from the files.

    ckpt = TrainCheckpointer("run/checkpoints", keep=2)
    ckpt.save(100, checkpoint_tree(tcfg, state), {"data": it.state()})
    tree, meta = ckpt.restore(abstract_checkpoint_tree(cfg, mcfg, tcfg, mesh))
    ckpt.close()                                   # waits for background writes
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.training.optimizer import make_optimizer
from medusa_jax.training.run_config import TrainConfig
from medusa_jax.training.step import TrainState, abstract_params, state_shardings, trainable
from medusa_jax.weights.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointReadError",
    "TrainCheckpointer",
    "abstract_checkpoint_tree",
    "checkpoint_tree",
    "restore_checkpoint",
    "state_from_tree",
]

STATE_ITEM = "state"
META_ITEM = "meta"
DAMAGED_SUFFIX = ".damaged"  # unreadable steps are moved to <directory>.damaged/<step>

log = logging.getLogger("medusa_jax.train")


class CheckpointReadError(CheckpointError):
    """One checkpoint step exists but cannot be read (a damaged or missing file, a missing
    item): unlike a checkpoint of another run, an earlier step may still be good."""

    def __init__(self, message: str, step: int, reason: str):
        super().__init__(message)
        self.step, self.reason = step, reason


# TensorStore's messages carry the whole driver spec (~60 lines) and a chain of "Error opening
# ... driver:" prefixes; the cause is the rest.
_SPEC_TAIL = re.compile(r"(\.? See full TensorStore details| \[tensorstore_spec).*", re.S)
_DRIVER_PREFIX = re.compile(r'Error opening "[^"]*" driver: ')
_MAX_REASON = 300


def _short_reason(e: BaseException) -> str:
    """One line saying why a read failed: the innermost storage error of ``e``'s chain
    (orbax wraps it in a bare Exception that only names the array slice), spec cut off."""
    inner, seen = e, {id(e)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        inner = inner.__cause__
        seen.add(id(inner))
    text = _DRIVER_PREFIX.sub("", _SPEC_TAIL.sub("", str(inner))).strip()
    text = " ".join(text.split())
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON - 3] + "..."
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _orbax_leftover(unraisable) -> bool:
    """An abandoned orbax read coroutine being closed, or a TensorStore completion callback
    (``call_soon_threadsafe``) reaching the event loop orbax already closed."""
    obj = unraisable.object
    if inspect.iscoroutine(obj):
        return "orbax" in obj.cr_code.co_filename
    tb = unraisable.exc_traceback
    return (obj is None and unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


_hook_installed = False


def _drop_orbax_leftovers() -> None:
    """After a failed read, orbax's other read coroutines for that step are closed whenever
    they are garbage collected (possibly much later), each printing "Exception ignored in
    <coroutine ...>" and a ~60-line traceback that repeats the failure we already reported;
    TensorStore reads still in flight then complete into orbax's closed event loop, each
    printing a RuntimeError traceback from another thread. Installed once (on the first failed
    read), this hook drops exactly those two kinds; every other unraisable error is passed
    on."""
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_leftover(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    # the same leftovers also surface as asyncio's "exception was never retrieved" log record
    # when orbax's gathering future is collected with the failed read inside it
    logging.getLogger("asyncio").addFilter(_OrbaxFutureFilter())
    _hook_installed = True


# how a storage-layer read failure names itself: TensorStore's own errors, or the OCDBT
# database orbax's checkpoints are written in (a truncated or missing chunk reads as
# 'Error reading "<leaf>" in OCDBT database at local file ...', with no "TensorStore" in it)
_STORAGE_ERROR_MARKS = ("TensorStore", "OCDBT database")


class _OrbaxFutureFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {exc!r}"
        return not ("exception was never retrieved" in text
                    and any(mark in text for mark in _STORAGE_ERROR_MARKS))


@contextlib.contextmanager
def _quiet_storage_logs():
    """Orbax logs (through absl) each failed read before raising it; we report it once."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def checkpoint_tree(tcfg: TrainConfig, state: TrainState) -> dict:
    """What a checkpoint stores of ``state``: step, RNG key, optimizer state and the trainable
    parameters (``{"medusa"}`` in Medusa-1, everything in Medusa-2)."""
    return {
        "step": state.step,
        "rng": state.rng,
        "params": trainable(tcfg, state.params),
        "opt_state": state.opt_state,
    }


def abstract_checkpoint_tree(
    model_cfg: ModelConfig, medusa_cfg: MedusaConfig, tcfg: TrainConfig, mesh: Mesh
) -> dict:
    """The restore target for :func:`checkpoint_tree`: ``jax.ShapeDtypeStruct`` leaves with
    ``mesh``'s shardings, computed without allocating anything."""
    sh = state_shardings(model_cfg, medusa_cfg, tcfg, mesh)
    params = trainable(tcfg, nn.meta.unbox(abstract_params(model_cfg, medusa_cfg)))
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
        "params": params,
        "opt_state": jax.eval_shape(make_optimizer(tcfg).init, params),
    }
    shardings = {
        "step": sh.step,
        "rng": sh.rng,
        "params": trainable(tcfg, sh.params),
        "opt_state": sh.opt_state,
    }
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def state_from_tree(tcfg: TrainConfig, tree: dict, base_params: Any = None) -> TrainState:
    """A :class:`TrainState` from a restored checkpoint tree; Medusa-1 needs the (frozen)
    ``base_params``, placed like the state's."""
    params = dict(tree["params"])
    if "base" not in params:
        if base_params is None:
            raise CheckpointError("this checkpoint holds no base parameters (Medusa-1): pass "
                                  "base_params")
        params = {"base": base_params, **params}
    return TrainState(step=tree["step"], params=params, opt_state=tree["opt_state"],
                      rng=tree["rng"])


class TrainCheckpointer:
    """Numbered checkpoints in ``directory`` (``<directory>/<step>/{state,meta}``); the last
    ``keep`` are kept. With ``async_save`` a save returns once the arrays are copied off the
    devices and the files are written in the background (:meth:`wait` / :meth:`close` block
    until they are). ``create=False`` refuses a missing directory (restoring only)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True,
                 create: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        if not create and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            enable_async_checkpointing=async_save,
            # a save cut short (killed process) leaves a temporary directory: never a step
            cleanup_tmp_directories=True,
        )
        try:
            self._mngr = ocp.CheckpointManager(
                self.directory, options=options, item_names=(STATE_ITEM, META_ITEM)
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {e}"
            ) from e

    # ------------------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """The steps with a complete checkpoint, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    # --------------------------------------------------------------------------------- save
    def save(self, step: int, tree: dict, meta: dict | None = None) -> bool:
        """Write ``tree`` (:func:`checkpoint_tree`) and the JSON-able ``meta`` as checkpoint
        ``step``. Returns False (and writes nothing) when that step is already saved."""
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(tree), META_ITEM: ocp.args.JsonSave(meta or {})}
        )
        return bool(self._mngr.save(step, args=args, force=True))

    # ------------------------------------------------------------------------------ restore
    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {steps or 'none'})")
        return int(step)

    def _read(self, step: int, items: dict) -> Any:
        reason = None
        with _quiet_storage_logs():
            try:
                return self._mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax raises many types for a damaged directory
                _drop_orbax_leftovers()
                reason = _short_reason(e)
                log.debug("reading checkpoint step %d failed", step, exc_info=True)
            # not chained: the storage error's traceback holds orbax's abandoned coroutines
            # (and its message ~60 lines of spec); once it is gone they can be collected now
            gc.collect()
        raise CheckpointReadError(
            f"checkpoint step {step} in {self.directory} cannot be read ({reason}); delete "
            "that step directory to fall back to an earlier one, or start afresh elsewhere",
            step, reason)

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of checkpoint ``step`` (None: the latest), without the arrays."""
        step = self._step(step)
        return dict(self._read(step, {META_ITEM: ocp.args.JsonRestore()})[META_ITEM] or {})

    def restore(self, abstract_tree: dict, step: int | None = None) -> tuple[dict, dict]:
        """``(tree, meta)`` of checkpoint ``step`` (None: the latest), the arrays placed as
        ``abstract_tree``'s shardings say. CheckpointError if there is none or it is damaged
        or does not fit the target (another model or head count)."""
        step = self._step(step)
        out = self._read(step, {
            STATE_ITEM: ocp.args.StandardRestore(abstract_tree),
            META_ITEM: ocp.args.JsonRestore(),
        })
        return out[STATE_ITEM], dict(out[META_ITEM] or {})

    def restore_newest_readable(self, abstract_tree: dict,
                                check_meta: Callable[[dict], None] | None = None
                                ) -> tuple[int, dict, dict]:
        """``(step, tree, meta)`` of the newest step that can be read, trying older ones when
        the newest is damaged (a truncated file, a missing folder). ``check_meta(meta)`` is
        called on each step's meta before its arrays are read; what it raises (another run's
        checkpoint) is passed on, no fallback. Newer unreadable steps are moved to
        ``<directory>.damaged/`` with one warning each, so the resumed run can save those steps
        again (and never resumes from them later). CheckpointError when no step is readable
        (nothing is moved then)."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failed: list[CheckpointReadError] = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
                if check_meta is not None:
                    check_meta(meta)
                tree, meta = self.restore(abstract_tree, step)
            except CheckpointReadError as e:
                failed.append(e)
                continue
            for e in failed:
                moved = self._set_aside(e.step)
                log.warning("checkpoint step %d in %s cannot be read (%s); moved it to %s and "
                            "resuming from step %d", e.step, self.directory, e.reason, moved,
                            step)
            return step, tree, meta
        shown = "; ".join(f"step {e.step}: {e.reason}" for e in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be read ({shown}); delete that directory "
            "(or use another checkpoint.dir) to start afresh")

    def _set_aside(self, step: int) -> str:
        """Move step ``step`` out of the manager's directory (process 0; the others wait) and
        return where it went."""
        root = self.directory + DAMAGED_SUFFIX  # beside, not inside: orbax lists only steps
        dest, n = os.path.join(root, str(step)), 1
        while os.path.exists(dest):  # an earlier run set this step aside already
            dest, n = os.path.join(root, f"{step}.{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(root, exist_ok=True)
            # our manager names step directories by the bare number (no prefix, no padding)
            os.replace(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"medusa_set_aside_{step}")
        self._mngr.reload()  # forget the moved step
        return dest

    # -------------------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Block until background writes have finished."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish background writes and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_checkpoint(
    directory: str | os.PathLike,
    model_cfg: ModelConfig,
    medusa_cfg: MedusaConfig,
    tcfg: TrainConfig,
    mesh: Mesh,
    step: int | None = None,
) -> tuple[dict, dict]:
    """Read checkpoint ``step`` (None: the latest) of ``directory`` onto ``mesh``:
    ``(tree, meta)`` as :meth:`TrainCheckpointer.restore`. CheckpointError for a missing
    directory, no checkpoint or a damaged one."""
    with TrainCheckpointer(directory, create=False, async_save=False) as ckpt:
        return ckpt.restore(abstract_checkpoint_tree(model_cfg, medusa_cfg, tcfg, mesh), step)
