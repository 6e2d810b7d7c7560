#!/usr/bin/env bash
# Merge a LoRA adapter into its base and save a full model (checked against the unmerged one).
# Defaults: the adapter of dpo_lora.sh on the model of sft_full.sh; BASE=... LORA=... OUT=... or flags change them.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore merge_lora --base_model_path "${BASE:-checkpoints/sft_full}" --lora_model_path "${LORA:-checkpoints/dpo_lora}" --save_path "${OUT:-checkpoints/dpo_merged}" "$@"
