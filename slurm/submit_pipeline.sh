#!/usr/bin/env bash
# Submit the whole pipeline as SLURM batch jobs chained with --dependency=afterok, and print the job ids:
#
#   vocab -> shard (array) -> shard merge -> pretrain (NODES x GPUS_PER_NODE ranks) -> finetune (array) --+
#        \-> baselines (array; they need only the vocabulary) -------------------------------------------+-> leaderboard
#   with --glue also: pretrain -> glue (array, a (task, seed) run each) -> glue-table --------------------+
#
# usage: slurm/submit_pipeline.sh [PROFILE] [--partition P] [--account A] [--time T] [--nodes N]
#                                 [--gpus-per-node G] [--cpus-per-task C] [--build DIR] [--glue] [--dry-run]
# PROFILE (also --config; default recipes/pipeline/bert-base.sh) names each stage's recipe and overrides;
# recipes/pipeline/demo.sh is the CPU demo. The options may instead come from the environment: PARTITION,
# ACCOUNT, TIME (pretraining's limit, default 48:00:00; STAGE_TIME for the others, default 04:00:00), NODES
# (default 1), GPUS_PER_NODE (default 0: CPU), CPUS_PER_TASK (default 2), BUILD (default build/<profile>),
# DATA_DIR. --glue (or GLUE=1) runs bertpipe glue on the pretrained BERT (the profile's GLUE_TASKS, GLUE_SEEDS,
# GLUE_OVERRIDES) into BUILD/runs/glue-bert. Outputs: BUILD/{vocab,shards,pretrain,runs}; one log per job in
# BUILD/logs.
set -euo pipefail
HOME_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$HOME_DIR"
PROFILE=${PROFILE:-recipes/pipeline/bert-base.sh}
DRY_RUN=0
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] || { echo "submit_pipeline.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --partition) need "$@"; PARTITION=$2; shift ;;
    --account) need "$@"; ACCOUNT=$2; shift ;;
    --time) need "$@"; TIME=$2; shift ;;
    --nodes) need "$@"; NODES=$2; shift ;;
    --gpus-per-node) need "$@"; GPUS_PER_NODE=$2; shift ;;
    --cpus-per-task) need "$@"; CPUS_PER_TASK=$2; shift ;;
    --build) need "$@"; BUILD=$2; shift ;;
    --config) need "$@"; PROFILE=$2; shift ;;
    --glue) GLUE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -*) echo "submit_pipeline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) PROFILE=$1 ;;
  esac
  shift
done
[ -f "$PROFILE" ] || { echo "submit_pipeline.sh: profile not found: $PROFILE" >&2; exit 2; }
export DATA_DIR=${DATA_DIR:-$(cd "$HOME_DIR/.." && pwd)/shared/data}
# shellcheck disable=SC1090
source "$PROFILE"
NODES=${NODES:-1} GPUS_PER_NODE=${GPUS_PER_NODE:-0} CPUS_PER_TASK=${CPUS_PER_TASK:-2}
BUILD=$(realpath -m "${BUILD:-build/$(basename "$PROFILE" .sh)}")
RUNS_DIR=$BUILD/runs
mkdir -p "$BUILD/logs"
export BERTPIPE_HOME=$HOME_DIR

common=(--parsable --chdir="$HOME_DIR" --cpus-per-task="$CPUS_PER_TASK")
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
gpu=()
[ "$GPUS_PER_NODE" -gt 0 ] && gpu=(--gres="gpu:$GPUS_PER_NODE")

# submit NAME DEPENDENCY sbatch-args... : submits with the environment set by the caller; prints nothing
submit() {
  local name=$1 after=$2; shift 2
  local args=("${common[@]}" --job-name="bertpipe-$name")
  [ -n "$after" ] && args+=(--dependency="afterok:$after")
  if [ "$DRY_RUN" = 1 ]; then
    echo "CONFIG=${CONFIG:-} CONFIGS='${CONFIGS:-}' OVERRIDES='${OVERRIDES:-}' GLUE_ARGS='${GLUE_ARGS:-}' sbatch \
${args[*]} $*" >&2
    job="<$name>"
  else
    job=$(sbatch "${args[@]}" "$@" | cut -d';' -f1)
  fi
  echo "$name $job"
}
array() { local n; read -r -a n <<< "$1"; echo "0-$(( ${#n[@]} - 1 ))"; }

stage_time=(--time="${STAGE_TIME:-04:00:00}")
CONFIG=$VOCAB_CONFIG OVERRIDES="output_dir=$BUILD/vocab ${VOCAB_OVERRIDES:-}" \
  submit vocab "" "${stage_time[@]}" --output="$BUILD/logs/%x-%j.out" slurm/vocab.sbatch
vocab=$job
CONFIG=$SHARD_CONFIG OVERRIDES="vocab_dir=$BUILD/vocab output_dir=$BUILD/shards ${SHARD_OVERRIDES:-}" \
  submit shard "$vocab" "${stage_time[@]}" --array="0-$((SHARD_TASKS - 1))" --output="$BUILD/logs/%x-%A_%a.out" \
  slurm/shard.sbatch
shard=$job
CONFIG=$SHARD_CONFIG OVERRIDES="vocab_dir=$BUILD/vocab output_dir=$BUILD/shards ${SHARD_OVERRIDES:-}" NUM_TASKS=$SHARD_TASKS \
  submit shard-merge "$shard" "${stage_time[@]}" --output="$BUILD/logs/%x-%j.out" slurm/shard_merge.sbatch
merge=$job
CONFIG=$PRETRAIN_CONFIG OVERRIDES="data.shards=$BUILD/shards data.vocab_dir=$BUILD/vocab run_dir=$BUILD/pretrain \
${PRETRAIN_OVERRIDES:-}" \
  submit pretrain "$merge" --time="${TIME:-48:00:00}" --nodes="$NODES" --ntasks-per-node="$(( GPUS_PER_NODE > 0 ? \
GPUS_PER_NODE : 1 ))" "${gpu[@]}" --output="$BUILD/logs/%x-%j.out" slurm/pretrain.sbatch
pretrain=$job
one_gpu=()
[ "$GPUS_PER_NODE" -gt 0 ] && one_gpu=(--gres=gpu:1)
CONFIGS=$FINETUNE_CONFIGS RUNS_DIR=$RUNS_DIR OVERRIDES="model.encoder=$BUILD/pretrain ${FINETUNE_OVERRIDES:-}" \
  submit finetune "$pretrain" "${stage_time[@]}" --array="$(array "$FINETUNE_CONFIGS")" "${one_gpu[@]}" \
  --output="$BUILD/logs/%x-%A_%a.out" slurm/finetune.sbatch
finetune=$job
CONFIGS=$BASELINE_CONFIGS RUNS_DIR=$RUNS_DIR OVERRIDES="model.vocab_dir=$BUILD/vocab ${BASELINE_OVERRIDES:-}" \
  submit baselines "$vocab" "${stage_time[@]}" --array="$(array "$BASELINE_CONFIGS")" "${one_gpu[@]}" \
  --output="$BUILD/logs/%x-%A_%a.out" slurm/finetune.sbatch
baselines=$job
after_all="$finetune:$baselines"
if [ "${GLUE:-0}" = 1 ]; then
  glue_args="--encoder $BUILD/pretrain --out $RUNS_DIR/glue-bert ${GLUE_TASKS:+--tasks $GLUE_TASKS} \
${GLUE_SEEDS:+--seeds $GLUE_SEEDS}"
  # shellcheck disable=SC2086
  runs=$("${BERTPIPE:-$HOME_DIR/.venv/bin/bertpipe}" glue $glue_args --list | wc -l)
  GLUE_ARGS=$glue_args OVERRIDES="${GLUE_OVERRIDES:-}" \
    submit glue "$pretrain" "${stage_time[@]}" --array="0-$((runs - 1))" "${one_gpu[@]}" \
    --output="$BUILD/logs/%x-%A_%a.out" slurm/glue.sbatch
  glue=$job
  GLUE_ARGS=$glue_args OVERRIDES="${GLUE_OVERRIDES:-}" \
    submit glue-table "$glue" "${stage_time[@]}" --output="$BUILD/logs/%x-%j.out" slurm/glue.sbatch
  after_all="$after_all:$job"
fi
RUNS_DIR=$RUNS_DIR submit leaderboard "$after_all" "${stage_time[@]}" --output="$BUILD/logs/%x-%j.out" \
  slurm/leaderboard.sbatch
