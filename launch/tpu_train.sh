#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: optionally create it (queued resources), ship the
# code at the current commit to every worker, install it, run `prealign train` on all
# workers at once (one process per host; jax.distributed finds the others), and stream
# worker 0's log (Ctrl-C stops the streaming, not the training).
#
#   launch/tpu_train.sh --project=P --zone=us-east5-a --tpu=my-v5p \
#     --accelerator_type=v5p-64 --workdir=gs://BUCKET/runs/8b [--create [--spot]] \
#     [--runtime_version=V] [--mesh=meshes/tpu_v5p-64.gin] [--dry_run] \
#     --gin_file=models/8b.gin --gin.seqio_data.data_dir="'gs://BUCKET/data'" ...
#
# Gin: runs/pretrain.gin, then the mesh (default: meshes/tpu_<accelerator_type>.gin, else
# meshes/fsdp.gin), then every --gin_file and --gin.X=Y given, in order; quotes and spaces
# in overrides survive the ssh hop. Every worker reads and writes the workdir
# (gs://BUCKET/PATH: checkpoints, metrics, TensorBoard) and the data dir on GCS directly.
# --dry_run prints every command (shell-quoted) instead of running it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "tpu_train.sh: error: $*" >&2; exit 2; }

PROJECT="" ZONE="" TPU="" ACCEL="" RUNTIME="" WORKDIR="" MESH="" CREATE=0 SPOT=0 DRY_RUN=0
GIN_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --project=*) PROJECT=${arg#*=} ;;
    --zone=*) ZONE=${arg#*=} ;;
    --tpu=*) TPU=${arg#*=} ;;
    --accelerator_type=*) ACCEL=${arg#*=} ;;
    --runtime_version=*) RUNTIME=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    --mesh=*) MESH=${arg#*=} ;;
    --create) CREATE=1 ;;
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --gin_file=*|--gin.*=*) GIN_ARGS+=("$arg") ;;
    -h|--help) sed -n '/^set -euo/q;2,$p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
for flag in project:PROJECT zone:ZONE tpu:TPU accelerator_type:ACCEL workdir:WORKDIR; do
  var=${flag#*:}
  [ -n "${!var}" ] || die "--${flag%%:*} is required (see --help)"
done
[[ "$WORKDIR" == gs://?*/?* ]] || die "--workdir=$WORKDIR: give gs://BUCKET/PATH"
if [ -z "$RUNTIME" ]; then
  case "$ACCEL" in  # the TPU VM base images (docs: cloud.google.com/tpu/docs/runtimes)
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "--accelerator_type=$ACCEL: no default runtime; pass --runtime_version" ;;
  esac
fi
if [ -z "$MESH" ]; then
  MESH=meshes/fsdp.gin
  [ -f "$ROOT/gin/meshes/tpu_$ACCEL.gin" ] && MESH=meshes/tpu_$ACCEL.gin
fi

# run CMD...: print it (shell-quoted, copy-pastable) under --dry_run, else run it
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
  echo "tpu_train.sh: warning: uncommitted changes are not shipped (commit $COMMIT is)" >&2
fi
ARCHIVE="prealign-$COMMIT.tar.gz"
TPU_FLAGS=(--project="$PROJECT" --zone="$ZONE")
on_workers() { run gcloud compute tpus tpu-vm ssh "$TPU" "${TPU_FLAGS[@]}" --worker="$1" \
  --command="$2"; }

if [ "$CREATE" = 1 ]; then
  create=(gcloud compute tpus queued-resources create "$TPU" --node-id="$TPU"
          "${TPU_FLAGS[@]}" --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
  [ "$SPOT" = 1 ] && create+=(--spot)
  run "${create[@]}"
  state=(gcloud compute tpus queued-resources describe "$TPU" "${TPU_FLAGS[@]}"
         --format='value(state.state)')
  if [ "$DRY_RUN" = 1 ]; then
    run "${state[@]}"  # (polled until ACTIVE)
  else
    echo "tpu_train.sh: waiting for queued resource $TPU to become ACTIVE" >&2
    until [ "$("${state[@]}")" = ACTIVE ]; do sleep 30; done
  fi
fi

# Ship the code at this commit to every worker and install it (Python 3.11 via uv: the TPU
# VM images have 3.10), pinned by constraints.txt, with jax's TPU runtime.
run git -C "$ROOT" archive --format=tar.gz --output="/tmp/$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "/tmp/$ARCHIVE" "$TPU:$ARCHIVE" "${TPU_FLAGS[@]}" \
  --worker=all
JAX_VERSION=$(sed -n 's/^jax==//p' "$ROOT/constraints.txt")
setup="set -e; rm -rf ~/prealign && mkdir -p ~/prealign && tar -xzf ~/$ARCHIVE -C ~/prealign"
setup+="; python3 -m pip install -q --user uv"
setup+="; ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/prealign-venv"
setup+="; ~/.local/bin/uv pip install -q --python ~/prealign-venv/bin/python"
setup+=" -c ~/prealign/constraints.txt -e ~/prealign 'jax[tpu]==$JAX_VERSION'"
on_workers all "$setup"

# Train on every worker in the background (survives the ssh session), then follow worker
# 0's log until its process ends.
# (only the arguments are quoted for the worker's shell: $HOME must expand there, while a
# quote, space or $ in an override must arrive as typed)
args=$(printf ' %q' --workdir="$WORKDIR" --gin_file=runs/pretrain.gin --gin_file="$MESH" \
  "${GIN_ARGS[@]}")
train="\$HOME/prealign-venv/bin/prealign train$args"
on_workers all "cd ~/prealign && { nohup $train < /dev/null > ~/prealign-train.log 2>&1 & \
echo \$! > ~/prealign-train.pid; }"
on_workers 0 "tail --pid=\$(cat ~/prealign-train.pid) -n +1 -f ~/prealign-train.log"
