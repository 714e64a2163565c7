#!/usr/bin/env bash
# Sourced by launch/local_train.sh and tests/run.sh: create or reuse the project virtualenv
# ($PREALIGN_VENV, default .venv in the repository) and install the package into it, pinned
# by constraints.txt. Reinstalls only when setup.py or constraints.txt changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PREALIGN_VENV:-$ROOT/.venv}

pick_python() {
  local py
  for py in ${PYTHON:-} python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "prealign: error: need Python 3.11 or 3.12 (jax 0.10 / flax 0.12); set PYTHON=" >&2
  return 1
}

stamp_of() { cat "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
  py=$(pick_python)
  echo "prealign: creating virtualenv $VENV with $py"
  "$py" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.prealign-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "prealign: installing prealign-jax and its pinned dependencies into $VENV (a few minutes)"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "${ROOT}[test]"
  stamp_of > "$VENV/.prealign-stamp"
  echo "prealign: installed in $(( $(date +%s) - start ))s; $(du -sh "$VENV" | cut -f1) on disk"
fi
export PATH="$VENV/bin:$PATH"
