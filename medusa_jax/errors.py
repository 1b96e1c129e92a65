"""The project's errors for bad input. Every one derives from :class:`MedusaError` (a
``ValueError``), so a caller catches exactly those, and the CLIs report them as one ``error:``
line with exit status 2; any other exception is a bug and keeps its traceback.

This module imports nothing of the package, so every module can use it. The errors of one
domain live beside it and derive from ``MedusaError`` too: ``ConfigError`` (config.py),
``TreeError`` (tree.py), ``CheckpointError`` (weights/errors.py), ``AcceptanceError``
(decoding/acceptance.py), ``ShardingError``, ``DistributedError``, ``StepCostError``,
``AOTError``."""

from __future__ import annotations


class MedusaError(ValueError):
    """Bad input: the message names the problem (the file, the field, the value)."""


class GenerationError(MedusaError):
    """Bad generation input (empty prompt, too long for the cache or the context, ...)."""


class TokenizerError(MedusaError):
    """A checkpoint's tokenizer is missing, incomplete or cannot render what is asked."""


class DataError(MedusaError):
    """Training data that cannot be used (no usable record, no target, a foreign resume
    state); the message names the file or the counts."""


class MissingFileError(MedusaError, FileNotFoundError):
    """A file or package the run needs is not there; the message says how to get it. Also a
    ``FileNotFoundError``."""


__all__ = ["DataError", "GenerationError", "MedusaError", "MissingFileError", "TokenizerError"]
