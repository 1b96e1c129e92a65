"""Hugging Face safetensors checkpoints <-> our parameter tree (numpy in, numpy out).

``load_hf_checkpoint`` reads a checkpoint directory (``config.json`` plus ``model.safetensors`` or
the shards listed in ``model.safetensors.index.json``) one tensor at a time into preallocated
stacked arrays, so peak host memory is about the size of the converted weights plus one tensor.
``save_hf_checkpoint`` writes the inverse (``config.json`` + ``model.safetensors``) so that
``transformers.AutoModelForCausalLM.from_pretrained`` can read it.

The name/shape mapping between the HF layout (``[out, in]`` matrices, heads flattened) and ours
(``[in, ..., out]``, heads split, layers stacked on axis 0) lives in ``param_specs`` and is shared
with the GGUF loader, which first brings GGUF tensors into the HF layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Protocol

import ml_dtypes
import numpy as np

from medusa_jax.config import ModelConfig, normalize_hf_config
from medusa_jax.model.llama import convert_layout
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import (
    SafetensorsFile,
    check_finite,
    listing,
    np_dtype,
    read_json,
    write_json,
    write_safetensors,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_BAND = 256  # rows per block of a transposing copy (cache-friendly; see ParamSpec.fill)


def config_kwargs(dtype: str, scan_layers: bool, overrides: dict) -> dict:
    """The ModelConfig keyword overrides every loader applies: the loaded arrays' dtype becomes
    ``param_dtype`` (so the config always describes the arrays it came with)."""
    if "param_dtype" in overrides:
        raise TypeError("pass the parameter dtype as dtype=..., not param_dtype=...")
    np_dtype(dtype)
    return {"param_dtype": dtype, "scan_layers": scan_layers, **overrides}


# --------------------------------------------------------------------------- layout mapping
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: where it lives in our tree, its HF name and shape, and how to convert.

    ``hf_name`` is relative to the decoder (``embed_tokens.weight``, ``layers.{l}.mlp...``) except
    ``lm_head.weight``. With ``transpose`` the HF matrix is transposed and then reshaped to
    ``shape`` (e.g. ``q_proj.weight [N*H, D] -> [D, N*H] -> [D, N, H]``); otherwise only reshaped.
    For per-layer specs ``shape`` is one layer's shape and ``hf_name`` has a ``{l}`` field.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        """HF-layout array -> our layout (a view where numpy can make one)."""
        return (w.T if self.transpose else w).reshape(self.shape)

    def fill(self, dst: np.ndarray, w: np.ndarray) -> None:
        """Write HF-layout ``w`` into the contiguous our-layout slot ``dst`` (casting).

        A transposing copy is done in bands of rows: a plain ``dst[...] = w.T`` walks one of
        the two arrays with a large stride and is several times slower on 7B-sized matrices.
        """
        if not self.transpose:
            dst[...] = w.reshape(self.shape)
            return
        flat = dst.reshape(self.hf_shape[::-1])  # a view: dst is contiguous
        for j in range(0, w.shape[0], _BAND):
            flat[:, j : j + _BAND] = w[j : j + _BAND].T

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        """Our layout -> HF layout (the inverse of ``to_ours``)."""
        if self.transpose:
            return a.reshape(self.hf_shape[::-1]).T
        return a.reshape(self.hf_shape)


def param_specs(cfg: ModelConfig) -> tuple[list[ParamSpec], list[ParamSpec]]:
    """``(top-level specs, per-layer specs)`` for ``cfg`` (per-layer paths are under ``layers``)."""
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    F, V = cfg.intermediate_size, cfg.vocab_size
    top = [
        ParamSpec(("embed", "embedding"), "embed_tokens.weight", (V, D), (V, D), False),
        ParamSpec(("final_norm", "scale"), "norm.weight", (D,), (D,), False),
    ]
    if not cfg.tie_word_embeddings:
        top.append(ParamSpec(("lm_head",), "lm_head.weight", (V, D), (D, V), True))
    a, m = "layers.{l}.self_attn.", "layers.{l}.mlp."
    layer = [
        ParamSpec(("attn", "q_proj"), a + "q_proj.weight", (N * H, D), (D, N, H), True),
        ParamSpec(("attn", "k_proj"), a + "k_proj.weight", (K * H, D), (D, K, H), True),
        ParamSpec(("attn", "v_proj"), a + "v_proj.weight", (K * H, D), (D, K, H), True),
        ParamSpec(("attn", "o_proj"), a + "o_proj.weight", (D, N * H), (N, H, D), True),
        ParamSpec(("attn_norm", "scale"), "layers.{l}.input_layernorm.weight", (D,), (D,), False),
        ParamSpec(("mlp_norm", "scale"), "layers.{l}.post_attention_layernorm.weight", (D,), (D,),
                  False),
        ParamSpec(("mlp", "gate_proj"), m + "gate_proj.weight", (F, D), (D, F), True),
        ParamSpec(("mlp", "up_proj"), m + "up_proj.weight", (F, D), (D, F), True),
        ParamSpec(("mlp", "down_proj"), m + "down_proj.weight", (D, F), (F, D), True),
    ]
    if cfg.attention_bias:
        layer += [
            ParamSpec(("attn", "q_bias"), a + "q_proj.bias", (N * H,), (N, H), False),
            ParamSpec(("attn", "k_bias"), a + "k_proj.bias", (K * H,), (K, H), False),
            ParamSpec(("attn", "v_bias"), a + "v_proj.bias", (K * H,), (K, H), False),
        ]
    if cfg.mlp_bias:
        layer += [
            ParamSpec(("mlp", "gate_bias"), m + "gate_proj.bias", (F,), (F,), False),
            ParamSpec(("mlp", "up_bias"), m + "up_proj.bias", (F,), (F,), False),
            ParamSpec(("mlp", "down_bias"), m + "down_proj.bias", (D,), (D,), False),
        ]
    return top, layer


class TensorSource(Protocol):
    """What ``assemble_params`` reads from: HF-layout arrays by HF-relative name."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray:
        """The HF-layout array; raises CheckpointError naming the key if absent."""
        ...

    def describe(self, name: str) -> str:
        """Where ``name`` lives, for error messages (real key and file)."""
        ...


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _checked(src: TensorSource, spec: ParamSpec, name: str) -> np.ndarray:
    w = src.get(name)
    if tuple(w.shape) != spec.hf_shape:
        raise CheckpointError(
            f"shape mismatch for {src.describe(name)}: expected {spec.hf_shape} (from the "
            f"config), found {tuple(w.shape)}"
        )
    check_finite(w, src.describe(name))
    return w


def assemble_params(cfg: ModelConfig, src: TensorSource, dtype: np.dtype) -> dict:
    """Read every base-model tensor from ``src`` into the stacked (``scan_layers``) param tree.

    Each stacked leaf ``[L, ...]`` is allocated once in ``dtype`` and filled layer by layer, so
    only one source tensor is in flight at a time.
    """
    top, per_layer = param_specs(cfg)
    params: dict = {}
    for spec in top:
        out = np.empty(spec.shape, dtype)
        spec.fill(out, _checked(src, spec, spec.hf_name))
        _set(params, spec.path, out)
    layers: dict = {}
    for spec in per_layer:
        out = np.empty((cfg.num_layers, *spec.shape), dtype)
        for i in range(cfg.num_layers):
            spec.fill(out[i], _checked(src, spec, spec.hf_name.format(l=i)))
        _set(layers, spec.path, out)
    params["layers"] = layers
    for i in range(cfg.num_layers):
        # HF Llama's attention_bias also adds an o_proj bias, which our model does not have:
        # accept it only when it is all zeros rather than silently dropping it.
        name = f"layers.{i}.self_attn.o_proj.bias"
        if src.has(name) and np.any(np.asarray(src.get(name)) != 0):
            raise CheckpointError(
                f"{src.describe(name)} is nonzero, but the model has no attention output bias "
                "(only a zero o_proj bias can be loaded)"
            )
    return params


# --------------------------------------------------------------------------- checkpoint dir
class HFCheckpoint:
    """A Hugging Face checkpoint directory opened for reading.

    ``load_base`` returns the base model; every tensor it did not use stays reachable through
    ``keys()``/``read()`` and is listed by ``unused_keys`` (e.g. the ``medusa_head.*`` tensors of
    a Medusa-2 full checkpoint, for the Medusa head loader).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.exists(self.path):
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        if not os.path.isdir(self.path):
            raise CheckpointError(
                f"{self.path} is not a directory (expected a Hugging Face checkpoint directory "
                "with config.json and *.safetensors, or a .gguf file)"
            )
        cfg_path = os.path.join(self.path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no {CONFIG_NAME} in {self.path} (found: {listing(self.path)})")
        self.hf_config: dict = normalize_hf_config(read_json(cfg_path))
        self.files = [SafetensorsFile(p) for p in self._weight_files()]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where.setdefault(k, f)
        self._used: set[str] | None = None

    def _weight_files(self) -> list[str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"cannot parse the shard index {index}: {e!r}") from e
            missing = [n for n in names if not os.path.isfile(os.path.join(self.path, n))]
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
            return [os.path.join(self.path, n) for n in names]
        single = os.path.join(self.path, WEIGHTS_NAME)
        if os.path.isfile(single):
            return [single]
        # Unusual names (e.g. one file exported by another tool): read them all.
        others = sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors"))
        if others:
            return [os.path.join(self.path, n) for n in others]
        msg = f"no *.safetensors weights in {self.path} (found: {listing(self.path)})"
        if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(self.path)):
            msg += (
                "; PyTorch pickle checkpoints (.bin/.pt) are not supported. Convert once with: "
                "python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained("
                f"'{self.path}').save_pretrained('{self.path}', safe_serialization=True)\""
            )
        raise CheckpointError(msg)

    # -- raw access
    def keys(self) -> list[str]:
        """Every tensor key in the checkpoint (all shards)."""
        return list(self._where)

    def has(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a read-only zero-copy view in its stored dtype (HF layout)."""
        return self._file(key).get(key)

    def _file(self, key: str) -> SafetensorsFile:
        f = self._where.get(key)
        if f is None:
            where = (f"any shard listed in {os.path.join(self.path, INDEX_NAME)}"
                     if len(self.files) > 1 else self.files[0].path)
            raise CheckpointError(f"missing tensor {key!r}: not in {where}")
        return f

    def describe(self, key: str) -> str:
        f = self._where.get(key)
        return f"tensor {key!r} in {f.path if f else self.path}"

    # -- the base model
    def model_config(self, **overrides) -> ModelConfig:
        """``ModelConfig.from_hf_config`` of this checkpoint's config.json (ConfigError for an
        unsupported architecture)."""
        return ModelConfig.from_hf_config(self.hf_config, **overrides)

    def _prefixes(self) -> tuple[str, str]:
        """``(decoder prefix, outer prefix)``: ``("model.", "")`` for ``*ForCausalLM`` keys;
        others for checkpoints saved from a bare decoder or a wrapper."""
        cands = sorted((k for k in self._where if k.endswith("embed_tokens.weight")), key=len)
        if not cands:
            return "model.", ""
        model_prefix = cands[0][: -len("embed_tokens.weight")]
        outer = model_prefix[: -len("model.")] if model_prefix.endswith("model.") else model_prefix
        return model_prefix, outer

    def load_base(self, dtype: str = "float32", scan_layers: bool = True,
                  **overrides) -> tuple[ModelConfig, dict]:
        """``(cfg, params)`` of the base model as numpy arrays of ``dtype``, in the layout
        ``scan_layers`` selects. ``overrides`` go to ``ModelConfig.from_hf_config``."""
        cfg = self.model_config(**config_kwargs(dtype, scan_layers, overrides))
        src = _HFSource(self, *self._prefixes())
        params = assemble_params(cfg, src, np_dtype(dtype))
        used = set(src.used)
        lm_head = src.key("lm_head.weight")
        if cfg.tie_word_embeddings and lm_head in self._where:
            used.add(lm_head)  # a redundant copy of the tied embedding
        self._used = used
        return cfg, convert_layout(params, cfg)

    @property
    def unused_keys(self) -> list[str]:
        """Keys ``load_base`` did not consume (all keys before it ran), minus known-redundant
        buffers such as ``rotary_emb.inv_freq``."""
        used = self._used or set()
        return sorted(k for k in self._where
                      if k not in used and not k.endswith(_IGNORED_SUFFIXES))


class _HFSource:
    """``TensorSource`` over an ``HFCheckpoint``; records which keys were read."""

    def __init__(self, ckpt: HFCheckpoint, model_prefix: str, outer_prefix: str):
        self.ckpt, self.model_prefix, self.outer_prefix = ckpt, model_prefix, outer_prefix
        self.used: list[str] = []

    def key(self, name: str) -> str:
        if name == "lm_head.weight":
            return self.outer_prefix + name
        return self.model_prefix + name

    def has(self, name: str) -> bool:
        return self.ckpt.has(self.key(name))

    def get(self, name: str) -> np.ndarray:
        key = self.key(name)
        w = self.ckpt.read(key)
        self.used.append(key)
        return w

    def describe(self, name: str) -> str:
        return self.ckpt.describe(self.key(name))


def load_hf_checkpoint(path: str | os.PathLike, dtype: str = "float32", scan_layers: bool = True,
                       **cfg_overrides) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face checkpoint directory as ``(ModelConfig, numpy params)``.

    ``dtype`` is the dtype of the returned arrays (and ``cfg.param_dtype``); ``scan_layers``
    picks the stacked ``layers`` tree (``[L, ...]`` leaves) or unrolled ``layers_{i}``. Raises
    CheckpointError for a missing/invalid directory or weights and ConfigError for an unsupported
    architecture. Use ``HFCheckpoint`` directly to reach tensors the base model does not use.
    """
    return HFCheckpoint(path).load_base(dtype, scan_layers, **cfg_overrides)


def save_hf_checkpoint(cfg: ModelConfig, params: dict, path: str | os.PathLike,
                       dtype: str | None = None, tokenizer=None) -> None:
    """Write ``params`` (either layer layout; numpy or JAX arrays) as a Hugging Face checkpoint:
    ``config.json``, ``generation_config.json`` and a single ``model.safetensors``, readable by
    ``transformers``; with ``tokenizer`` (a transformers tokenizer or the byte-level stand-in)
    also its files and chat template, so the directory is complete (``AutoTokenizer``,
    ``decode.py --model DIR``).

    ``dtype`` casts on the way out; by default each tensor keeps its dtype. Extra top-level
    entries of ``params`` (e.g. Medusa heads) are not written.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, INDEX_NAME)):
        # transformers would read the stale shards listed there instead of our file.
        raise CheckpointError(f"{path} already holds a sharded checkpoint ({INDEX_NAME}); "
                              "save into an empty directory")
    out_dt = np_dtype(dtype) if dtype is not None else None
    top, per_layer = param_specs(cfg)
    stacked = "layers" in params

    def leaf(spec: ParamSpec, layer: int | None):
        if layer is None:
            return _get(params, spec.path)
        if stacked:
            return _get(params["layers"], spec.path)  # sliced lazily, in make()
        return _get(params[f"layers_{layer}"], spec.path)

    def entry(key: str, spec: ParamSpec, layer: int | None):
        a = leaf(spec, layer)
        dt = out_dt if out_dt is not None else np.dtype(a.dtype)

        def make():
            x = np.asarray(a[layer] if stacked and layer is not None else a)
            return spec.to_hf(x).astype(dt, copy=False)

        return key, spec.hf_shape, dt, make

    entries = [entry(s.hf_name if s.hf_name == "lm_head.weight" else "model." + s.hf_name, s, None)
               for s in top]
    for i in range(cfg.num_layers):
        entries += [entry("model." + s.hf_name.format(l=i), s, i) for s in per_layer]
    write_safetensors(os.path.join(path, WEIGHTS_NAME), entries)

    hf = cfg.to_hf_config()
    first = entries[0][2]
    hf["torch_dtype"] = "bfloat16" if first == np.dtype(ml_dtypes.bfloat16) else first.name
    if cfg.pad_token_id is not None:
        hf["pad_token_id"] = cfg.pad_token_id
    write_json(os.path.join(path, CONFIG_NAME), hf)
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    write_json(os.path.join(path, "generation_config.json"), {**gen, "do_sample": False})
    if tokenizer is not None:
        from medusa_jax.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, path)
