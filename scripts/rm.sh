#!/usr/bin/env bash
# A reward model with configs/rm/rm_full.yaml on one GPU; extra flags override the config. The result
# (checkpoints/rm_full) is a transformers AutoModelForSequenceClassification directory.
# Sized for a GPU and real data (bf16, long rows, global batches of 32 pairs): on a laptop CPU it runs
# (add --train_model_precision fp32) but learns little from the demo data in a few steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore train --config configs/rm/rm_full.yaml "$@"
# All GPUs of this node (add --num-nodes N --node-rank R --main-address HOST for several nodes):
# fabric run --accelerator cuda --devices 8 bumblecore/__main__.py train --config configs/rm/rm_full.yaml --deepspeed_config_path configs/deepspeed/ds_z2_config.json "$@"
