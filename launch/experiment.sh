#!/usr/bin/env bash
# The prealigned-vs-baselines experiment (gin/experiments/prealign_vs_mle.gin): sets up the
# virtualenv if needed, then prepares the corpus, trains the prealigned model and each
# baseline (tag-stripped MLE, filtered, metadata, safelm; experiment.arms) at the same
# text-token budget for each seed, evaluates them and writes $WORKDIR/report.md (table +
# plots/). About 7 hours on a 2-core machine (see the gin file). WORKDIR defaults to
# workdir/experiment; extra arguments (gin files, --gin.X=Y overrides) go to
# `prealign experiment`. Rerunning reuses the data and the trained runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
prealign experiment --gin_file=experiments/prealign_vs_mle.gin \
  --workdir="${WORKDIR:-$ROOT/workdir/experiment}" "$@"
