#!/usr/bin/env bash
# The three-stage demo on the shipped data (about 10 minutes on a 2-core CPU); --device cuda on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bumblecore demo --output_dir checkpoints/demo "$@"
