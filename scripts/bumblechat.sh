#!/usr/bin/env bash
# The web chat page and the OpenAI-compatible API with configs/inference/bumblechat.yaml
# (http://127.0.0.1:8000/ and /v1); e.g. scripts/bumblechat.sh --model_path checkpoints/sft --api_key secret
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore serve --config configs/inference/bumblechat.yaml "$@"
