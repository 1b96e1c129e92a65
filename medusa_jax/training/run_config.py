"""The configuration of one training run: model, heads, mesh, optimisation, data, checkpoints,
logging and exports, as one frozen dataclass read from YAML plus overrides (with OmegaConf).

    cfg = load_run_config("configs/smollm2_medusa1.yaml", ["train.steps=200"])
    dump_yaml(cfg, cfg.paths().config)       # the resolved config, next to the checkpoints

Paths left at None default to places inside ``checkpoint.dir`` (see :meth:`RunConfig.paths`),
so one directory holds everything a run writes: ``config.yaml``, ``checkpoints/``,
``metrics.jsonl``, ``data_cache/``, ``heads/``, ``heads_v1/`` and (Medusa-2) ``base/``.

:func:`load_config` (from :mod:`medusa_jax.training.config_files`, which moves configs between
files, the command line and the dataclasses) reads any (nested) config dataclass the same way;
the model's shapes (:class:`medusa_jax.config.ModelConfig`) live in ``medusa_jax/config.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

from medusa_jax.config import ConfigError
from medusa_jax.sharding import MeshConfig
from medusa_jax.training.config_files import dump_yaml, load_config, to_dict, to_yaml

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
    # cache_hidden only: start from a saved head set (a ``save_heads`` directory, e.g. the
    # shipped heads) instead of fresh heads, to go on training them on new data. Its head type,
    # head count, ResBlocks, LM-head sharing and draft vocabulary are kept; a ``medusa`` section
    # that says otherwise is refused.
    init_heads: str | None = None

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
        _check(self.init_heads is None or self.cache_hidden,
               "init_heads needs cache_hidden=True (only the cached Medusa-1 trainer can start "
               "from saved heads)")
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
    a hash of each record's id, so the split stays put when the file grows) is held out for the
    final evaluation. Tokenised arrays are cached in
    ``cache_dir`` (None: ``<checkpoint.dir>/data_cache``), keyed by every input they depend on."""

    path: str | None = None
    max_records: int | None = None
    mode: Literal["pad", "pack"] = "pack"
    drop_leading_assistant: bool = True
    eval_fraction: float = 0.02
    cache: bool = True
    cache_dir: str | None = None
    # train.cache_hidden only: "auto" reads the base model's hidden states from the distiller's
    # sidecar (<path>.hidden, `train.py distill --engine refill --keep-hidden`) when it exists
    # instead of running the base over the data; "sidecar" requires it; "recompute" never reads it.
    hidden_states: Literal["auto", "sidecar", "recompute"] = "auto"

    def __post_init__(self):
        _check(self.hidden_states in ("auto", "sidecar", "recompute"),
               f"data.hidden_states must be auto, sidecar or recompute, got {self.hidden_states!r}")
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
