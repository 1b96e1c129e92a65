"""The error contract: every exception class the package defines for bad input derives from
MedusaError, and the CLIs turn exactly those into one ``error:`` line with exit status 2; any
other exception (a bug in our code) keeps its traceback."""

import importlib
import importlib.util
import inspect
import os
import pkgutil

import pytest

import medusa_jax
from medusa_jax.errors import MedusaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_exceptions():
    found = {}
    for info in pkgutil.walk_packages(medusa_jax.__path__, "medusa_jax."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__.startswith("medusa_jax")):
                found[f"{obj.__module__}.{name}"] = obj
    return found


def test_every_package_error_is_a_medusa_error():
    found = _package_exceptions()
    assert len(found) >= 12  # ConfigError, TreeError, CheckpointError, ... (the walk works)
    assert [n for n, cls in found.items() if not issubclass(cls, MedusaError)] == []


def _cli(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cli, runner, argv", [
    ("decode", "run", ["--prompt", "hi"]),
    ("train", "run_train", ["medusa1", "--config", os.path.join(ROOT, "configs", "tiny.yaml")]),
])
def test_the_clis_report_medusa_errors_and_let_bugs_raise(cli, runner, argv, monkeypatch,
                                                          capsys):
    module = _cli(cli)

    def bad_input(*a, **k):
        raise MedusaError("the thing the user gave is wrong")

    monkeypatch.setattr(module, runner, bad_input)
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the thing the user gave is wrong"

    def bug(*a, **k):
        raise ValueError("a bug of ours")  # not a MedusaError: must not become an error line

    monkeypatch.setattr(module, runner, bug)
    with pytest.raises(ValueError, match="a bug of ours"):
        module.main(argv)
