"""decode.py / train.py keep JAX from probing for absent TPU chips when libtpu is installed."""

import importlib.util

import pytest

from medusa_jax import platform as plat


@pytest.fixture
def libtpu_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else
                        (None if name.startswith("jax_") and name.endswith("_plugin") else real(name, *a)))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)


def test_no_tpu_chips_means_cpu(libtpu_installed, monkeypatch):
    monkeypatch.setattr(plat, "tpu_present", lambda: False)
    assert plat.skip_absent_tpu() == "cpu"
    import os

    assert os.environ["JAX_PLATFORMS"] == "cpu"


def test_tpu_chips_or_a_user_choice_are_left_alone(libtpu_installed, monkeypatch):
    monkeypatch.setattr(plat, "tpu_present", lambda: True)
    assert plat.skip_absent_tpu() is None
    monkeypatch.setattr(plat, "tpu_present", lambda: False)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert plat.skip_absent_tpu() is None


def test_without_libtpu_nothing_changes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert plat.skip_absent_tpu() is None


def test_importing_the_package_in_a_plain_process_does_not_probe_for_tpus():
    """A notebook imports medusa_jax before jax and sets no JAX_PLATFORMS: with libtpu installed
    (as here) and no chips, nothing may be printed and the CPU backend comes up."""
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("libtpu") is None or plat.tpu_present():
        pytest.skip("needs libtpu installed and no TPU attached (the test extra on a CPU machine)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-c", "import medusa_jax.api, jax; print(jax.default_backend())"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cpu"
    assert "TPU" not in r.stderr, r.stderr
