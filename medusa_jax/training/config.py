"""The training configuration: a frozen, validated dataclass of static, hashable settings."""

from __future__ import annotations

import dataclasses

from medusa_jax.config import ConfigError

MODES = ("medusa1", "medusa2")
SCHEDULES = ("cosine", "constant")
HEAD_TARGETS = ("tokens", "base")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
