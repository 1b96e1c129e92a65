"""The exceptions that mean "bad input" (reported as one clear line by the CLIs, no traceback)."""

from medusa_jax.config import ConfigError
from medusa_jax.decoding.common import GenerationError
from medusa_jax.tree import TreeError
from medusa_jax.weights.errors import CheckpointError

USER_ERRORS = (ConfigError, GenerationError, TreeError, CheckpointError, FileNotFoundError,
               ValueError, TypeError)

__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "GenerationError", "TreeError"]
