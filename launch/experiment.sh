#!/usr/bin/env bash
# The prealigned-vs-baseline experiment (gin/experiments/prealign_vs_mle.gin): sets up the
# virtualenv if needed, then prepares the corpus, trains the prealigned model and the
# tag-stripped baseline at the same text-token budget, evaluates both and writes
# $WORKDIR/report.md (table + plots/). WORKDIR defaults to workdir/experiment; extra
# arguments (gin files, --gin.X=Y overrides) go to `prealign experiment`. Rerunning reuses
# the data and the trained runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
prealign experiment --gin_file=experiments/prealign_vs_mle.gin \
  --workdir="${WORKDIR:-$ROOT/workdir/experiment}" "$@"
