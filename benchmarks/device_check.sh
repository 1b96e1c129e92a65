#!/usr/bin/env bash
# The device check in one call (see benchmarks/device_check.py): on an accelerator machine
#   OUT=/some/dir bash benchmarks/device_check.sh          # < 8 min on one H200
#   bash benchmarks/device_check.sh --smoke                # tiny shapes on a CPU (CI)
# Needs only what the accelerator image has (jax + its plugin, flax, optax, orbax,
# transformers, safetensors); wheels placed in benchmarks/wheels/ are installed first, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --no-deps --no-index -q benchmarks/wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/device_check.py "$@"
