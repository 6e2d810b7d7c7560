#!/usr/bin/env bash
# The web chat page and the OpenAI-compatible API with configs/inference/bumblechat.yaml
# (http://127.0.0.1:8000/ and /v1) with the model merge_lora.sh writes (checkpoints/dpo_merged);
# e.g. scripts/bumblechat.sh --model_path checkpoints/sft_full --api_key secret
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore serve --config configs/inference/bumblechat.yaml "$@"
