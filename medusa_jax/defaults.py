"""What the package picks when the caller does not say, for modules that must not import the
high-level API (:mod:`medusa_jax.presets` is imported by it): the dtype for a backend and the
Medusa heads shipped for the default model. No jax at import time (``decode.py --help``)."""

from __future__ import annotations

import os


def default_dtype(backend: str | None = None) -> str:
    """float32 on a CPU, bfloat16 on accelerators (weights, activations and the KV cache)."""
    if not backend:
        import jax

        backend = jax.default_backend()
    return "float32" if backend == "cpu" else "bfloat16"


def default_heads_path() -> str | None:
    """The Medusa heads shipped inside the package for the default model, if present."""
    p = os.path.join(os.path.dirname(__file__), "assets", "heads", "smollm2-135m-instruct")
    return p if os.path.isdir(p) else None
