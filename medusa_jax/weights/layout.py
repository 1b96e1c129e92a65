"""The Hugging Face layout <-> our parameter tree: which tensor goes where, and how it is reshaped.

HF checkpoints hold ``[out, in]`` matrices with attention heads flattened; ours are
``[in, ..., out]`` with heads split and layers stacked on axis 0. :func:`param_specs` lists
that mapping for a config and :func:`assemble_params` fills our tree from any
:class:`TensorSource` that hands out HF-layout arrays by name: the safetensors loader
(:mod:`.hf`) and the GGUF loader (:mod:`.gguf`, which first brings GGUF tensors into the HF
layout) both build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from medusa_jax.config import ModelConfig
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import check_finite, np_dtype

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
