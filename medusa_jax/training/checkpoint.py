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

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from medusa_jax.config import MedusaConfig, ModelConfig
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.optimizer import make_optimizer
from medusa_jax.training.step import TrainState, abstract_params, state_shardings, trainable
from medusa_jax.weights.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "TrainCheckpointer",
    "abstract_checkpoint_tree",
    "checkpoint_tree",
    "restore_checkpoint",
    "state_from_tree",
]

STATE_ITEM = "state"
META_ITEM = "meta"


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
            raise ValueError("this checkpoint holds no base parameters (Medusa-1): pass "
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
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for a damaged directory
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read "
                f"({type(e).__name__}: {e}); delete that step directory to fall back to an "
                "earlier one, or start afresh elsewhere"
            ) from e

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
