"""Device meshes, the logical-axis rules table and sharded initialisation.

Parameters and activations carry logical axis names (``embed``, ``mlp``, ``vocab``, ...). One
table, :data:`LOGICAL_AXIS_RULES`, maps them onto the mesh axes ``("data", "fsdp", "tensor")``:

* ``data``: pure data parallelism (parameters replicated),
* ``fsdp``: data parallelism whose parameters are sharded on their ``embed`` dimension and
  all-gathered per layer (ZeRO-3 style),
* ``tensor``: Megatron-style tensor parallelism over heads, MLP columns and the vocabulary.

Typical use::

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = sharded_init(init_fn, mesh, jax.random.PRNGKey(0))   # never materialised on one host
    with mesh_context(mesh):                                      # activation constraints
        hidden, _ = jax.jit(model.apply)(...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from medusa_jax.errors import MedusaError

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters for activations only: flax resolves an activation's names in this order and
# skips a rule whose mesh axis is already taken, so ``batch`` (listed first) claims ``fsdp`` and
# an activation's ``embed`` dimension stays unsharded. Parameter specs never contain ``batch``,
# so there ``embed`` gets ``fsdp``.
# ``embed_out`` (the output side of the Medusa ResBlock kernels ``[M, N, D, D]``) stays
# unsharded: a ResBlock adds its output back onto the replicated-D residual, so splitting the
# output columns over ``tensor`` only buys an all-gather per block for a weight that is tiny next
# to the base. (It also miscompiled: with scanned base layers on a (2, 2, 2) mesh, a
# tensor-sharded ``embed_out`` gave wrong head outputs under both Shardy and GSPMD, jax 0.10.2.)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("medusa_heads", None),
    ("medusa_layers", None),
    ("medusa_path", None),
)


class ShardingError(MedusaError):
    """A mesh or a sharding does not fit: the message names the sizes involved."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``data``, ``fsdp`` and ``tensor`` mesh axes; at most one may be -1,
    meaning "all the devices the other axes leave"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes
        for name, v in zip(MESH_AXES, sizes, strict=True):
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ShardingError(f"mesh axis {name}={v!r} must be a positive integer or -1")
        if sizes.count(-1) > 1:
            raise ShardingError(
                f"at most one mesh axis may be -1, got data={self.data}, fsdp={self.fsdp}, "
                f"tensor={self.tensor}"
            )

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete axis sizes for ``num_devices`` devices (fills in the -1)."""
        sizes = list(self.sizes)
        known = math.prod(s for s in sizes if s != -1)
        desc = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(
                    f"mesh ({desc}): {num_devices} devices are not divisible by the product "
                    f"{known} of the fixed axes"
                )
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise ShardingError(
                f"mesh ({desc}) needs {known} devices but {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(mcfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all devices).

    Axes are ``Auto``: shardings propagate from inputs and constraints, not from types.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mcfg.resolve(len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Make ``nn.with_logical_constraint`` inside the model bind to ``mesh``.

    Enter it around the *call* of a jitted function (``jax.set_mesh`` is not allowed inside
    ``jax.jit``); tracing then happens inside it.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec
# ------------------------------------------------------------------------------------------


def logical_to_spec(
    names: Sequence[str | None], rules=LOGICAL_AXIS_RULES, where: str = "?"
) -> PartitionSpec:
    """A parameter's logical axis names -> a mesh ``PartitionSpec``.

    Stricter than flax's resolution: an unknown name and a mesh axis used by two dimensions
    are errors (flax would silently replicate), because for parameters both mean a typo or a
    rules table that no longer fits the model.
    """
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)  # first rule wins, as in flax
    out, used = [], {}
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(
                f"{where}: logical axis {name!r} has no rule in the logical axis rules "
                f"(known: {', '.join(table)})"
            )
        axes = table[name]
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            if a in used:
                raise ShardingError(
                    f"{where}: mesh axis {a!r} would shard both dimension {used[a]} and "
                    f"dimension {i} (logical names {tuple(names)})"
                )
            used[a] = i
        out.append(axes)
    return PartitionSpec(*out)


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_divisible(where: str, shape, spec: PartitionSpec, names, mesh: Mesh) -> None:
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[i] % size:
            label = f" (logical {names[i]!r})" if names is not None else ""
            raise ShardingError(
                f"{where}: dimension {i}{label} of size {shape[i]} is not divisible by mesh "
                f"axis {'x'.join(axes)} of size {size} (shape {tuple(shape)}); change the mesh "
                "or the rules table"
            )


def param_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every leaf of a tree whose leaves may be boxed (e.g.
    ``jax.eval_shape(model.init, ...)``): ``nn.LogicallyPartitioned`` leaves are sharded by
    their logical names through ``rules``, plain ``nn.Partitioned`` ones by their mesh axis
    names, and unboxed leaves (scalars, counters, RNG keys) are replicated. Returns an unboxed
    tree of shardings.

    Raises ``ShardingError`` naming the parameter path when a dimension does not divide by
    its mesh axes or a mesh axis is used twice.
    """

    def one(path, leaf):
        where = _path_str(path) or "<root>"
        if isinstance(leaf, nn.LogicallyPartitioned):
            names = tuple(leaf.names)
            spec = logical_to_spec(names, rules, where)
            _check_divisible(where, leaf.value.shape, spec, names, mesh)
            return NamedSharding(mesh, spec)
        if isinstance(leaf, nn.Partitioned):  # names are mesh axes already
            spec = PartitionSpec(*leaf.names)
            _check_divisible(where, leaf.value.shape, spec, None, mesh)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_AXIS_RULES):
    """Run ``init_fn(*args)`` (returning a tree with ``nn.Partitioned`` leaves) so that every
    parameter is created directly in its shards: shapes come from ``jax.eval_shape``, the
    shardings from :func:`param_shardings`, and the jitted init writes each shard on its
    device. Returns the unboxed parameters."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)

    def init_unboxed(*a):
        return nn.meta.unbox(init_fn(*a))

    # No mesh_context: the init's dummy batch is not worth constraining; the out_shardings
    # alone make XLA create each parameter in its shards.
    return jax.jit(init_unboxed, out_shardings=shardings)(*args)


def shard_params(params: Any, shardings: Any) -> Any:
    """Place host arrays (e.g. numpy weights from a checkpoint) onto their shardings.

    Each device's shard is sliced out of the host array by ``jax.make_array_from_callback``,
    so only the addressable shards are copied (also in multi-host runs, where every host holds
    the full numpy array, or a memory map of it). Arrays already spread over several hosts are
    resharded on device. The result never shares buffers with the input: ``device_put`` would
    let a replicated result alias its source, and donating the result (the train step does)
    would then delete the caller's array.
    """

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, params, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """``[B, ...]`` arrays split over ``data`` x ``fsdp`` on the batch axis."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch (numpy ``[B_local, ...]``) -> global sharded arrays.

    In a single-process run the local batch is the global one.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over ``data`` x ``fsdp``."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ShardingError(
            f"batch_size={batch_size} is not divisible by data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {n}"
        )
