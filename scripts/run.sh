#!/usr/bin/env bash
# Install medusa_jax into .venv and answer a chat prompt with the default model
# (SmolLM2-135M-Instruct) and its shipped Medusa heads; with no arguments it also decodes the
# prompt without the heads and prints the speedup it measured (decode.py --compare).
# Extra args go to decode.py instead. $VENV picks the virtual environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ "$#" -eq 0 ]; then
  set -- --prompt "What are three good reasons to learn to cook at home?" --max-new-tokens 128 \
    --compare --repeats 3
fi
exec "${VENV:-.venv}/bin/python" decode.py "$@"
