#!/usr/bin/env bash
# Install medusa_jax into .venv and answer a chat prompt with the default model
# (SmolLM2-135M-Instruct, with the shipped Medusa heads when present). Extra args go to decode.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then
  set -- --prompt "What are three good reasons to learn to cook at home?" --max-new-tokens 128
fi
exec .venv/bin/python decode.py "$@"
