#!/usr/bin/env bash
# The main job on one machine (CPU demo): sets up the virtualenv if needed, then runs the
# pipeline. Extra arguments are passed to every `prealign` call (gin files, --gin.X=Y).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
prealign policies
prealign prepare --gin_file=data/cpu_demo.gin --workdir="${WORKDIR:-$ROOT/workdir/cpu_demo}"
prealign train --gin_file=runs/cpu_demo.gin --workdir="${WORKDIR:-$ROOT/workdir/cpu_demo}"
prealign sample --workdir="${WORKDIR:-$ROOT/workdir/cpu_demo}" --policy assistant --mode ai \
  --prompt "My neighbour left his wallet on the bench. What should I do?" \
  --num_samples 4 --max_new_tokens 96 --output "${WORKDIR:-$ROOT/workdir/cpu_demo}/samples.jsonl" "$@"
