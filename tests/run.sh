#!/usr/bin/env bash
# The test command: sets up the virtualenv if needed, then runs the whole suite on CPU
# (8 fake devices, set in tests/conftest.py) on 2 pytest-xdist workers, each taking whole
# test files (module fixtures are built once): about 20 min on 2 cores (37 worker-minutes,
# half of them the 72 end-to-end tests marked slow). Extra arguments go to pytest, e.g.
# `tests/run.sh -m "not slow"`, `tests/run.sh -n 0 tests/test_modes.py` (serial).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/ensure_venv.sh
source "$ROOT/launch/ensure_venv.sh"
cd "$ROOT"
exec python -m pytest -n 2 --dist loadfile "$@"  # pytest.ini: testpaths = tests
