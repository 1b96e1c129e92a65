"""The package's per-user cache: built tokenizers and JAX's persistent compilation cache.

``$MEDUSA_JAX_CACHE`` names the folder (``off`` / ``0``: no cache at all), else
``$XDG_CACHE_HOME/medusa_jax``, else ``~/.cache/medusa_jax``. Everything in it can be deleted
at any time: it is rebuilt on the next run.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("medusa_jax")

_OFF = ("", "0", "off", "none", "false", "no")
# programs that compile faster than this are not worth a cache lookup (jax's default is 1 s;
# the decode loops of the default model compile in 0.5-2 s on a small CPU)
MIN_COMPILE_SECONDS = 0.3
# the compilation cache's size cap (least recently used entries are evicted beyond it)
MAX_COMPILE_CACHE_BYTES = 2 << 30


def user_cache_dir(*parts: str) -> str | None:
    """The cache folder joined with ``parts``, or None when ``$MEDUSA_JAX_CACHE`` turns it off."""
    root = os.environ.get("MEDUSA_JAX_CACHE")
    if root is not None and root.strip().lower() in _OFF:
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "medusa_jax")
    return os.path.join(root, *parts)


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at ``<cache>/xla`` unless the user already set
    one (``JAX_COMPILATION_CACHE_DIR``) or turned the cache off; returns the folder in use.

    On this project's 2-core CPU the default model's ``decode.py`` run compiles for ~2.4 s cold
    and ~0.5 s warm (benchmarks/results/startup.md). Called by the command-line tools; library
    users (notebooks) call it themselves if they want it, since it is a process-wide setting."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    folder = user_cache_dir("xla")
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache
        log.debug("no compilation cache (%s)", e)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # the user's own settings of these (jax reads them from the environment) stay
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_COMPILE_CACHE_BYTES)
    return folder
