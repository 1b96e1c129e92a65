"""The one exception the weight loaders raise for a bad checkpoint."""

from __future__ import annotations

from medusa_jax.errors import MedusaError


class CheckpointError(MedusaError):
    """A checkpoint is missing, unreadable or does not match its config.

    The message always names the offending path (and the tensor key where there is one), so a
    user can tell which of several shards or files to fix.
    """
