"""Shared test setup. The environment is set before anything imports jax: 8 virtual CPU devices
(sharding tests), no Hugging Face network access, quiet tokenizers."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
_xla = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla:
    os.environ["XLA_FLAGS"] = f"{_xla} {_FLAG}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from medusa_jax.config import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny random-weight config with unrolled layers (fast single-token decoding on CPU)."""
    return tiny_config(scan_layers=False)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Random base parameters for ``tiny_cfg`` (seed 1)."""
    from medusa_jax.model import init_params

    return init_params(tiny_cfg, jax.random.PRNGKey(1))
