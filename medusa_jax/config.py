"""Frozen, validated configuration dataclasses.

`ModelConfig` describes a Llama-family base model (Llama-2/3, Vicuna, Mistral, Qwen2, SmolLM2)
and can be built from a Hugging Face ``config.json`` or from GGUF metadata. Everything here is
plain Python: no arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from medusa_jax.errors import MedusaError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")
HEAD_TYPES = ("medusa", "hydra")
# who reads the cache prefix in attention (medusa_jax.model.attention.IMPLS; auto = by backend)
ATTENTION_IMPLS = ("auto", "xla", "reference", "pallas_gpu", "pallas_tpu")


class ConfigError(MedusaError):
    """A configuration value is invalid; the message names the field and the value."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling: ``default``, ``linear`` (position interpolation) or ``llama3``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check(
            self.rope_type in ("default", "linear", "llama3"),
            f"rope_scaling.rope_type={self.rope_type!r} is not supported "
            "(supported: 'default', 'linear', 'llama3')",
        )
        _check(self.factor > 0, f"rope_scaling.factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return cls()
        kw: dict[str, Any] = {"rope_type": kind, "factor": float(d.get("factor", 1.0))}
        if kind == "llama3":
            kw.update(
                low_freq_factor=float(d.get("low_freq_factor", 1.0)),
                high_freq_factor=float(d.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
            )
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Letters in shape comments: D=hidden_size, N=num_heads,
    K=num_kv_heads, H=head_dim, F=intermediate_size, V=vocab_size, L=num_layers."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # activations / compute
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | dots (training only)
    attention_impl: str = "auto"  # cache attention: auto (by backend) | xla | pallas_gpu | ...

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_heads == 0,
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check(self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim must be even and > 0, got {self.head_dim}")
        _check(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _check(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r} not in {DTYPES}")
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} not in {DTYPES}")
        _check(self.remat_policy in ("none", "full", "dots"),
               f"remat_policy={self.remat_policy!r} not in ('none', 'full', 'dots')")
        _check(self.attention_impl in ATTENTION_IMPLS,
               f"attention_impl={self.attention_impl!r} not in {ATTENTION_IMPLS}")
        _check(self.architecture in SUPPORTED_ARCHITECTURES,
               f"architecture {self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if isinstance(self.eos_token_ids, (list, int)):
            ids = (self.eos_token_ids,) if isinstance(self.eos_token_ids, int) else self.eos_token_ids
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        H, N, K = self.head_dim, self.num_heads, self.num_kv_heads
        attn = D * H * (N + 2 * K) + N * H * D + (H * (N + 2 * K) if self.attention_bias else 0)
        per_layer = attn + 3 * D * F + 2 * D
        return L * per_layer + V * D * (1 if self.tie_word_embeddings else 2) + D

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf_config(cls, hf: dict | Any, **overrides) -> ModelConfig:
        """From a Hugging Face config (a dict, a ``PretrainedConfig`` or a path to config.json
        or its directory)."""
        if isinstance(hf, (str, os.PathLike)):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else str(hf)
            if not os.path.exists(path):
                raise ConfigError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        elif not isinstance(hf, dict):
            hf = hf.to_dict()
        hf = normalize_hf_config(hf)
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch or hf.get('model_type')!r} in config.json "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        eos = hf.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        n_heads = hf["num_attention_heads"]
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(hf.get("rope_scaling")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """The matching Hugging Face config dict (used to export and by the reference tests)."""
        d = {
            "architectures": [self.architecture],
            "model_type": {v: k for k, v in _MODEL_TYPES.items()}[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "hidden_act": "silu",
        }
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        rs = self.rope_scaling
        if rs.rope_type != "default":
            d["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor}
            if rs.rope_type == "llama3":
                d["rope_scaling"].update(
                    low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                )
        return d

    # ---------------------------------------------------------------- GGUF
    @classmethod
    def from_gguf_metadata(cls, meta: dict, **overrides) -> ModelConfig:
        """From GGUF key/value metadata (``general.architecture`` = llama or qwen2)."""
        arch = meta.get("general.architecture")
        archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        if arch not in archs:
            raise ConfigError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(archs)})")

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_heads = int(g("attention.head_count"))
        vocab = g("vocab_size")
        if vocab is None:
            vocab = len(meta.get("tokenizer.ggml.tokens", []))
        rope = RopeScaling()
        if g("rope.scaling.type") == "linear":
            rope = RopeScaling("linear", float(g("rope.scaling.factor", 1.0)))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        kw = dict(
            vocab_size=int(vocab),
            hidden_size=int(g("embedding_length")),
            intermediate_size=int(g("feed_forward_length")),
            num_layers=int(g("block_count")),
            num_heads=n_heads,
            num_kv_heads=int(g("attention.head_count_kv", n_heads)),
            head_dim=int(g("attention.key_length")) if g("attention.key_length") else None,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(g("context_length", 4096)),
            tie_word_embeddings=bool(meta.get("_tied_embeddings", False)),
            attention_bias=arch == "qwen2",
            architecture=archs[arch],
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)


def normalize_hf_config(hf: dict) -> dict:
    """Bring a ``config.json`` dict to the keys ``ModelConfig.from_hf_config`` reads.

    transformers >= 5 writes ``rope_parameters: {rope_theta, rope_type, ...}`` instead of the
    top-level ``rope_theta`` / ``rope_scaling``; without this the rope base would silently fall
    back to its default.
    """
    hf = dict(hf)
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and ("rope_type" in rp or "rope_theta" in rp):
        if hf.get("rope_theta") is None and "rope_theta" in rp:
            hf["rope_theta"] = rp["rope_theta"]
        if not hf.get("rope_scaling") and rp.get("rope_type", "default") != "default":
            hf["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return hf


def tiny_config(**overrides) -> ModelConfig:
    """A very small random-weight config for tests and notebooks."""
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_ids=(2,),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    """``num_heads`` heads (M), each ``num_layers`` ResBlocks then a vocab projection: the base
    model's LM head (``shared_lm_head``, the default) or the head's own ``[D, V]`` matrix.

    ``head_type``: ``"medusa"`` (head k sees only the hidden state h_t) or ``"hydra"`` (head k
    also sees the base model's input embeddings, width ``embed_size``, of the tokens t+1 .. t+k
    on its path, so the tree is drafted depth by depth; see :mod:`medusa_jax.model.heads`)."""

    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 576
    vocab_size: int = 49152
    shared_lm_head: bool = True
    param_dtype: str = "float32"
    # Draft vocabulary: the token ids the heads may propose (sorted, unique). The heads then
    # project onto these rows of the shared LM head only: on a CPU the heads' full-vocabulary
    # projection costs about as much as a whole base-model step. Verification still uses the
    # full vocabulary, so greedy output is unchanged; only proposals outside the set are lost.
    draft_ids: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    head_type: str = "medusa"
    embed_size: int | None = None  # hydra: width of the base input embeddings (None: hidden_size)

    def __post_init__(self):
        _check(self.head_type in HEAD_TYPES,
               f"medusa head_type={self.head_type!r} is not one of {', '.join(HEAD_TYPES)}")
        if self.head_type == "hydra" and self.embed_size is None:
            object.__setattr__(self, "embed_size", self.hidden_size)
        if self.head_type == "medusa":
            _check(self.embed_size is None, "medusa embed_size is for head_type='hydra' only")
        else:
            _check(isinstance(self.embed_size, int) and self.embed_size > 0,
                   f"medusa embed_size must be an integer > 0, got {self.embed_size!r}")
            _check(self.shared_lm_head, "hydra heads need shared_lm_head=True (they project "
                   "through the base model's LM head)")
        if self.draft_ids is not None:
            ids = tuple(int(i) for i in self.draft_ids)
            object.__setattr__(self, "draft_ids", ids)
            _check(len(ids) >= 1, "medusa draft_ids is empty: give at least one token id or None")
            _check(list(ids) == sorted(set(ids)), "medusa draft_ids must be sorted and unique")
            _check(0 <= ids[0] and ids[-1] < self.vocab_size,
                   f"medusa draft_ids must lie in [0, {self.vocab_size}), got {ids[0]}..{ids[-1]}")
            _check(self.shared_lm_head, "medusa draft_ids needs shared_lm_head=True (the draft "
                   "projection is a slice of the base model's LM head)")
        _check(isinstance(self.num_heads, int) and self.num_heads >= 1,
               f"medusa num_heads must be an integer >= 1, got {self.num_heads!r}")
        _check(isinstance(self.num_layers, int) and self.num_layers >= 0,
               f"medusa num_layers must be an integer >= 0, got {self.num_layers!r}")
        _check(self.hidden_size > 0 and self.vocab_size > 0,
               f"medusa hidden_size/vocab_size must be > 0, got {self.hidden_size}/{self.vocab_size}")
        _check(self.param_dtype in DTYPES, f"medusa param_dtype={self.param_dtype!r} not in {DTYPES}")

    @classmethod
    def for_model(cls, model: ModelConfig, **kw) -> MedusaConfig:
        return cls(hidden_size=model.hidden_size, vocab_size=model.vocab_size, **kw)

    def check_compatible(self, model: ModelConfig) -> None:
        """Refuse heads built for another model (hidden size, vocabulary, embedding width)."""
        _check(self.hidden_size == model.hidden_size,
               f"Medusa heads have hidden size {self.hidden_size} but the base model has "
               f"{model.hidden_size}: these heads were trained for another model")
        _check(self.vocab_size == model.vocab_size,
               f"Medusa heads have vocab size {self.vocab_size} but the base model has "
               f"{model.vocab_size}: these heads were trained for another model")
        # Llama-family input embeddings are hidden_size wide; hydra heads read them
        _check(self.embed_size is None or self.embed_size == model.hidden_size,
               f"Hydra heads read token embeddings of width {self.embed_size} but the base "
               f"model's are {model.hidden_size} wide: these heads were trained for another model")

    @property
    def is_hydra(self) -> bool:
        return self.head_type == "hydra"

    @property
    def draft_size(self) -> int:
        """How many tokens the heads can propose (the whole vocabulary without ``draft_ids``)."""
        return self.vocab_size if self.draft_ids is None else len(self.draft_ids)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["draft_ids"] = None if self.draft_ids is None else list(self.draft_ids)
        return d
