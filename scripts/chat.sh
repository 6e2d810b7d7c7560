#!/usr/bin/env bash
# Terminal chat with configs/inference/chat.yaml (/clear resets, /exit quits) with the model merge_lora.sh
# writes (checkpoints/dpo_merged); another model: scripts/chat.sh --model_path checkpoints/sft_full
# (the chain of pretrain.sh ... merge_lora.sh is sized for a GPU; after docs/TUTORIAL.md sections 1-5 on a CPU,
# checkpoints/dpo_merged is that chain's model)
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore chat --config configs/inference/chat.yaml "$@"
