"""The configuration of one training run: model, heads, mesh, optimisation, data, checkpoints,
logging and exports, as one frozen dataclass read from YAML plus overrides (with OmegaConf).

    cfg = load_run_config("configs/smollm2_medusa1.yaml", ["train.steps=200"])
    dump_yaml(cfg, cfg.paths().config)       # the resolved config, next to the checkpoints

Paths left at None default to places inside ``checkpoint.dir`` (see :meth:`RunConfig.paths`),
so one directory holds everything a run writes: ``config.yaml``, ``checkpoints/``,
``metrics.jsonl``, ``data_cache/``, ``heads/``, ``heads_v1/`` and (Medusa-2) ``base/``.

:func:`load_config` reads any (nested) config dataclass the same way; the model's shapes
(:class:`medusa_jax.config.ModelConfig`) live in ``medusa_jax/config.py``.
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
from medusa_jax.sharding import MeshConfig

__all__ = [
    "CheckpointSection", "DataSection", "ExportSection", "LogSection", "MedusaSection",
    "ModelSection", "RunConfig", "RunPaths", "TrainConfig", "dump_yaml", "load_config",
    "load_run_config", "to_dict", "to_yaml",
]

Dtype = Literal["float32", "bfloat16", "float16"]
BYTES_TOKENIZER = "bytes"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------------
# train: the recipe, static and hashable (jitted train steps close over a TrainConfig)
# --------------------------------------------------------------------------------------------

MODES = ("medusa1", "medusa2")
SCHEDULES = ("cosine", "constant")
HEAD_TARGETS = ("tokens", "base")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Medusa-1 (frozen base, heads only) or Medusa-2 (joint) training.

    Learning rates: the heads' peak rate is ``heads_lr`` if given, else ``heads_lr_multiplier``
    times ``base_lr`` (Medusa-2 recipe: 4x), else 1e-3 (the Medusa-1 recipe). ``base_lr`` is
    used only in Medusa-2, where the base trains with it after ``heads_warmup_steps`` steps of
    heads-only training. Both schedules warm up linearly over ``warmup_steps`` (or
    ``warmup_ratio`` of their steps) and then follow ``schedule``.

    Loss: Medusa-1 ``Σ_k decay^k CE_k``; Medusa-2 ``L_LM + heads_coef · Σ_k decay^k CE_k``,
    where with ``kd`` ``L_LM`` is ``KL(p_original ‖ p_model)`` against the frozen original base.
    """

    mode: str = "medusa1"
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    base_lr: float = 1e-5
    heads_lr: float | None = None
    heads_lr_multiplier: float | None = None
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    decay: float = 0.8
    heads_coef: float = 0.2
    kd: bool = False
    heads_warmup_steps: int = 0
    seed: int = 0
    # Medusa-1 only: compute the base's hidden states once and train the heads on the stored
    # states of the target positions, ``token_batch`` positions per step (training/cached.py).
    cache_hidden: bool = False
    token_batch: int = 512
    # What head k learns to predict for token t+k+1: the data's token ("tokens") or, from the
    # cached states, the base model's own distribution there (LM head on the state of position
    # t+k: "base", a distillation target; the Hydra authors found it better).
    head_target: str = "tokens"

    def __post_init__(self):
        _check(self.mode in MODES, f"mode={self.mode!r} must be one of {MODES}")
        _check(self.schedule in SCHEDULES, f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        _check(self.base_lr >= 0, f"base_lr must be >= 0, got {self.base_lr}")
        _check(
            self.heads_lr is None or self.heads_lr >= 0,
            f"heads_lr must be >= 0, got {self.heads_lr}",
        )
        _check(
            self.heads_lr_multiplier is None or self.heads_lr_multiplier >= 0,
            f"heads_lr_multiplier must be >= 0, got {self.heads_lr_multiplier}",
        )
        _check(
            self.heads_lr is None or self.heads_lr_multiplier is None,
            f"give heads_lr ({self.heads_lr}) or heads_lr_multiplier "
            f"({self.heads_lr_multiplier}), not both",
        )
        _check(
            0.0 <= self.warmup_ratio <= 1.0,
            f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}",
        )
        _check(
            self.warmup_steps is None
            or (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps),
            f"warmup_steps must be an integer in [0, steps={self.steps}], "
            f"got {self.warmup_steps!r}",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip}",
        )
        _check(
            0.0 <= self.adam_b1 < 1.0 and 0.0 <= self.adam_b2 < 1.0,
            f"adam_b1/adam_b2 must be in [0, 1), got {self.adam_b1}/{self.adam_b2}",
        )
        _check(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        _check(0.0 < self.decay <= 1.0, f"decay must be in (0, 1], got {self.decay}")
        _check(self.heads_coef >= 0, f"heads_coef must be >= 0, got {self.heads_coef}")
        _check(
            not (self.kd and self.mode == "medusa1"),
            "kd=True needs mode='medusa2' (Medusa-1 has no LM loss to distil)",
        )
        _check(
            isinstance(self.heads_warmup_steps, int) and 0 <= self.heads_warmup_steps < self.steps,
            f"heads_warmup_steps must be an integer in [0, steps={self.steps}), "
            f"got {self.heads_warmup_steps!r}",
        )
        _check(isinstance(self.token_batch, int) and self.token_batch > 0,
               f"token_batch must be a positive integer, got {self.token_batch!r}")
        _check(not (self.cache_hidden and self.mode != "medusa1"),
               "cache_hidden=True needs mode='medusa1' (Medusa-2 changes the base, so its hidden "
               "states cannot be cached)")
        _check(self.head_target in HEAD_TARGETS,
               f"head_target={self.head_target!r} must be one of {HEAD_TARGETS}")
        _check(self.head_target == "tokens" or self.cache_hidden,
               f"head_target={self.head_target!r} needs cache_hidden=True (the base's own "
               "distribution comes from the cached hidden states)")
        _check(
            self.heads_warmup_steps == 0 or self.mode == "medusa2",
            f"heads_warmup_steps={self.heads_warmup_steps} only applies to mode='medusa2' "
            "(Medusa-1 never trains the base)",
        )

    @property
    def peak_heads_lr(self) -> float:
        if self.heads_lr is not None:
            return self.heads_lr
        if self.heads_lr_multiplier is not None:
            return self.heads_lr_multiplier * self.base_lr
        return 1e-3

    def num_warmup_steps(self, total: int) -> int:
        """Warmup steps for a schedule spanning ``total`` steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return int(round(self.warmup_ratio * total))

    def replace(self, **kw) -> TrainConfig:
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------------------------
# The other sections of a run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The base model. ``path``: a Hugging Face checkpoint directory or a .gguf file (None: the
    default SmolLM2-135M-Instruct). ``tiny``: a random-weight tiny Llama instead (tests, smoke
    runs; ``tiny_vocab_size`` must cover the tokenizer's ids). ``tokenizer``: a HF tokenizer
    directory or .gguf file (None: the model's own, or the default model's for ``tiny``);
    ``"bytes"`` is a byte-level stand-in with 259 ids. ``dtype`` is the compute dtype,
    ``param_dtype`` that of the stored (master) weights."""

    path: str | None = None
    tiny: bool = False
    tiny_vocab_size: int = 49152
    tiny_hidden_size: int = 32
    tokenizer: str | None = None
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots"] = "none"

    def __post_init__(self):
        _check(not (self.tiny and self.path), f"model.tiny=true and model.path={self.path!r}: "
               "choose one (tiny builds a random model, path loads one)")
        _check(self.tiny_vocab_size > 0 and self.tiny_hidden_size > 0,
               f"model.tiny_vocab_size/tiny_hidden_size must be > 0, got "
               f"{self.tiny_vocab_size}/{self.tiny_hidden_size}")


@dataclasses.dataclass(frozen=True)
class MedusaSection:
    """The heads: ``num_heads`` heads of ``num_layers`` ResBlocks each, projecting through the
    base LM head (``shared_lm_head``) or their own copy of it."""

    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    param_dtype: Dtype = "float32"
    # > 0: the heads propose only the N most frequent target tokens of the training data (a
    # draft vocabulary: their projection shrinks V/N times; verification keeps the full one).
    draft_vocab_size: int = 0
    # "medusa" (head k sees h_t) or "hydra" (head k also sees the tokens t+1 .. t+k of its path)
    head_type: str = "medusa"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training conversations. ``path``: JSON list / JSONL / parquet in ShareGPT or messages
    form (None: the packaged ShareGPT). Rows are ``train.seq_len`` tokens, one conversation each
    (``mode: pad``) or several (``pack``). ``eval_fraction`` of the conversations (chosen by
    ``train.seed``) is held out for the final evaluation. Tokenised arrays are cached in
    ``cache_dir`` (None: ``<checkpoint.dir>/data_cache``), keyed by every input they depend on."""

    path: str | None = None
    max_records: int | None = None
    mode: Literal["pad", "pack"] = "pack"
    drop_leading_assistant: bool = True
    eval_fraction: float = 0.02
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        _check(self.max_records is None or self.max_records > 0,
               f"data.max_records must be > 0 or null, got {self.max_records}")
        _check(0.0 <= self.eval_fraction < 1.0,
               f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints in ``<dir>/checkpoints``: every ``every_steps`` steps and at the end,
    the last ``keep`` kept, written in the background when ``async_save``. With ``resume`` a
    run continues from the latest checkpoint in ``dir``."""

    dir: str = "runs/medusa"
    every_steps: int = 500
    keep: int = 2
    async_save: bool = True
    resume: bool = True

    def __post_init__(self):
        _check(bool(self.dir), "checkpoint.dir must not be empty")
        _check(self.every_steps > 0, f"checkpoint.every_steps must be > 0, got {self.every_steps}")
        _check(self.keep > 0, f"checkpoint.keep must be > 0, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Metrics every ``every_steps`` steps to JSONL (``metrics_path``, None:
    ``<checkpoint.dir>/metrics.jsonl``), a tqdm bar (``progress``) and, with ``tensorboard``,
    event files in ``<checkpoint.dir>/tensorboard`` (needs tensorboardX or torch)."""

    metrics_path: str | None = None
    every_steps: int = 10
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self):
        _check(self.every_steps > 0, f"log.every_steps must be > 0, got {self.every_steps}")


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """What the finished run writes: heads in our format (``heads_dir``), in the original
    Medusa v1 layout (``v1_dir``, if ``v1``) and, for Medusa-2, the trained base as a Hugging
    Face checkpoint (``base_dir``). None: ``heads``, ``heads_v1``, ``base`` in
    ``checkpoint.dir``."""

    enabled: bool = True
    heads_dir: str | None = None
    v1: bool = True
    v1_dir: str | None = None
    base_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Every file and directory a run reads or writes, resolved (absolute)."""

    root: str
    config: str
    checkpoints: str
    metrics: str
    data_cache: str
    tensorboard: str
    heads: str
    heads_v1: str
    base: str


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One Medusa training run. ``devices``: use the first N local devices (None: all)."""

    model: ModelSection = ModelSection()
    medusa: MedusaSection = MedusaSection()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    data: DataSection = DataSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    export: ExportSection = ExportSection()
    devices: int | None = None

    def __post_init__(self):
        _check(self.devices is None or self.devices > 0,
               f"devices must be > 0 or null, got {self.devices}")

    def paths(self) -> RunPaths:
        """Where this run's files go (None paths resolved inside ``checkpoint.dir``)."""
        root = os.path.abspath(os.path.expanduser(self.checkpoint.dir))

        def pick(value: str | None, default: str) -> str:
            return os.path.abspath(os.path.expanduser(value)) if value else os.path.join(
                root, default)

        return RunPaths(
            root=root,
            config=os.path.join(root, "config.yaml"),
            checkpoints=os.path.join(root, "checkpoints"),
            metrics=pick(self.log.metrics_path, "metrics.jsonl"),
            data_cache=pick(self.data.cache_dir, "data_cache"),
            tensorboard=os.path.join(root, "tensorboard"),
            heads=pick(self.export.heads_dir, "heads"),
            heads_v1=pick(self.export.v1_dir, "heads_v1"),
            base=pick(self.export.base_dir, "base"),
        )

    def check_paths(self) -> RunPaths:
        """:meth:`paths`, after checking that each can be written as what it is (a directory or
        a file) without looking at its contents: called before the data and the model are
        loaded, so a ``checkpoint.dir`` that names a file fails at once instead of after the
        load. ConfigError (:class:`~medusa_jax.training.files.OutputPathError`) naming the
        setting."""
        from medusa_jax.training.files import check_output_dir, check_output_file

        p = self.paths()
        check_output_dir(p.root, "checkpoint.dir")
        check_output_dir(p.checkpoints, "checkpoint.dir (its checkpoints/ folder)")
        check_output_file(p.config, "checkpoint.dir (its config.yaml)")
        check_output_dir(p.data_cache, "data.cache_dir" if self.data.cache_dir
                         else "checkpoint.dir (its data_cache/ folder)")
        check_output_file(p.metrics, "log.metrics_path" if self.log.metrics_path
                          else "checkpoint.dir (its metrics.jsonl)")
        if self.export.enabled:
            check_output_dir(p.heads, "export.heads_dir")
            if self.export.v1:
                check_output_dir(p.heads_v1, "export.v1_dir")
            if self.train.mode == "medusa2":
                check_output_dir(p.base, "export.base_dir")
        return p

    def replace(self, **sections) -> RunConfig:
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------------------------
# Reading and writing configs
# --------------------------------------------------------------------------------------------


def load_run_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
                    ) -> RunConfig:
    """A :class:`RunConfig` from dataclass defaults < the YAML at ``path`` < ``overrides``
    (``key.sub=value`` or ``--set key.sub=value`` tokens). Raises ConfigError naming the key
    for unknown keys, wrong types and invalid values."""
    return load_config(RunConfig, path, overrides)


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
