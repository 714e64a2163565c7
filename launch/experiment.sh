#!/usr/bin/env bash
# The prealigned-vs-baselines experiment: sets up the virtualenv if needed, then prepares
# the corpus, trains the prealigned model and each baseline (tag-stripped MLE, filtered,
# metadata, safelm; experiment.arms) at the same text-token budget for each seed, evaluates
# them, attacks every arm's run with the fine-tuning attacks and writes $WORKDIR/report.md
# (table + plots/). Rerunning picks up where it stopped: it reuses the data, resumes or
# skips the runs, and keeps the evaluations made with the same arguments.
#
#   launch/experiment.sh                                                # CPU, ~7 h (gin file)
#   launch/experiment.sh --gin_file=experiments/prealign_vs_mle_gpu.gin # one GPU (125M)
#
# The experiment is gin/experiments/prealign_vs_mle.gin unless a --gin_file=experiments/...
# names another. A GPU one (*_gpu.gin) gets JAX's CUDA plugin in the virtualenv (as
# launch/gpu_train.sh does) and stops unless JAX then sees a GPU. WORKDIR defaults to
# workdir/experiment (workdir/<file name> for another experiment). Other arguments (gin
# files, --gin.X=Y overrides) go to `prealign experiment`; --dry_run prints the command.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

EXPERIMENT=experiments/prealign_vs_mle.gin DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --gin_file=experiments/*) EXPERIMENT=${arg#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
name=$(basename "$EXPERIMENT" .gin)
[ "$name" = prealign_vs_mle ] && name=experiment
WORKDIR=${WORKDIR:-$ROOT/workdir/$name}
command=(prealign experiment --gin_file="$EXPERIMENT" --workdir="$WORKDIR" "${ARGS[@]}")

if [ "$DRY_RUN" = 1 ]; then
  [[ $EXPERIMENT == *_gpu.gin ]] && echo "# set up the virtualenv with jax[cuda12]"
  printf '%q ' "${command[@]}" | sed 's/ $//'
  echo
  exit 0
fi
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
if [[ $EXPERIMENT == *_gpu.gin ]]; then
  if ! "$VENV/bin/python" -c "import jax_cuda12_plugin" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" \
      "jax[cuda12]==$(sed -n 's/^jax==//p' "$ROOT/constraints.txt")"
  fi
  "$VENV/bin/python" -c "import jax; jax.devices('gpu')" 2>/dev/null || {
    echo "experiment.sh: error: $EXPERIMENT needs a GPU and JAX sees none" >&2; exit 2; }
fi
cd "$ROOT"
"${command[@]}"
