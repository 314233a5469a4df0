# Sourced by every sbatch script: where bertpipe is, and a log line that names the job.
# BERTPIPE_HOME is the checkout (default: the submit directory); BERTPIPE the command (default: its .venv's).
set -euo pipefail
BERTPIPE_HOME=${BERTPIPE_HOME:-${SLURM_SUBMIT_DIR:-.}}
BERTPIPE=${BERTPIPE:-}
if [ -z "$BERTPIPE" ]; then
  if [ -x "$BERTPIPE_HOME/.venv/bin/bertpipe" ]; then BERTPIPE="$BERTPIPE_HOME/.venv/bin/bertpipe"
  else BERTPIPE=$(command -v bertpipe); fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on $(hostname -s): $BERTPIPE $*" >&2
