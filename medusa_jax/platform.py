"""Keep JAX from probing for a TPU that is not there.

``pip install medusa_jax[test]`` brings ``libtpu`` (the TPU compiler, for ahead-of-time
compilation on any machine: ``medusa_jax.aot``). With it installed, every ``import jax`` on a
machine without TPU chips first tries to start a TPU runtime: about a second and several lines of
errors. :func:`skip_absent_tpu` (called by ``decode.py`` and ``train.py`` before they import jax)
leaves TPU out of ``JAX_PLATFORMS`` when no TPU device node exists. It never overrides a
``JAX_PLATFORMS`` the user set, and does nothing where libtpu is absent or TPU chips are present.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_TPU_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_GPU_PLUGINS = {"cuda": ("jax_cuda13_plugin", "jax_cuda12_plugin"),
                "rocm": ("jax_rocm7_plugin", "jax_rocm60_plugin")}


def tpu_present() -> bool:
    return any(glob.glob(p) for p in _TPU_NODES)


def skip_absent_tpu() -> str | None:
    """Set ``JAX_PLATFORMS`` without TPU when libtpu is installed but no TPU is attached;
    returns the value set (None when nothing was changed). Call before jax is imported."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return None
    if tpu_present():
        return None
    gpus = [name for name, mods in _GPU_PLUGINS.items()
            if any(importlib.util.find_spec(m) is not None for m in mods)]
    os.environ["JAX_PLATFORMS"] = ",".join([*gpus, "cpu"])
    return os.environ["JAX_PLATFORMS"]
