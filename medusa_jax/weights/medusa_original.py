"""The original Medusa checkpoint layouts -> our head params.

The original code stores PyTorch ``Linear`` weights (``[out, in]``, ``y = x W^T + b``):

* Medusa-1 "v1": ``config.json`` + ``medusa_lm_head.safetensors`` (or ``.pt``) with keys
  ``{i}.{j}.linear.weight [D, D]``, ``{i}.{j}.linear.bias [D]`` (ResBlock j of head i) and
  ``{i}.{N}.weight [V, D]`` (the head's own vocab projection).
* "version 2" (``"version": "2"``): only ``{i}.0.linear.*``; the heads share the base LM head.
* Medusa-2 full models: a Hugging Face checkpoint whose safetensors also hold the v1 keys under
  ``medusa_head.``.

:func:`load_heads_from_state_dict` reads any of them from a mapping of tensors (numpy, JAX or
torch); :func:`load_v1_heads` from a v1 / version 2 directory. Telling the layouts apart and
writing them is :mod:`.medusa_io`'s job.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from medusa_jax.config import MedusaConfig
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import (
    SafetensorsFile,
    cast_arrays,
    common_dtype,
    read_json,
    to_numpy,
)

V1_CONFIG = "config.json"
V1_SAFETENSORS = "medusa_lm_head.safetensors"
V1_PT = "medusa_lm_head.pt"
HF_PREFIX = "medusa_head."

_LINEAR_RE = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_VOCAB_RE = re.compile(r"^(\d+)\.(\d+)\.weight$")


def load_heads_from_state_dict(
    tensors: Mapping[str, Any],
    prefix: str = HF_PREFIX,
    *,
    hf_config: dict | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    source: str = "the state dict",
) -> tuple[MedusaConfig, dict]:
    """Heads from original-layout tensors: ``{prefix}{i}.{j}.linear.weight [D, D]`` / ``.bias [D]``
    and, unless the heads share the base LM head, ``{prefix}{i}.{N}.weight [V, D]``.

    Used for Medusa-2 full-model state dicts (``prefix="medusa_head."``) and for v1 / version-2
    head files (``prefix=""``). Values may be numpy, JAX or torch arrays; keys without ``prefix``
    are ignored. M and N come from the keys (``hf_config``'s ``medusa_num_heads`` /
    ``medusa_num_layers`` only trigger a warning when they disagree). ``vocab_size`` is needed only
    for shared-LM-head heads when ``hf_config`` has no ``vocab_size``. ``dtype`` None keeps the
    stored dtype. Returns ``(MedusaConfig, params)``.
    """
    hf_config = dict(hf_config or {})
    lin: dict[tuple[int, int, str], str] = {}  # (head, layer, weight|bias) -> key
    vocab: dict[int, tuple[int, str]] = {}  # head -> (index, key)
    unknown = []
    for key in tensors:
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix):]
        if m := _LINEAR_RE.match(rel):
            lin[(int(m[1]), int(m[2]), m[3])] = key
        elif m := _VOCAB_RE.match(rel):
            vocab[int(m[1])] = (int(m[2]), key)
        else:
            unknown.append(key)
    if not lin and not vocab:
        some = [k for k in tensors][:10]
        raise CheckpointError(
            f"no Medusa head tensors (keys like {prefix + '0.0.linear.weight'!r}) in {source}; "
            f"found keys: {some}{' ...' if len(tensors) > 10 else ''}"
        )
    if unknown:
        warnings.warn(f"{source}: ignoring unrecognised Medusa head tensors {unknown[:10]}",
                      stacklevel=2)
    heads = {i for i, _, _ in lin} | set(vocab)
    M = max(heads) + 1
    N = max((j for _, j, _ in lin), default=-1) + 1
    shared = not vocab

    # The config's counts are advisory: released checkpoints sometimes disagree with their keys.
    for field, n, what in (("medusa_num_heads", M, "heads"), ("medusa_num_layers", N, "layers")):
        stated = hf_config.get(field)
        if stated is not None and int(stated) != n:
            warnings.warn(
                f"{source}: config.json says {field}={stated}, but the stored tensors hold {n} "
                f"{what}; using {n} (from the tensors)",
                stacklevel=2,
            )
    version2 = str(hf_config.get("version", "")) == "2"
    if version2 and not shared:
        warnings.warn(f"{source}: config.json says version 2 (heads share the base LM head), but "
                      f"the tensors hold each head's own vocab projection; using them",
                      stacklevel=2)
    if shared and N != 1:
        raise CheckpointError(
            f"{source}: heads without their own vocab projection ({prefix}{{i}}.{{N}}.weight) "
            f"are the 'version 2' layout, which has exactly 1 ResBlock per head; found {N}"
        )

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise CheckpointError(f"missing tensor {key!r} in {source}")
        a = to_numpy(tensors[key])
        if tuple(a.shape) != shape:
            raise CheckpointError(
                f"shape mismatch for tensor {key!r} in {source}: expected {shape}, found "
                f"{tuple(a.shape)}"
            )
        return a

    # D from the first tensor present (then every other shape is checked against it).
    if lin:
        D = int(to_numpy(tensors[lin[min(lin)]]).shape[0])
    else:
        D = int(to_numpy(tensors[vocab[min(vocab)][1]]).shape[-1])
    if hf_config.get("hidden_size") not in (None, D):
        raise CheckpointError(f"{source}: config.json has hidden_size={hf_config['hidden_size']} "
                              f"but the head tensors have hidden size {D}")

    V = None
    if not shared:
        for i in range(M):
            if i not in vocab:
                raise CheckpointError(f"missing tensor {prefix}{i}.{N}.weight (head {i}'s vocab "
                                      f"projection) in {source}")
            j, key = vocab[i]
            if j != N:
                raise CheckpointError(
                    f"inconsistent head layout in {source}: {key!r} is a vocab projection at "
                    f"position {j}, but the heads have {N} ResBlocks (expected "
                    f"{prefix}{i}.{N}.weight)"
                )
        V = int(to_numpy(tensors[vocab[0][1]]).shape[0])
        if hf_config.get("vocab_size") not in (None, V):
            raise CheckpointError(f"{source}: config.json has vocab_size={hf_config['vocab_size']}"
                                  f" but the heads' vocab projections have {V} rows")
    else:
        V = hf_config.get("vocab_size") or vocab_size
        if not V:
            raise CheckpointError(
                f"{source}: the heads share the base model's LM head and no vocab size is "
                "stated; pass the base model's config (load_heads(path, base_cfg=...)) or "
                "vocab_size=..."
            )

    params: dict[str, np.ndarray] = {}
    kernel = np.empty((M, N, D, D), np.float32)
    bias = np.empty((M, N, D), np.float32)
    stored = []
    for i in range(M):
        for j in range(N):
            # torch Linear stores [out, in]; ours is [in, out].
            w = get(lin.get((i, j, "weight"), f"{prefix}{i}.{j}.linear.weight"), (D, D))
            b = get(lin.get((i, j, "bias"), f"{prefix}{i}.{j}.linear.bias"), (D,))
            kernel[i, j], bias[i, j] = w.T, b
            stored += [w.dtype, b.dtype]
    params["res_kernel"], params["res_bias"] = kernel, bias
    if not shared:
        lm = np.empty((M, D, V), np.float32)
        for i in range(M):
            w = get(vocab[i][1], (V, D))
            lm[i] = w.T
            stored.append(w.dtype)
        params["lm_head"] = lm
    params, pdt = cast_arrays(params, dtype or common_dtype(stored))
    mcfg = MedusaConfig(num_heads=M, num_layers=N, hidden_size=D, vocab_size=int(V),
                        shared_lm_head=shared, param_dtype=pdt)
    return mcfg, params


def _import_torch(what: str):
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{what} is a PyTorch pickle (.pt): reading it needs torch (pip install torch), "
            f"or convert it once to {V1_SAFETENSORS} on a machine that has torch"
        ) from e
    return torch


def _read_pt(path: str) -> dict:
    torch = _import_torch(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (EOFError, RuntimeError, UnpicklingError)
        raise CheckpointError(f"cannot read PyTorch checkpoint {path} (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of tensor names)")
    return dict(sd)


def load_v1_heads(path: str, base_vocab: int | None, dtype: str | None) -> tuple[MedusaConfig, dict]:
    """Heads from a v1 or version 2 directory (``config.json`` + ``medusa_lm_head.safetensors``
    or ``.pt``); ``base_vocab`` fills in the vocab size version 2 does not state."""
    cfg_path = os.path.join(path, V1_CONFIG)
    hf_config = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    st, pt = os.path.join(path, V1_SAFETENSORS), os.path.join(path, V1_PT)
    if os.path.isfile(st):
        f = SafetensorsFile(st)
        tensors, source = {k: f.get(k) for k in f.keys()}, st
    else:
        tensors, source = _read_pt(pt), pt
    return load_heads_from_state_dict(tensors, prefix="", hf_config=hf_config,
                                      vocab_size=base_vocab, dtype=dtype, source=source)
