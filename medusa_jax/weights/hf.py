"""Hugging Face safetensors checkpoints <-> our parameter tree (numpy in, numpy out).

``load_hf_checkpoint`` reads a checkpoint directory (``config.json`` plus ``model.safetensors`` or
the shards listed in ``model.safetensors.index.json``) one tensor at a time into preallocated
stacked arrays, so peak host memory is about the size of the converted weights plus one tensor.
``save_hf_checkpoint`` writes the inverse (``config.json`` + ``model.safetensors``) so that
``transformers.AutoModelForCausalLM.from_pretrained`` can read it.

The name/shape mapping between the HF layout and ours lives in :mod:`.layout`, shared with the
GGUF loader.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from medusa_jax.config import ModelConfig, normalize_hf_config
from medusa_jax.model.llama import convert_layout
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import (
    SafetensorsFile,
    listing,
    np_dtype,
    read_json,
    write_json,
    write_safetensors,
)
from medusa_jax.weights.layout import ParamSpec, assemble_params, config_kwargs, param_specs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Keys every HF Llama checkpoint may carry that hold nothing we need (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


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
