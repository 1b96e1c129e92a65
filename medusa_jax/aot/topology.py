"""TPU topologies without the chips: ``get_topology("v5e:4x4")`` describes a slice's devices
(from libtpu), :func:`topology_mesh` lays a ``("data", "fsdp", "tensor")`` mesh over them, and
:data:`CHIPS` holds what each chip has (HBM, peak bf16 FLOP/s, HBM bandwidth)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from medusa_jax.aot.report import AOTError, GiB
from medusa_jax.sharding import MESH_AXES, MeshConfig, ShardingError

# Per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): HBM capacity, peak dense bf16 matmul throughput and HBM bandwidth. Keyed by the
# ``device_kind`` the topology's devices report. The compiler's own limit is a little lower
# (it reserves some HBM: 15.75 GiB of a v5e's 16), and its out-of-memory errors say so.
CHIPS: dict[str, dict[str, Any]] = {
    "TPU v4": {"name": "v4", "hbm_gib": 32, "bf16_tflops": 275, "hbm_gbs": 1200},
    "TPU v5 lite": {"name": "v5e", "hbm_gib": 16, "bf16_tflops": 197, "hbm_gbs": 819},
    "TPU v5": {"name": "v5p", "hbm_gib": 95, "bf16_tflops": 459, "hbm_gbs": 2765},
    "TPU v6 lite": {"name": "v6e", "hbm_gib": 32, "bf16_tflops": 918, "hbm_gbs": 1640},
}
TOPOLOGY_EXAMPLES = (
    "v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:8x8", "v5e:16x16",
    "v5p:2x2x1", "v5p:2x2x2", "v5p:2x4x4", "v5p:4x4x4", "v4:2x2x1", "v6e:2x2",
)
_TOPOLOGY_RE = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")
# libtpu's default chips per host; a smaller slice (v5e:1x1) must say it has fewer.
_DEFAULT_HOST_BOUNDS = (2, 2, 1)


def libtpu_available() -> bool:
    """Whether ``libtpu`` (the TPU compiler) is installed: ``pip install 'jax[tpu]'``."""
    return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices of a TPU slice named like ``v5e:4x4``, and what each chip has."""

    name: str
    devices: tuple
    device_kind: str
    chip: str  # v5e, v5p, ...
    hbm_bytes: int  # per device
    peak_flops: float  # per device, bf16
    hbm_bandwidth: float  # bytes/s per device
    num_hosts: int

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def _quiet_libtpu() -> None:
    """On a machine without TPU chips, give libtpu the two settings it otherwise warns about at
    length on every load (it looks for the TPU VM's hosts); they change nothing in what the
    topology API returns. Left alone on a TPU VM."""
    try:
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return
    except Exception:  # private API: if it moved, stay quiet about it and skip the nicety
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    # libtpu takes /tmp/libtpu_lockfile so two processes never share chips; with no chips there
    # is nothing to share, and without this a second compiling process (two test runs, a report
    # next to a test) fails to start.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.lru_cache(maxsize=16)
def get_topology(name: str) -> Topology:
    """The devices of the TPU topology ``name`` (``v5e:2x2``, ``v5p:4x4x4``...). Raises
    :class:`AOTError` when libtpu is missing or the name is not a topology libtpu knows."""
    examples = ", ".join(TOPOLOGY_EXAMPLES)
    if not libtpu_available():
        raise AOTError(
            "libtpu is not installed, so no TPU topology can be compiled for: "
            f"pip install 'jax[tpu]=={jax.__version__}' (the TPU compiler; no TPU needed)"
        )
    m = _TOPOLOGY_RE.match(name)
    if m is None:
        raise AOTError(
            f"unknown TPU topology {name!r}: expected <chip>:<AxB> or <chip>:<AxBxC> "
            f"(examples: {examples})"
        )
    dims = [int(d) for d in m.group(2).split("x")]
    kw = {}
    bounds = _DEFAULT_HOST_BOUNDS[: len(dims)] + (1,) * (3 - len(dims))
    if any(d < b for d, b in zip(dims, bounds)):
        kw["chips_per_host_bounds"] = tuple(min(d, b) for d, b in zip(dims + [1] * 3, bounds))
    _quiet_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
    except Exception as e:  # libtpu's own words (JaxRuntimeError: INVALID_ARGUMENT ...)
        if "INVALID_ARGUMENT" not in str(e):  # libtpu did not start: not the name's fault
            raise AOTError(f"libtpu could not describe TPU topology {name!r}: {e}") from e
        raise AOTError(f"unknown TPU topology {name!r}: {e} (examples: {examples})") from e
    devices = tuple(desc.devices)
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise AOTError(
            f"topology {name!r} has devices of kind {kind!r}, for which the chip table "
            f"(medusa_jax.aot.CHIPS: {', '.join(CHIPS)}) has no HBM size"
        )
    chip = CHIPS[kind]
    # v4's description lists each TensorCore as a device: share the chip between them.
    per_chip = len(devices) // len({tuple(d.coords) for d in devices})
    return Topology(
        name=name,
        devices=devices,
        device_kind=kind,
        chip=chip["name"],
        hbm_bytes=int(chip["hbm_gib"] * GiB) // per_chip,
        peak_flops=chip["bf16_tflops"] * 1e12 / per_chip,
        hbm_bandwidth=chip["hbm_gbs"] * 1e9 / per_chip,
        num_hosts=len({d.process_index for d in devices}),
    )


def topology_mesh(topo: Topology | str, mesh_cfg: MeshConfig) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over the topology's devices, laid out along the
    physical torus (``mesh_utils.create_device_mesh``). A mesh whose size is not the topology's
    device count is an :class:`AOTError`."""
    topo = get_topology(topo) if isinstance(topo, str) else topo
    try:
        sizes = mesh_cfg.resolve(topo.num_devices)
    except ShardingError as e:
        raise AOTError(
            f"the mesh does not match topology {topo.name} ({topo.num_devices} "
            f"{topo.chip} devices): {e}"
        ) from e
    from jax.experimental import mesh_utils

    try:
        grid = mesh_utils.create_device_mesh(sizes, list(topo.devices))
    except Exception:
        try:
            grid = mesh_utils.create_device_mesh(
                sizes, list(topo.devices), allow_split_physical_axes=True
            )
        except Exception:
            grid = np.asarray(topo.devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
