#!/usr/bin/env bash
# GPU training-step check in under 5 minutes: JAX (forward + cross-entropy backward + AdamW, one jitted
# step with donated buffers) against timm eager and torch.compile (bf16 autocast, fused AdamW,
# channels_last convnets), batch 128, bf16, same process and GPU.
#
#   launch/gpu_train_check.sh [OUTDIR]  # OUTDIR defaults to $OUT, else ./gpu_train_check_out
#
# Same box as launch/gpu_check.sh (jax CUDA, flax, optax, torch, timm; no grain/tfds/ml_collections;
# no downloads). Pass 1 times JAX + timm eager training for every model in one process; pass 2 adds
# torch.compile training (its backward compile takes 30-90 s) for the models that matter most while
# time remains. The report ($OUTDIR/bench/bench.{json,md}) is rewritten after every stage.
# Knobs as in gpu_check.sh: GPU_CHECK_SECONDS, GPU_CHECK_MODELS, GPU_CHECK_COMPILE_MODELS, GPU_CHECK_BATCH.
set -u
OUTDIR=${1:-${OUT:-gpu_train_check_out}}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TOTAL=${GPU_CHECK_SECONDS:-290}
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
# (never 0: `timeout 0` would mean no limit at all)
step_timeout() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }
status=0

python -c "import jax, torch; print('jax', jax.__version__, jax.devices()[0].device_kind, \
'| torch', torch.__version__, torch.cuda.get_device_name())" > "$OUTDIR/env.log" 2>&1
cat "$OUTDIR/env.log"

MODELS=${GPU_CHECK_MODELS:-resnet50.a1_in1k,convnext_base.fb_in1k,swin_base_patch4_window7_224.ms_in1k,\
swinv2_base_window8_256.ms_in1k@256,vit_base_patch16_224.augreg_in1k,vit_base_patch14_dinov2.lvd142m,\
eva02_base_patch14_224.mim_in22k}
COMPILE_MODELS=${GPU_CHECK_COMPILE_MODELS-"vit_base_patch16_224.augreg_in1k resnet50.a1_in1k convnext_base.fb_in1k"}
BENCH=(python -m bob_jax.bench --train --no-forward --batch ${GPU_CHECK_BATCH:-128} --dtype bfloat16 --repeats 3 --warmup 3
       --iters 5 --compare-timm --append --workdir "$OUTDIR/bench")

echo "== pass 1: JAX + timm eager training step, all models in one process"
timeout -k 5 "$(step_timeout 200)" "${BENCH[@]}" --models "$MODELS" --no-torch-compile > "$OUTDIR/train_eager.log" 2>&1
rc=$?
[ "$rc" -ne 0 ] && { echo "  exit code $rc (see train_eager.log)"; status=1; }

echo "== pass 2: torch.compile training while time remains"
for m in $COMPILE_MODELS; do
  if [ "$(left)" -lt 40 ]; then echo "deadline: no torch.compile for $m"; continue; fi
  echo "-- $m"
  timeout -k 5 "$(step_timeout 120)" "${BENCH[@]}" --models "$m" --torch-compile --no-timm-eager --no-jax \
    >> "$OUTDIR/train_compile.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && { echo "  exit code $rc (see train_compile.log)"; status=1; }
done
[ -f "$OUTDIR/bench/bench.md" ] && cat "$OUTDIR/bench/bench.md"
echo "elapsed $((SECONDS - START)) s; results in $OUTDIR"
exit $status
