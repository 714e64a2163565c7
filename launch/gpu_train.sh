#!/usr/bin/env bash
# Train on NVIDIA GPUs: one node (one process drives all its GPUs), several nodes under
# SLURM (srun starts one process per node; JAX reads the job from SLURM's variables), or
# several nodes with an explicit coordinator (run the script on every node with its own
# --process_id). Sets up the virtualenv (launch/ensure_venv.sh) with JAX's CUDA plugin.
#
#   launch/gpu_train.sh --workdir=/shared/runs/8b [--launch=single|slurm|explicit] \
#     [--gpus_per_node=8] [--coordinator=HOST:PORT --num_processes=N --process_id=I] \
#     [--mesh=meshes/gpu_8xh100.gin] [--dry_run] \
#     --gin_file=models/8b.gin --gin.seqio_data.data_dir="'/shared/data'" ...
#
# --launch defaults to slurm inside a SLURM allocation of several nodes, to explicit when
# --coordinator is given, else single. Gin: runs/pretrain.gin, the mesh (default
# meshes/gpu_8xh100.gin), then every --gin_file and --gin.X=Y given, in order. The workdir
# must be shared by all nodes (NFS, Lustre, a gcsfuse mount). JAX may use 90% of each
# GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, JAX's default is 75%), which is what
# `prealign plan` counts. --dry_run prints the commands (shell-quoted) instead of running.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "gpu_train.sh: error: $*" >&2; exit 2; }

WORKDIR="" MODE="" GPUS=8 COORDINATOR="" NUM_PROCESSES="" PROCESS_ID=""
MESH=meshes/gpu_8xh100.gin DRY_RUN=0
GIN_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --workdir=*) WORKDIR=${arg#*=} ;;
    --launch=*) MODE=${arg#*=} ;;
    --gpus_per_node=*) GPUS=${arg#*=} ;;
    --coordinator=*) COORDINATOR=${arg#*=} ;;
    --num_processes=*) NUM_PROCESSES=${arg#*=} ;;
    --process_id=*) PROCESS_ID=${arg#*=} ;;
    --mesh=*) MESH=${arg#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    --gin_file=*|--gin.*=*) GIN_ARGS+=("$arg") ;;
    -h|--help) sed -n '/^set -euo/q;2,$p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[ -n "$WORKDIR" ] || die "--workdir is required (see --help)"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node=$GPUS: give a positive number"
if [ -z "$MODE" ]; then
  if [ -n "$COORDINATOR" ]; then MODE=explicit
  elif [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then MODE=slurm
  else MODE=single
  fi
fi

run() {  # print (shell-quoted) under --dry_run, else run
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# One process per node drives all of its GPUs: local_device_ids names them (under SLURM
# JAX would otherwise give each process the one GPU of its local rank).
devices=$(seq -s ', ' 0 $((GPUS - 1)))
case "$MODE" in
  single) distributed=None ;;
  slurm) distributed="{'local_device_ids': [$devices]}" ;;
  explicit)
    [ -n "$COORDINATOR" ] && [ -n "$NUM_PROCESSES" ] && [ -n "$PROCESS_ID" ] ||
      die "--launch=explicit needs --coordinator=HOST:PORT, --num_processes and --process_id"
    distributed="{'coordinator_address': '$COORDINATOR', 'num_processes': $NUM_PROCESSES,"
    distributed+=" 'process_id': $PROCESS_ID, 'local_device_ids': [$devices]}" ;;
  *) die "--launch=$MODE: use single, slurm or explicit" ;;
esac

if [ "$DRY_RUN" = 1 ]; then
  VENV=${PREALIGN_VENV:-$ROOT/.venv}
  echo "# set up $VENV (launch/ensure_venv.sh) with jax[cuda12]"
else
  # shellcheck source=launch/ensure_venv.sh
  source "$ROOT/launch/ensure_venv.sh"
  if ! "$VENV/bin/python" -c "import jax_cuda12_plugin" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" \
      "jax[cuda12]==$(sed -n 's/^jax==//p' "$ROOT/constraints.txt")"
  fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cd "$ROOT"
train=("$VENV/bin/prealign" train --workdir="$WORKDIR" --gin_file=runs/pretrain.gin
       --gin_file="$MESH" "--gin.train.distributed=$distributed" "${GIN_ARGS[@]}")
if [ "$MODE" = slurm ]; then
  nodes=${SLURM_JOB_NUM_NODES:?--launch=slurm runs inside a SLURM allocation (sbatch, salloc)}
  run srun --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$GPUS" \
    --kill-on-bad-exit=1 "${train[@]}"
else
  run "${train[@]}"
fi
