#!/usr/bin/env bash
# Terminal chat with configs/inference/chat.yaml (/clear resets, /exit quits) with the model merge_lora.sh
# writes (checkpoints/dpo_merged); another model: scripts/chat.sh --model_path checkpoints/sft_full
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore chat --config configs/inference/chat.yaml "$@"
