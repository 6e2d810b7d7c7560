#!/usr/bin/env bash
# ORPO (no reference model) with configs/dpo/orpo.yaml on one GPU (or the CPU); extra flags override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore train --config configs/dpo/orpo.yaml "$@"
# All GPUs of this node (add --num-nodes N --node-rank R --main-address HOST for several nodes):
# fabric run --accelerator cuda --devices 8 bumblecore/__main__.py train --config configs/dpo/orpo.yaml --deepspeed_config_path configs/deepspeed/ds_z2_config.json "$@"
