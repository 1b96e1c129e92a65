"""Multi-process (multi-host) setup: starting ``jax.distributed`` and feeding it batches.

Every process runs the same program. Call :func:`maybe_initialize` first, before anything else
touches jax (no ``jax.devices()``, no arrays), then build the mesh over all processes' devices
and feed each process's rows of every global batch through :func:`global_batch_from_local`::

    info = maybe_initialize()            # a no-op in a plain single-process run
    mesh = make_mesh(MeshConfig(data=-1, fsdp=4))
    it = BatchIterator(arrays, tcfg.batch_size, seed, info.process_index, info.process_count)
    for local in it:                     # this process's contiguous share of the global batch
        state, metrics = train_step(state, global_batch_from_local(local, mesh))

Where the settings come from, first match wins:

1. the arguments;
2. ``MEDUSA_COORDINATOR`` (``host:port`` of process 0), ``MEDUSA_NUM_PROCESSES``,
   ``MEDUSA_PROCESS_ID``, ``MEDUSA_LOCAL_DEVICE_COUNT``, ``MEDUSA_COORDINATOR_BIND``;
3. JAX's own ``JAX_COORDINATOR_ADDRESS`` (and whatever ``jax.distributed.initialize`` detects
   itself), or, with ``auto=True`` / ``MEDUSA_DISTRIBUTED=auto``, JAX's cluster auto-detection
   alone: on Cloud TPU pods, SLURM and Open MPI ``jax.distributed.initialize()`` needs no
   arguments.

With none of these the call does nothing and the run is single-process.

On CPU, cross-process collectives need an implementation; :func:`maybe_initialize` selects gloo
(TCP, built into jaxlib) unless one is already configured, e.g. ``mpi`` through
``JAX_CPU_COLLECTIVES_IMPLEMENTATION``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax._src import distributed as _jax_distributed  # global_state: no backend start-up
from jax._src import xla_bridge as _xla_bridge
from jax.sharding import Mesh

from medusa_jax.errors import MedusaError
from medusa_jax.sharding import ShardingError, batch_sharding

ENV_COORDINATOR = "MEDUSA_COORDINATOR"
ENV_NUM_PROCESSES = "MEDUSA_NUM_PROCESSES"
ENV_PROCESS_ID = "MEDUSA_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "MEDUSA_LOCAL_DEVICE_COUNT"
ENV_COORDINATOR_BIND = "MEDUSA_COORDINATOR_BIND"
ENV_DISTRIBUTED = "MEDUSA_DISTRIBUTED"


class DistributedError(MedusaError, RuntimeError):
    """The multi-process settings are incomplete or contradictory, or came too late."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`maybe_initialize` left in place. ``initialized``: ``jax.distributed`` is up
    (by this call or an earlier one); ``started``: this call started it."""

    initialized: bool
    started: bool
    process_index: int
    process_count: int
    coordinator_address: str | None


def _info(started: bool) -> DistributedInfo:
    # Read jax's distributed state, not jax.process_index(): that would start the backends.
    gs = _jax_distributed.global_state
    if gs.client is None:
        return DistributedInfo(False, False, 0, 1, None)
    return DistributedInfo(
        True, started, int(gs.process_id), int(gs.num_processes), gs.coordinator_address
    )


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


def _check_address(what: str, address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{what}={address!r} must look like host:port (port 1-65535)")
    return address


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _backends_started() -> bool:
    return _xla_bridge.backends_are_initialized()


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on the CPU backend (psum, all-gather of a sharded batch, ...)
    need an implementation; older jaxlibs default to none. Only the CPU client reads this."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # a jax without the option: nothing to select
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _set_cpu_device_count(n: int) -> None:
    if _backends_started():
        raise DistributedError(
            f"local_device_count={n} must be set before anything starts a jax backend "
            "(jax.devices(), arrays, jit calls): call maybe_initialize() first thing"
        )
    jax.config.update("jax_num_cpu_devices", n)


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    *,
    auto: bool | None = None,
    coordinator_bind_address: str | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> DistributedInfo:
    """Start ``jax.distributed`` when this run is configured as multi-process; otherwise do
    nothing. Idempotent: a second call with the same (or no) settings returns the running
    setup, one with different settings raises :class:`DistributedError`.

    ``local_device_count`` sets the number of devices this process exposes on the CPU backend
    (``jax_num_cpu_devices``; it overrides ``--xla_force_host_platform_device_count``). It has no
    effect on accelerators, which expose their physical devices.

    A loopback coordinator (``127.0.0.1``, ``localhost``, ``::1``) is also bound on loopback
    only (JAX's default binds every interface); pass ``coordinator_bind_address`` (or set
    ``MEDUSA_COORDINATOR_BIND``) to choose otherwise.

    Must run before anything starts a jax backend (``jax.devices()``, creating an array, ...).
    """
    coord = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    nproc = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    ndev = (
        local_device_count if local_device_count is not None else _env_int(ENV_LOCAL_DEVICE_COUNT)
    )
    bind = coordinator_bind_address or os.environ.get(ENV_COORDINATOR_BIND) or None
    if auto is None:
        auto = os.environ.get(ENV_DISTRIBUTED, "").strip().lower() in ("auto", "1", "true")

    # ----------------------------------------------------------------- validation
    for name, v, low in (
        ("num_processes", nproc, 1),
        ("process_id", pid, 0),
        ("local_device_count", ndev, 1),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise DistributedError(f"{name} must be an integer >= {low}, got {v!r}")
    if nproc is not None and pid is not None and pid >= nproc:
        raise DistributedError(
            f"process_id={pid} is out of range for num_processes={nproc} (valid: 0..{nproc - 1})"
        )
    if coord is not None:
        _check_address("coordinator_address", coord)
    if bind is not None:
        _check_address("coordinator_bind_address", bind)

    explicit = any(v is not None for v in (coord, nproc, pid))
    jax_env = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    wanted = explicit or auto or jax_env

    # ----------------------------------------------------------------- already running
    current = _info(started=False)
    if current.initialized:
        clashes = [
            f"{name}={mine!r} (running: {theirs!r})"
            for name, mine, theirs in (
                ("coordinator_address", coord, current.coordinator_address),
                ("num_processes", nproc, current.process_count),
                ("process_id", pid, current.process_index),
            )
            if mine is not None and mine != theirs
        ]
        if clashes:
            raise DistributedError(
                "jax.distributed is already initialized with other settings: " + ", ".join(clashes)
            )
        return current

    if not wanted:  # single process: nothing to start, but the CPU device count still applies
        if ndev is not None:
            _set_cpu_device_count(ndev)
        return current
    coord_known = coord if coord is not None else os.environ.get("JAX_COORDINATOR_ADDRESS")
    if explicit and not auto and None in (coord_known, nproc, pid):
        missing = [
            n
            for n, v in (
                ("coordinator_address", coord_known),
                ("num_processes", nproc),
                ("process_id", pid),
            )
            if v is None
        ]
        raise DistributedError(
            f"multi-process run needs coordinator_address, num_processes and process_id; "
            f"missing {', '.join(missing)} (arguments or {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); pass auto=True to let JAX detect the "
            "rest from the cluster environment"
        )
    if _backends_started():
        raise DistributedError(
            "maybe_initialize() must run before anything starts a jax backend (jax.devices(), "
            "jax.numpy arrays, jit calls, ...): call it first thing in the program"
        )

    # ----------------------------------------------------------------- start
    _use_gloo_on_cpu()
    if ndev is not None:
        _set_cpu_device_count(ndev)
    if bind is None and coord is not None and _is_loopback(coord.rpartition(":")[0]):
        bind = coord
    kwargs = dict(
        coordinator_address=coord,
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=int(initialization_timeout),
        heartbeat_timeout_seconds=int(heartbeat_timeout),
    )
    if bind is not None:
        kwargs["coordinator_bind_address"] = bind
    jax.distributed.initialize(**kwargs)
    return _info(started=True)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def _addressable_rows(mesh: Mesh, global_batch_size: int) -> list[tuple[int, int]]:
    """Distinct ``[start, stop)`` row blocks of a ``[global_batch_size]`` batch that this
    process's devices hold, sorted."""
    idx = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    blocks = set()
    for (s,) in idx.values():
        start, stop, _ = s.indices(global_batch_size)
        blocks.add((start, stop))
    return sorted(blocks)


def local_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch this process feeds: one contiguous range (raises
    :class:`ShardingError` when the mesh gives a process scattered rows)."""
    blocks = _addressable_rows(mesh, global_batch_size)
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if start != stop:
            raise ShardingError(
                f"process {jax.process_index()} holds non-contiguous row blocks {blocks} of a "
                f"batch of {global_batch_size}: order the mesh devices by process"
            )
    return slice(blocks[0][0], blocks[-1][1])


def global_batch_from_local(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """This process's rows of every batch array (``[B_local, ...]``, e.g. from
    ``BatchIterator(..., process_index, process_count)``) -> global ``jax.Array`` s of shape
    ``[B_global, ...]``, split over ``data`` x ``fsdp`` on the batch axis.

    The process's rows must be the ones its devices hold in the mesh, and ``BatchIterator``
    hands process ``i`` the ``i``-th contiguous block of each global batch; this is checked
    (a :class:`ShardingError` names the rows the mesh expects), so a mesh whose device order does
    not follow the processes, or a ``tensor`` axis spanning processes (two processes holding
    the same rows), fails loudly rather than training on a shuffled or duplicated batch.
    In a single-process run the local batch is the global one.
    """
    if not local_batch:
        raise ValueError("local_batch is empty")
    arrays = {k: np.asarray(v) for k, v in local_batch.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays must share a leading (row) dimension, got {sizes}")
    b_local = next(iter(sizes.values()))

    n_blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    mine = len(_addressable_rows(mesh, n_blocks))  # row blocks this process holds
    if mine == 0:
        raise ShardingError(f"process {jax.process_index()} has no devices in the mesh")
    if b_local % mine:
        raise ShardingError(
            f"local batch of {b_local} rows does not split over this process's {mine} row "
            f"shards (data x fsdp = {n_blocks} over {jax.process_count()} processes)"
        )
    b_global = b_local * n_blocks // mine
    rows = local_batch_slice(mesh, b_global)
    expected = slice(jax.process_index() * b_local, (jax.process_index() + 1) * b_local)
    if (rows.start, rows.stop) != (expected.start, expected.stop):
        raise ShardingError(
            f"process {jax.process_index()} of {jax.process_count()} feeds rows "
            f"{expected.start}:{expected.stop} of each global batch of {b_global} (BatchIterator's "
            f"contiguous split), but its devices hold rows {rows.start}:{rows.stop} in this mesh; "
            "order the mesh devices by process and keep the tensor axis within a process"
        )
    out = {}
    for k, v in arrays.items():
        sharding = batch_sharding(mesh, v.ndim)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (b_global, *v.shape[1:]))
    return out
