"""Reading and writing config dataclasses: YAML files plus ``key.sub=value`` overrides merged
by OmegaConf into frozen (nested) dataclasses, checked strictly against their annotations, and
back to YAML. :mod:`medusa_jax.training.run_config` defines what a run's configuration holds;
this module only moves it between files, the command line and the dataclasses.

    cfg = load_config(RunConfig, "run.yaml", ["--set", "train.steps=200", "train.kd=true"])
    dump_yaml(cfg, "ckpt/config.yaml")        # the resolved config, next to the checkpoints
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medusa_jax.config import ConfigError

__all__ = ["dump_yaml", "load_config", "to_dict", "to_yaml"]


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> Any:
    """A ``cls`` instance (a frozen, possibly nested dataclass) from its defaults < the YAML
    file at ``path`` (None: no file) < ``overrides``, left to right (``--set a.b=v``,
    ``--set=a.b=v`` or ``a.b=v`` tokens).

    OmegaConf does the merging: ``OmegaConf.structured(cls)`` holds the defaults, the file
    and then each override (``OmegaConf.from_dotlist``, which reads the value as YAML:
    ``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{a: 1}``) are merged into it, and
    ``OmegaConf.to_object`` builds the dataclasses, whose ``__post_init__`` checks the values
    (its errors pass through unchanged). A mapping merges into the section it names
    (``train={steps: 5}`` keeps the other ``train`` keys), a dotted key creates an Optional
    section left at null (``extra.lr=1``), and ``${a.b}`` interpolations resolve.

    Before each merge its values are checked against the field annotations (nested
    dataclasses, ``Optional``/unions, ``tuple``/``list``/``dict``, ``Literal``, scalars),
    strictly: OmegaConf alone would read ``1`` or ``"yes"`` as true, ``5`` as ``"5"`` and
    ``"3"`` as 3, and reports a bad tuple item without its path. A field typed ``str`` gets an
    override's text verbatim when YAML reads it as something else (``name=007`` stays
    ``"007"``); an int is taken for a float. Raises ConfigError for unreadable YAML, unknown
    keys (with the close matches and the valid keys at that level) and type mismatches
    (``train.steps: expected int, got 'abc'``)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    layers: list[tuple[Any, dict[str, str]]] = []  # (plain data, {override key: its text})
    if path is not None:
        layers.append((_read_yaml(os.fspath(path)), {}))
    for key, text in _split_overrides(overrides):
        try:
            layer = OmegaConf.from_dotlist([f"{key}={text}"])
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}={text!r}: value is not valid YAML ({e})") from None
        layers.append((OmegaConf.to_container(layer), {key: text}))
    try:
        cfg = OmegaConf.structured(cls)
        for data, texts in layers:
            cfg = OmegaConf.merge(cfg, _checked(cls, data, "", texts))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required key(s) {', '.join(missing)} (no default)")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
        where, msg = getattr(e, "full_key", None), str(e).split("\n    full_key:")[0]
        raise ConfigError(f"{where}: {msg}" if where else msg) from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data for a (nested) dataclass or mapping
    (``OmegaConf.to_container``): tuples become lists, enums their names, paths strings.
    :func:`load_config` reads it back."""
    return _lists(OmegaConf.to_container(OmegaConf.create(obj), enum_to_str=True))


def to_yaml(obj: Any) -> str:
    """``obj`` (a config dataclass or :func:`to_dict` data) as YAML (``OmegaConf.to_yaml``;
    strings YAML would read as something else are quoted)."""
    return OmegaConf.to_yaml(to_dict(obj))


def dump_yaml(obj: Any, path: str | os.PathLike) -> str:
    """Write :func:`to_yaml` of ``obj`` to ``path`` (parents created, replaced atomically so a
    crash never leaves half a file). Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_yaml(obj))
    os.replace(tmp, path)
    return path


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _split_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["--set", "a.b=1", "c=x", "--set=d=[1,2]"]`` -> ``[("a.b", "1"), ("c", "x"), ...]``."""
    if isinstance(tokens, str):
        tokens = [tokens]  # a single "a=1" string must not be iterated character by character
    out = []
    it = iter(tokens)
    for tok in it:
        if tok == "--set":
            item = next(it, None)
            if item is None:
                raise ConfigError("--set needs a key=value argument after it")
        elif tok.startswith("--set="):
            item = tok[len("--set="):]
        elif tok.startswith("-"):
            raise ConfigError(f"unrecognised override {tok!r}: use --set key=value or key=value")
        else:
            item = tok
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        if not _KEY.match(key):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like train.steps")
        out.append((key, text))
    return out


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the shape, before OmegaConf reads it
        if node is not None and not isinstance(node, yaml.MappingNode):
            got = "a list" if isinstance(node, yaml.SequenceNode) else repr(node.value)
            raise ConfigError(
                f"config file {path}: the top level must be a mapping of keys, got {got}")
        return OmegaConf.to_container(OmegaConf.create(text))  # empty file: {}, all defaults
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def _lists(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _lists(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_lists(v) for v in data]
    return data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fmt_type(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_fmt_type(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in args)
    return origin is Literal and any(isinstance(a, str) for a in args)


def _is_float(value: Any) -> bool:
    if isinstance(value, str):  # OmegaConf converts "1e-3" and the like
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: _is_float,
    str: lambda v: isinstance(v, str),
}


def _checked(tp: Any, value: Any, where: str, texts: dict[str, str]) -> Any:
    """``value`` (plain data for a field annotated ``tp`` at dotted path ``where``), checked;
    returned as it is except where an override's own text (``texts[where]``) replaces it."""

    def mismatch() -> ConfigError:
        return ConfigError(f"{where or '<root>'}: expected {_fmt_type(tp)}, got "
                           f"{texts.get(where, value)!r}")

    if where in texts and not isinstance(value, str) and _accepts_str(tp):
        try:
            return _checked(tp, value, where, {})
        except ConfigError:  # YAML read the text as a number/bool/null but a string was meant
            return _checked(tp, texts[where], where, texts)
    if tp is Any or tp is object or (isinstance(value, str) and "${" in value):
        return value  # untyped, or an interpolation (OmegaConf checks what it resolves to)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _checked(arm, value, where, texts)
            except ConfigError:
                # an error from inside a nested dataclass arm is more useful than "expected X"
                if dataclasses.is_dataclass(arm) and isinstance(value, Mapping):
                    raise
        raise mismatch()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise mismatch()
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where or '<root>'}: expected a mapping of {tp.__name__} fields, got {value!r}")
        fields = sorted(f.name for f in dataclasses.fields(tp) if f.init)
        out = {}
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=3)
                hint = " or ".join(repr(f"{where}.{c}" if where else c) for c in close)
                raise ConfigError(
                    f"unknown key {path!r}{f' (did you mean {hint}?)' if close else ''}: valid "
                    f"keys at {where or 'the top level'} are {', '.join(fields)}")
            out[key] = _checked(_hints(tp)[key], item, path, texts)
        return out
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            raise mismatch()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{where}: expected {len(args)} items ({_fmt_type(tp)}), got {list(value)!r}")
            item_types = args
        else:
            item_types = (args[0] if args else Any,) * len(value)
        return [_checked(t, v, f"{where}[{i}]", texts)
                for i, (t, v) in enumerate(zip(item_types, value, strict=True))]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        key_tp, val_tp = args or (Any, Any)
        return {_checked(key_tp, k, f"{where}.{k}", texts):
                _checked(val_tp, v, f"{where}.{k}", texts) for k, v in value.items()}
    if tp in _SCALARS and not _SCALARS[tp](value):
        raise mismatch()
    return value  # a scalar, or an annotation OmegaConf checks itself (an enum, a path)
