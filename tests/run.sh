#!/usr/bin/env bash
# The test command: sets up the virtualenv if needed, then runs the whole suite on CPU
# (8 fake devices, set in tests/conftest.py). Extra arguments go to pytest, e.g.
# `tests/run.sh -m "not slow"` or `tests/run.sh tests/test_modes.py`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
exec python -m pytest tests "$@"
