"""Saving and loading Medusa heads: our own format and the original Medusa checkpoint layouts.

Our format is a directory with ``medusa_config.json`` (``MedusaConfig.to_dict()``, ``"format":
"medusa_jax"`` and free-form ``metadata``) and ``heads.safetensors`` holding our parameter names
and layout (``res_kernel [M, N, D, D]`` input -> output, ``res_bias [M, N, D]``, optional
``lm_head [M, D, V]``; Hydra heads, ``head_type: "hydra"`` in the config, add ``in_hidden
[M, D, D]``, ``in_embed [M, M, E, D]`` and ``in_bias [M, D]``). A config without ``head_type``
(files written before it existed) loads as Medusa heads.

The original layouts (Medusa-1 "v1", "version 2", and Medusa-2 full models whose safetensors
hold the heads under ``medusa_head.``) are read by :mod:`.medusa_original`; :func:`export_v1`
writes the first two.

``load_heads`` tells these apart by the files it finds; every loader returns
``(MedusaConfig, params)`` with numpy arrays (placing them on devices is the caller's job).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import numpy as np

from medusa_jax.config import ConfigError, MedusaConfig, ModelConfig
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import (
    SafetensorsFile,
    cast_arrays,
    check_finite,
    listing,
    np_dtype,
    read_json,
    to_numpy,
    write_json,
    write_safetensors,
)
from medusa_jax.weights.hf import HFCheckpoint
from medusa_jax.weights.medusa_original import (
    HF_PREFIX,
    V1_CONFIG,
    V1_PT,
    V1_SAFETENSORS,
    load_heads_from_state_dict,
    load_v1_heads,
)

__all__ = [
    "CheckpointError",
    "detect_format",
    "export_v1",
    "load_heads",
    "load_heads_from_state_dict",
    "read_heads_metadata",
    "save_heads",
]

FORMAT_NAME = "medusa_jax"
FORMAT_VERSION = 1
OURS_CONFIG = "medusa_config.json"
OURS_WEIGHTS = "heads.safetensors"


# --------------------------------------------------------------------------- helpers
def _json_default(x):
    """Make training metadata (numpy scalars, arrays, paths, ...) JSON-serialisable."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return str(x)


def _unbox(params) -> dict:
    """Plain ``{name: array}`` from what training code holds: a ``{"params": ...}`` wrapper,
    flax ``Partitioned`` boxes (``MedusaHeads.init`` makes them) or sharded jax arrays."""
    if isinstance(params, Mapping) and "params" in params and "res_kernel" not in params:
        params = params["params"]
    out = {}
    for k, v in params.items():
        v = getattr(v, "value", v)  # flax.linen.Partitioned and other meta boxes
        out[k] = to_numpy(v)
    return out


def _expected_shapes(mcfg: MedusaConfig) -> dict[str, tuple[int, ...]]:
    M, N, D, V = mcfg.num_heads, mcfg.num_layers, mcfg.hidden_size, mcfg.vocab_size
    shapes = {"res_kernel": (M, N, D, D), "res_bias": (M, N, D)}
    if mcfg.is_hydra:
        shapes.update(in_hidden=(M, D, D), in_embed=(M, M, mcfg.embed_size, D), in_bias=(M, D))
    if not mcfg.shared_lm_head:
        shapes["lm_head"] = (M, D, V)
    return shapes


def _check_params(mcfg: MedusaConfig, params: dict) -> None:
    """ValueError naming the parameter when ``params`` does not match ``mcfg``."""
    for name, shape in _expected_shapes(mcfg).items():
        if name not in params:
            raise CheckpointError(
                f"Medusa params lack {name!r} (have {sorted(params)}); expected shape {shape} "
                f"for {mcfg}"
            )
        if tuple(params[name].shape) != shape:
            raise CheckpointError(
                f"Medusa param {name!r} has shape {tuple(params[name].shape)}, but the config "
                f"needs {shape} (num_heads, num_layers, hidden_size, vocab_size = "
                f"{mcfg.num_heads}, {mcfg.num_layers}, {mcfg.hidden_size}, {mcfg.vocab_size})"
            )
    if mcfg.shared_lm_head and "lm_head" in params:
        raise CheckpointError("the config has shared_lm_head=True but the params hold an 'lm_head'")


# --------------------------------------------------------------------------- our format
def save_heads(path: str | os.PathLike, mcfg: MedusaConfig, medusa_params,
               metadata: dict | None = None) -> str:
    """Save heads in our format: ``path/medusa_config.json`` + ``path/heads.safetensors``.

    ``medusa_params`` is the head param dict (``res_kernel [M, N, D, D]``, ``res_bias [M, N, D]``,
    ``lm_head [M, D, V]`` unless shared; flax boxes and jax arrays are fine). Arrays are stored in
    ``mcfg.param_dtype`` (bfloat16 included). ``metadata`` (e.g. training step, loss, base model
    name) must be JSON-friendly; numpy scalars are converted. Returns the directory path.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    params = _unbox(medusa_params)
    _check_params(mcfg, params)
    dt = np_dtype(mcfg.param_dtype)
    os.makedirs(path, exist_ok=True)
    tensors = {k: np.ascontiguousarray(params[k], dtype=dt) for k in _expected_shapes(mcfg)}
    # Weights first, config last: a directory with a config always has its weights.
    write_safetensors(os.path.join(path, OURS_WEIGHTS), tensors, metadata={"format": FORMAT_NAME})
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **mcfg.to_dict(),
           "metadata": dict(metadata or {})}
    write_json(os.path.join(path, OURS_CONFIG), cfg, default=_json_default)
    return path


def read_heads_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict ``save_heads`` stored (``{}`` when there was none)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    cfg_path = os.path.join(path, OURS_CONFIG) if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no {OURS_CONFIG} at {path}")
    return dict(read_json(cfg_path).get("metadata") or {})


def _load_ours(path: str, dtype: str | None) -> tuple[MedusaConfig, dict]:
    cfg_path = os.path.join(path, OURS_CONFIG)
    d = read_json(cfg_path)
    if d.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CheckpointError(f"{cfg_path}: format is {d.get('format')!r}, not {FORMAT_NAME!r}")
    fields = {f.name for f in dataclasses.fields(MedusaConfig)}
    try:
        mcfg = MedusaConfig(**{k: v for k, v in d.items() if k in fields})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid Medusa config in {cfg_path}: {e}") from e
    w_path = os.path.join(path, OURS_WEIGHTS)
    if not os.path.isfile(w_path):
        raise CheckpointError(f"{cfg_path} exists but {OURS_WEIGHTS} is missing from {path} "
                              f"(found: {listing(path)})")
    f = SafetensorsFile(w_path)
    expected = _expected_shapes(mcfg)
    params = {}
    for name, shape in expected.items():
        if name not in f:
            raise CheckpointError(f"missing tensor {name!r} in {w_path} (needed by {cfg_path}: "
                                  f"shared_lm_head={mcfg.shared_lm_head})")
        if f.shape(name) != shape:
            raise CheckpointError(f"shape mismatch for tensor {name!r} in {w_path}: expected "
                                  f"{shape} (from {cfg_path}), found {f.shape(name)}")
        params[name] = f.get(name)
    extra = sorted(set(f.keys()) - set(expected))
    if extra:
        warnings.warn(f"{w_path}: ignoring tensors not in the Medusa config: {extra}", stacklevel=2)
    params, pdt = cast_arrays(params, dtype)
    f.close()
    return dataclasses.replace(mcfg, param_dtype=pdt), params


# --------------------------------------------------------------------------- Medusa-2 full models
def _load_hf(path: str, base_vocab: int | None, dtype: str | None) -> tuple[MedusaConfig, dict]:
    ckpt = HFCheckpoint(path)
    prefix = _hf_prefix(ckpt.keys())
    if prefix is None:
        raise CheckpointError(
            f"{path} is a Hugging Face checkpoint without Medusa heads: none of its tensors is "
            f"named '{HF_PREFIX}...' (and there is no {OURS_CONFIG}, {V1_SAFETENSORS} or {V1_PT})"
        )
    # Views into the memory-mapped shards: only the head tensors are read.
    tensors = {k: ckpt.read(k) for k in ckpt.keys() if k.startswith(prefix)}
    # The full model's config states the base model's hidden size and vocab, which the heads
    # share.
    return load_heads_from_state_dict(tensors, prefix=prefix, hf_config=ckpt.hf_config,
                                      vocab_size=base_vocab, dtype=dtype,
                                      source=f"the safetensors of {path}")


def _hf_prefix(keys) -> str | None:
    """``"medusa_head."`` or, for wrapped models (e.g. PEFT's ``base_model.model.``), the
    shortest ``...medusa_head.`` prefix among the keys."""
    found = {k[: k.index(HF_PREFIX) + len(HF_PREFIX)] for k in keys if HF_PREFIX in k}
    return min(found, key=len) if found else None


# --------------------------------------------------------------------------- dispatch
def detect_format(path: str | os.PathLike) -> str:
    """Which layout the directory ``path`` holds: ``"medusa_jax"``, ``"v1"``, ``"v2"`` (the
    version 2 head file) or ``"hf"`` (a full model with ``medusa_head.*`` tensors).

    CheckpointError when the path is missing or holds no recognisable head files (the message
    lists what it found). Only file names and config.json are read (and, for "hf", the
    safetensors headers).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise CheckpointError(f"Medusa heads path {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a file; pass the directory that holds it ({OURS_CONFIG} + "
            f"{OURS_WEIGHTS}, or config.json + {V1_SAFETENSORS}/{V1_PT}, or a Hugging Face "
            "checkpoint with medusa_head.* tensors)"
        )
    if os.path.isfile(os.path.join(path, OURS_CONFIG)):
        return FORMAT_NAME
    cfg_path = os.path.join(path, V1_CONFIG)
    hf_config = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    if any(os.path.isfile(os.path.join(path, n)) for n in (V1_SAFETENSORS, V1_PT)):
        return "v2" if str(hf_config.get("version", "")) == "2" else "v1"
    has_st = any(n.endswith(".safetensors") for n in os.listdir(path))
    if hf_config and has_st:
        return "hf"
    hint = ""
    if "medusa_num_heads" in hf_config:
        hint = f"; {cfg_path} describes Medusa heads, but {V1_SAFETENSORS} / {V1_PT} is missing"
    raise CheckpointError(
        f"no Medusa head files in {path} (expected {OURS_CONFIG} + {OURS_WEIGHTS}, config.json + "
        f"{V1_SAFETENSORS} or {V1_PT}, or a Hugging Face checkpoint with '{HF_PREFIX}*' "
        f"tensors); found: {listing(path)}{hint}"
    )


def load_heads(path: str | os.PathLike, base_cfg: ModelConfig | None = None,
               dtype: str | None = None) -> tuple[MedusaConfig, dict]:
    """Load Medusa heads from any supported layout (see ``detect_format``).

    Returns ``(MedusaConfig, params)`` with numpy ``res_kernel [M, N, D, D]``, ``res_bias
    [M, N, D]`` and, unless the heads share the base LM head, ``lm_head [M, D, V]``. ``dtype``
    ("float32" | "bfloat16" | "float16") casts; ``param_dtype`` says which. None means the base
    model's compute dtype when ``base_cfg`` is given (heads run next to that model: float16 heads
    left as stored beside a float32 base were converted in every decode step, 0.95x instead of
    1.16x on the default model), else the stored dtype (float32 for other stored types). With
    ``base_cfg`` the heads are checked against the base model (ConfigError when the hidden size
    or vocabulary differs), and its vocab size fills in what the version 2 layout does not state.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if dtype is None and base_cfg is not None:
        dtype = base_cfg.dtype
    if dtype is not None:
        np_dtype(dtype)
    kind = detect_format(path)
    base_vocab = base_cfg.vocab_size if base_cfg is not None else None
    if kind == FORMAT_NAME:
        mcfg, params = _load_ours(path, dtype)
    elif kind in ("v1", "v2"):
        mcfg, params = load_v1_heads(path, base_vocab, dtype)
    else:
        mcfg, params = _load_hf(path, base_vocab, dtype)
    for name, w in params.items():
        check_finite(w, f"Medusa head tensor {name!r} loaded from {path}")
    if base_cfg is not None:
        mcfg.check_compatible(base_cfg)
    return mcfg, params


# --------------------------------------------------------------------------- export
def export_v1(path: str | os.PathLike, mcfg: MedusaConfig, params, base_lm_head=None,
              base_model_name_or_path: str = "", version2: bool = False) -> str:
    """Write heads in the original Medusa layout: ``config.json`` + ``medusa_lm_head.safetensors``.

    v1 (default) stores each head's own vocab projection ``{i}.{N}.weight [V, D]``; for
    shared-LM-head params that is a copy of ``base_lm_head: [D, V]`` (our base model's
    ``lm_head``, transposed on the way out). ``version2=True`` writes the version 2 layout
    instead (shared LM head, N == 1, no vocab projections). Arrays keep ``mcfg.param_dtype``.

    The original code builds a head's N ResBlocks as ONE shared module, so with N > 1 it can
    only reproduce heads whose ResBlocks are identical (a warning says when they are not).
    Returns the directory path.
    """
    if mcfg.is_hydra:
        raise CheckpointError("the original Medusa layout cannot hold Hydra heads (head_type='hydra': "
                              "each head also reads its path's token embeddings); save them with "
                              "save_heads instead")
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    p = _unbox(params)
    _check_params(mcfg, p)
    M, N, D, V = mcfg.num_heads, mcfg.num_layers, mcfg.hidden_size, mcfg.vocab_size
    dt = np_dtype(mcfg.param_dtype)
    if version2:
        if not mcfg.shared_lm_head:
            raise CheckpointError("version2=True needs heads that share the base LM head "
                                  "(shared_lm_head=True); these have their own lm_head: export v1")
        if N != 1:
            raise CheckpointError(f"the version 2 layout has exactly 1 ResBlock per head; these heads "
                                  f"have num_layers={N}")
        vocab = None
    elif mcfg.shared_lm_head:
        if base_lm_head is None:
            raise CheckpointError(
                "these heads share the base LM head, and the v1 layout stores each head's own "
                "vocab projection: pass base_lm_head=[D, V] (the base model's lm_head), or "
                "version2=True when num_layers == 1"
            )
        b = to_numpy(getattr(base_lm_head, "value", base_lm_head))
        if tuple(b.shape) != (D, V):
            raise CheckpointError(f"base_lm_head must have shape [D, V] = {(D, V)}, got "
                                  f"{tuple(b.shape)}" + (" (transpose it)" if b.shape == (V, D) else ""))
        vocab = [b] * M
    else:
        vocab = [p["lm_head"][i] for i in range(M)]
    if N > 1:
        same = all(np.array_equal(p["res_kernel"][i, 0], p["res_kernel"][i, j])
                   and np.array_equal(p["res_bias"][i, 0], p["res_bias"][i, j])
                   for i in range(M) for j in range(1, N))
        if not same:
            warnings.warn(
                f"exporting {N} different ResBlocks per head: the original Medusa code shares "
                "one ResBlock module across a head's layers, so it will not reproduce these "
                "heads (loaders that keep the layers apart, like ours, will)",
                stacklevel=2,
            )

    def lazy(a):
        # Transposed copies are made one tensor at a time, while writing.
        return lambda: np.ascontiguousarray(a.T if a.ndim == 2 else a, dtype=dt)

    entries = []
    for i in range(M):
        for j in range(N):
            entries.append((f"{i}.{j}.linear.weight", (D, D), dt, lazy(p["res_kernel"][i, j])))
            entries.append((f"{i}.{j}.linear.bias", (D,), dt, lazy(p["res_bias"][i, j])))
        if vocab is not None:
            entries.append((f"{i}.{N}.weight", (V, D), dt, lazy(vocab[i])))
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, V1_SAFETENSORS), entries)
    cfg = {
        "medusa_num_heads": M,
        "medusa_num_layers": N,
        "base_model_name_or_path": base_model_name_or_path,
        "hidden_size": D,
        "vocab_size": V,
    }
    if version2:
        cfg["version"] = "2"
    write_json(os.path.join(path, V1_CONFIG), cfg)
    return path
