"""Nested frozen dataclasses from YAML plus command-line overrides, and back to YAML.

    cfg = load_config(RunConfig, "run.yaml", ["--set", "train.steps=200", "train.kd=true"])
    dump_yaml(cfg, "ckpt/config.yaml")        # the resolved config, next to the checkpoints

Precedence: dataclass defaults < the YAML file < overrides (left to right). Override values
are parsed with ``yaml.safe_load`` (``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{a: 1}``); a
field typed ``str`` gets the override text verbatim when YAML would read it as something else
(``name=007`` stays ``"007"``). Types are checked against the field annotations (nested
dataclasses, ``Optional``/unions, ``tuple``/``list``/``dict``, ``Literal``, scalars); checking
the *values* is left to each dataclass's own ``__post_init__``, whose errors pass through
unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from medusa_jax.config import ConfigError

__all__ = ["ConfigError", "dump_yaml", "from_dict", "load_config", "parse_overrides", "to_dict"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Override:
    """An override value: the YAML-parsed value plus the text it came from (for str fields)."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any):
        self.text = text
        self.value = value


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> Any:
    """Build a ``cls`` instance from dataclass defaults, the YAML file at ``path`` (None: no file)
    and ``overrides`` (``--set a.b=v``, ``--set=a.b=v`` or positional ``a.b=v`` tokens).

    Raises ConfigError for unreadable YAML, unknown keys (listing the valid keys at that level)
    and type mismatches (``train.steps: expected int, got 'abc'``)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    data: dict = {}
    if path is not None:
        data = _read_yaml(os.fspath(path))
    for key, value in parse_overrides(overrides):
        _set_path(data, key.split("."), value)
    return from_dict(cls, data)


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping (missing keys keep their defaults).

    ``where`` is the dotted path of ``data`` used in error messages."""
    return _convert(cls, data, where)


def parse_overrides(tokens: Sequence[str]) -> list[tuple[str, _Override]]:
    """``["--set", "a.b=1", "c=x", "--set=d=[1,2]"]`` -> ``[(dotted_key, value), ...]``."""
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
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        out.append((key, _Override(text, value)))
    return out


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data for a (nested) dataclass: tuples become lists, enums their
    values, paths strings. Only ``init`` fields are written, so ``from_dict`` reads it back."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_dict(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return to_dict(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} ({obj!r}) to a config file")


def dump_yaml(obj: Any, path: str | os.PathLike) -> str:
    """Write ``to_dict(obj)`` as YAML to ``path`` (parents created, replaced atomically so a
    crash never leaves half a file). Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of keys, "
            f"got {type(data).__name__}"
        )
    return data


def _set_path(data: dict, keys: list[str], value: _Override) -> None:
    """Put ``value`` at ``keys`` in the nested dict, creating levels as needed. A mapping value
    is merged into an existing section rather than replacing it (``train={steps: 5}`` keeps
    the other ``train`` keys from the YAML)."""
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if isinstance(child, _Override) and isinstance(child.value, dict):
            child = node[k] = dict(child.value)
        elif not isinstance(child, dict):
            # a scalar/None at an intermediate level (e.g. an Optional section set to null in
            # the YAML) is replaced: the override asks for that section to exist
            child = node[k] = {}
        node = child
    leaf = keys[-1]
    if isinstance(value.value, dict) and isinstance(node.get(leaf), dict):
        node[leaf] = _merge(node[leaf], value.value)
    else:
        node[leaf] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _mismatch(where: str, tp: Any, value: Any) -> ConfigError:
    shown = value.text if isinstance(value, _Override) else value
    return ConfigError(f"{where or '<root>'}: expected {_fmt_type(tp)}, got {shown!r}")


def _accepts_str(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is str:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked/converted to annotation ``tp``; ``where`` names it in errors."""
    if isinstance(value, _Override):
        try:
            return _convert(tp, value.value, where)
        except ConfigError as e:
            # YAML read the text as a number/bool/null but the field wants a string: the user
            # meant the text itself
            if _accepts_str(tp) and not isinstance(value.value, str):
                try:
                    return _convert(tp, value.text, where)
                except ConfigError:
                    raise _mismatch(where, tp, value) from None
            raise e from None
    if tp is Any or tp is object:
        return _plain(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, where)
            except ConfigError as e:
                # an error from inside a nested dataclass arm is more useful than "expected X"
                if dataclasses.is_dataclass(arm) and isinstance(value, Mapping):
                    raise e from None
        raise _mismatch(where, tp, value)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _mismatch(where, tp, value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where or '<root>'}: expected a mapping of {tp.__name__} fields, got {value!r}"
            )
        return _build(tp, value, where)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _mismatch(where, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    f"{where}: expected {len(args)} items ({_fmt_type(tp)}), got {list(value)!r}"
                )
            pairs = enumerate(zip(args, value, strict=True))
            items = [_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list or tp is list else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(where, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, f"{where}.{k}"): _convert(val_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(where, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(where, tp, value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-3" as a string; Python's float() does not
            try:
                return float(value)
            except ValueError:
                pass
        raise _mismatch(where, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(where, tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}") from None
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(where, tp, value)
    return _plain(value)  # an annotation we do not understand: pass the value through


def _plain(value: Any) -> Any:
    """Strip override wrappers from data headed for an untyped (``Any``) field."""
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            level = where or "the top level"
            raise ConfigError(
                f"unknown key {path!r}: valid keys at {level} are {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(hints.get(key, Any), value, path)
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        shown = ", ".join(f"{where}.{m}" if where else m for m in missing)
        raise ConfigError(f"missing required key(s) {shown} ({cls.__name__} has no default)")
    return cls(**kwargs)  # __post_init__ validates the values; its errors pass through
