#!/usr/bin/env bash
# Run a bob_jax command on every worker of a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_vm.sh [--setup-only] -- python -m bob_jax.main --config=configs/vit.py:task=finetune \
#       --workdir=/gcs/my-bucket/runs/vit
#   launch/tpu_vm.sh -- python -m bob_jax.sweep --sweep=configs/sweeps/bob.py --workdir=/gcs/my-bucket/runs/bob
#
# Everything that names a cluster comes from the environment (no edits to point at another one):
#   TPU_NAME       slice name (required)             TPU_ZONE     zone, e.g. us-central2-b (required)
#   TPU_TYPE       accelerator type, e.g. v4-32; needed only when the slice does not exist yet
#   TPU_PROJECT    gcloud project (default: gcloud's configured project)
#   TPU_RUNTIME    TPU VM software version (default tpu-ubuntu2204-base)
#   TPU_SPOT=1     create the slice as a Spot VM (preemptible; the run resumes from its checkpoints)
#   TPU_REPO_DIR   where the checkout goes on the workers (default ~/bob_jax)
#   TPU_EXTRAS     pip extras of bob_jax to install (default tpu: jax[tpu] in the pyproject's range)
#   TPU_MOUNT      "BUCKET:MOUNTPOINT": gcsfuse-mount a bucket on every worker first (e.g. my-bucket:/gcs/my-bucket)
#
# What it does: (1) create the slice unless it exists, (2) copy the committed tree of this checkout
# (`git archive HEAD`, so uncommitted edits do not travel) to every worker, (3) make a venv there with
# bob_jax[tpu], (4) run the command on all workers at once. Each worker is one JAX process;
# `python -m bob_jax.main` / `bob_jax.sweep` detect the TPU slice and call jax.distributed.initialize(),
# process 0 writes the results and reports. --workdir must be storage every worker sees (a gcsfuse
# mount of a bucket, Filestore NFS): Orbax writes each host's shards of a checkpoint there.
#
# Preemption: Spot/maintenance SIGTERMs make the run checkpoint and exit with status 143; rerunning
# this script with the same command resumes (finished results are skipped).
set -euo pipefail
usage() { sed -n '2,7p' "$0" >&2; exit 2; }
setup_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --setup-only) setup_only=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_vm.sh: unknown option $1 (put the command after --)" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || [ "$setup_only" = 1 ] || usage
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${TPU_ZONE:?set TPU_ZONE, e.g. us-central2-b}"
RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}
REPO_DIR=${TPU_REPO_DIR:-'~/bob_jax'}
EXTRAS=${TPU_EXTRAS:-tpu}
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$TPU_ZONE")
[ -n "${TPU_PROJECT:-}" ] && where+=(--project "$TPU_PROJECT")
cd "$(dirname "$0")/.."

if ! "${gc[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  : "${TPU_TYPE:?slice $TPU_NAME does not exist; set TPU_TYPE (e.g. v4-32) to create it}"
  spot=()
  [ "${TPU_SPOT:-0}" = 1 ] && spot=(--spot)
  echo "creating $TPU_NAME ($TPU_TYPE, $RUNTIME) in $TPU_ZONE"
  "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$TPU_TYPE" --version "$RUNTIME" "${spot[@]}"
fi

# The committed tree only: reproducible, and no venv or run directories are copied.
archive=$(mktemp -t bob_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD
echo "copying $(git rev-parse --short HEAD) to every worker of $TPU_NAME"
"${gc[@]}" scp "$archive" "$TPU_NAME:bob_jax.tar.gz" "${where[@]}" --worker=all

setup="set -e; mkdir -p $REPO_DIR && tar -xzf ~/bob_jax.tar.gz -C $REPO_DIR && cd $REPO_DIR"
setup+=" && { [ -d .venv ] || python3 -m venv .venv; } && . .venv/bin/activate"
setup+=" && pip install -q -e '.[$EXTRAS]'"
if [ -n "${TPU_MOUNT:-}" ]; then
  bucket=${TPU_MOUNT%%:*} mountpoint=${TPU_MOUNT#*:}
  setup+=" && { mountpoint -q $mountpoint || { sudo mkdir -p $mountpoint && sudo chown \$USER $mountpoint"
  setup+=" && gcsfuse --implicit-dirs $bucket $mountpoint; }; }"
fi
"${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$setup"
[ "$setup_only" = 1 ] && exit 0

# Quote the user's command once for the remote shell.
cmd=$(printf '%q ' "$@")
echo "running on all workers: $cmd"
"${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all \
  --command "cd $REPO_DIR && . .venv/bin/activate && $cmd"
