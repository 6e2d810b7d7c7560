#!/usr/bin/env bash
# SimPO (no reference model) with configs/dpo/simpo.yaml on one GPU; extra flags override the config.
# Sized for a GPU and real data (bf16, long rows, global batches of 32 rows or more): on a laptop CPU it runs
# (add --train_model_precision fp32) but learns next to nothing from the demo data; there run
# docs/TUTORIAL.md sections 1-5 (the same chain, CPU-sized) or `bumblecore demo` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore train --config configs/dpo/simpo.yaml "$@"
# All GPUs of this node (add --num-nodes N --node-rank R --main-address HOST for several nodes):
# fabric run --accelerator cuda --devices 8 bumblecore/__main__.py train --config configs/dpo/simpo.yaml --deepspeed_config_path configs/deepspeed/ds_z2_config.json "$@"
