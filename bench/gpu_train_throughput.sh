#!/usr/bin/env bash
# Training throughput of the 125m and 1b configs in bf16 on one GPU: one JSON line per
# (config, attention implementation) from bench/train_throughput.py, MFU against the
# H100/H200 dense bf16 peak (989 TFLOP/s). Uses the python that has jax with CUDA
# ($PYTHON, default python3); flax/optax wheels in .whl/ (if any) are installed first.
#
#   bash bench/gpu_train_throughput.sh [extra train_throughput.py flags]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRA=("$@")
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
for run in "125m cudnn" "1b cudnn" "125m xla" "1b xla"; do
  set -- $run
  "$PY" bench/train_throughput.py --configs="$1" --attention="$2" --dtype=bfloat16 \
    --peak_tflops=989 --warmup=2 --repeats=3 --steps=5 "${EXTRA[@]}" \
    || echo "{\"config\": \"$1\", \"attention\": \"$2\", \"failed\": true}"
done
