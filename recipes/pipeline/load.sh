#!/usr/bin/env bash
# Print a pipeline profile's settings as Make assignments (the Makefile includes them):
#   recipes/pipeline/load.sh recipes/pipeline/demo.sh
# The profile is sourced by bash with DATA_DIR from the environment, exactly as slurm/submit_pipeline.sh does.
set -euo pipefail
# shellcheck disable=SC1090
source "${1:?usage: load.sh PROFILE}"
for key in VOCAB_CONFIG SHARD_CONFIG SHARD_TASKS PRETRAIN_CONFIG FINETUNE_CONFIGS BASELINE_CONFIGS CORPUS_FILES \
           VOCAB_OVERRIDES SHARD_OVERRIDES PRETRAIN_OVERRIDES FINETUNE_OVERRIDES BASELINE_OVERRIDES \
           GLUE_TASKS GLUE_SEEDS GLUE_PRESET GLUE_OVERRIDES GLUE_BASELINE_OVERRIDES; do
  value=$(echo ${!key:-})  # one line: newlines and runs of spaces become one space
  printf '%s := %s\n' "$key" "${value//\$/\$\$}"  # a literal $ (an OmegaConf ${...}) stays one for Make
done
