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
