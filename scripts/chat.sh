#!/usr/bin/env bash
# Terminal chat with configs/inference/chat.yaml (/clear resets, /exit quits); e.g. scripts/chat.sh --model_path checkpoints/sft
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore chat --config configs/inference/chat.yaml "$@"
