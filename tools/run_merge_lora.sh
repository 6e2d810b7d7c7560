#!/usr/bin/env bash
# The original BumbleCore's tools/run_merge_lora.sh, for its users: the same flags
# (--base_model_path B --lora_model_path L --save_path S --dtype auto --trust_remote_code), run by
# scripts/merge_lora.sh, whose defaults (checkpoints/sft_full + checkpoints/dpo_lora -> checkpoints/dpo_merged)
# fill any path left out. --device_map and --low_cpu_mem_usage are accepted and ignored: the merge
# loads each model once, on the CPU.
set -euo pipefail
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device_map|--low_cpu_mem_usage)
      if [ $# -gt 1 ] && [[ "$2" != --* ]]; then shift; fi ;;  # its value too, when it has one
    --device_map=*|--low_cpu_mem_usage=*) ;;
    *) args+=("$1") ;;
  esac
  shift
done
exec "$(dirname "$0")/../scripts/merge_lora.sh" ${args[@]+"${args[@]}"}
