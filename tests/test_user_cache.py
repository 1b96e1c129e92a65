"""The package's user cache: where it lives, how it is turned off, and JAX's persistent
compilation cache pointed into it by the command-line tools (without overriding the user's)."""

import json
import os
import subprocess
import sys

from medusa_jax.user_cache import user_cache_dir

PROBE = """
import json, sys
from medusa_jax.user_cache import enable_compilation_cache
d = enable_compilation_cache()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(3)).block_until_ready()
print(json.dumps({"dir": d, "config": jax.config.jax_compilation_cache_dir,
                  "min": jax.config.jax_persistent_cache_min_compile_time_secs}))
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("MEDUSA_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR",
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path))
    assert user_cache_dir("a", "b") == str(tmp_path / "a" / "b")
    for off in ("off", "0", "OFF", ""):
        monkeypatch.setenv("MEDUSA_JAX_CACHE", off)
        assert user_cache_dir("a") is None
    monkeypatch.delenv("MEDUSA_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert user_cache_dir("t") == str(tmp_path / "x" / "medusa_jax" / "t")


def test_compiled_programs_are_kept_in_the_cache(tmp_path):
    r = _probe(MEDUSA_JAX_CACHE=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert r["dir"] == r["config"] == str(tmp_path / "xla") and r["min"] == 0
    assert os.listdir(tmp_path / "xla")  # the jitted program was written
    r = _probe(MEDUSA_JAX_CACHE=str(tmp_path / "d"))  # our threshold when the user sets none
    assert r["min"] == 0.3


def test_the_users_own_cache_and_off_are_respected(tmp_path):
    theirs = str(tmp_path / "theirs")
    r = _probe(MEDUSA_JAX_CACHE=str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=theirs)
    assert r["dir"] == r["config"] == theirs and not (tmp_path / "ours").exists()
    r = _probe(MEDUSA_JAX_CACHE="off")
    assert r["dir"] is None and not r["config"]
