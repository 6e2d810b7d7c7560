#!/usr/bin/env bash
# LoRA GRPO with configs/grpo/grpo_lora.yaml on one GPU (or the CPU); extra flags override the config
# (configs/grpo/grpo_full.yaml: full fine-tuning, DAPO-style). Each process samples for its own prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore train --config configs/grpo/grpo_lora.yaml "$@"
# All GPUs of this node (add --num-nodes N --node-rank R --main-address HOST for several nodes):
# fabric run --accelerator cuda --devices 8 bumblecore/__main__.py train --config configs/grpo/grpo_lora.yaml --deepspeed_config_path configs/deepspeed/ds_z2_config.json "$@"
