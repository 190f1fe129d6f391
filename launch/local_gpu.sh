#!/usr/bin/env bash
# Run a bob_jax job on the GPUs of this machine (single host).
#
#   launch/local_gpu.sh configs/battle.py runs/battle [--config.key=value ...]
#
# Installs the CUDA 13 JAX plugin into ./.venv on first use (it reuses torch's CUDA 13 libraries when
# the [reference] extra is installed), keeps JAX from pre-allocating the whole GPU, and runs the job.
set -euo pipefail
config=${1:?usage: launch/local_gpu.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local_gpu.sh CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -c "import jax_cuda13_plugin" 2>/dev/null || pip install -e '.[offline,cuda13]'
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('devices:', d)"
exec python -m bob_jax.main --config="$config" --workdir="$workdir" "$@"
