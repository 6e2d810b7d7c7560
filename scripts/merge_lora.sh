#!/usr/bin/env bash
# Merge a LoRA adapter into its base and save a full model (checked against the unmerged one).
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore merge_lora --base_model_path "${BASE:-checkpoints/sft}" --lora_model_path "${LORA:-checkpoints/dpo_lora}" --save_path "${OUT:-checkpoints/dpo_merged}" "$@"
