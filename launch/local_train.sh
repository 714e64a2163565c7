#!/usr/bin/env bash
# The main job on one machine (CPU demo): sets up the virtualenv if needed, then runs the
# pipeline: prepare data + vocabulary, train the tiny model, sample under the assistant
# policy, evaluate briefly (eval.json + plots in $WORKDIR/eval). WORKDIR=DIR sets the run
# directory (default workdir/cpu_demo); extra arguments (gin files, --gin.X=Y overrides) go
# to `prealign train`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
W="${WORKDIR:-$ROOT/workdir/cpu_demo}"
prealign policies
prealign prepare --gin_file=data/cpu_demo.gin --workdir="$W"
prealign train --gin_file=runs/cpu_demo.gin --workdir="$W" "$@"
prealign sample --workdir="$W" --policy assistant --mode ai \
  --prompt "My neighbour left his wallet on the bench. What should I do?" \
  --num_samples 4 --max_new_tokens 96 --output "$W/samples.jsonl"
# A short evaluation: held-out loss per mode, misaligned rates with and without the mask,
# red-team; the full comparison with a baseline is launch/experiment.sh.
prealign eval --workdir="$W" --gin_file=eval/quick.gin
echo "The prealigned-vs-baseline comparison: launch/experiment.sh (report in" \
  "workdir/experiment/report.md; the measured figures are in docs/EXPERIMENTS.md)."
