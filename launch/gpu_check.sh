#!/usr/bin/env bash
# GPU check in under 5 minutes: float32 reference parity on the GPU, then the bf16 batch-256 forward
# benchmark against timm eager and torch.compile in the same process.
#
#   launch/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./gpu_check_out
#
# For a GPU box with jax (CUDA), flax, optax, torch, timm and pytest installed -- no grain, tfds or
# ml_collections needed, nothing is downloaded (random init). Run from anywhere; it works in the
# checkout with PYTHONPATH=. Every step has a bounded `timeout` inside an overall deadline, and the
# report ($OUTDIR/bench/bench.{json,md}) is rewritten after each model and each stage, so a run cut
# off still leaves every finished number. Logs: $OUTDIR/*.log.
#
# Knobs (for a dry run on CPU: JAX_PLATFORMS=cpu GPU_CHECK_PARITY=0 GPU_CHECK_MODELS=resnet50.a1_in1k@32
# GPU_CHECK_BATCH=2 GPU_CHECK_COMPILE_MODELS=): GPU_CHECK_SECONDS (overall deadline, default 290),
# GPU_CHECK_MODELS, GPU_CHECK_COMPILE_MODELS, GPU_CHECK_BATCH, GPU_CHECK_PARITY=0 (skip parity).
#
# Pass 1 times JAX + timm eager for all models in one process; pass 2 adds torch.compile (10-50 s per
# model, one process each) to the same rows while time remains (ViT-B and ResNet-50 first).
set -u
OUTDIR=${1:-${OUT:-gpu_check_out}}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}  # tests/conftest.py defaults to cpu otherwise
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export BOB_JAX_REQUIRE_REFERENCE=1   # a missing torch/timm fails instead of skipping
TOTAL=${GPU_CHECK_SECONDS:-290}
START=$SECONDS
left() { echo $(( TOTAL - (SECONDS - START) )); }
# step_timeout WANTED: WANTED seconds, or what is left of the deadline when that is less.
# (never 0: `timeout 0` would mean no limit at all)
step_timeout() { local l; l=$(left); [ "$l" -lt 1 ] && l=1; if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import jax, flax, torch, timm; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
} > "$OUTDIR/env.log" 2>&1
cat "$OUTDIR/env.log"

if [ "${GPU_CHECK_PARITY:-1}" != 0 ]; then
echo "== parity: pytest -m 'reference and not slow' tests/models (float32, highest matmul precision)"
timeout -k 5 "$(step_timeout 100)" python -m pytest -m 'reference and not slow' tests/models -x -v -p no:cacheprovider \
  > "$OUTDIR/parity.log" 2>&1
rc=$?
tail -5 "$OUTDIR/parity.log"
echo "parity exit code $rc (124: cut off by the time limit); $(grep -c ' PASSED' "$OUTDIR/parity.log") passed," \
  "$(grep -c ' FAILED' "$OUTDIR/parity.log") failed, $(grep -c ' SKIPPED' "$OUTDIR/parity.log") skipped" \
  | tee -a "$OUTDIR/parity.log"
[ "$rc" -ne 0 ] && status=1
fi

# name@SIZE: SwinV2-B is a 256 px model; everything else (DINOv2 included) runs at 224.
MODELS=${GPU_CHECK_MODELS:-resnet50.a1_in1k,convnext_base.fb_in1k,swin_base_patch4_window7_224.ms_in1k,\
swinv2_base_window8_256.ms_in1k@256,vit_base_patch16_224.augreg_in1k,vit_base_patch14_dinov2.lvd142m,\
eva02_base_patch14_224.mim_in22k}
# Pass 2 order: the models whose torch.compile numbers matter most first.
COMPILE_MODELS=${GPU_CHECK_COMPILE_MODELS-"vit_base_patch16_224.augreg_in1k resnet50.a1_in1k convnext_base.fb_in1k \
eva02_base_patch14_224.mim_in22k vit_base_patch14_dinov2.lvd142m swin_base_patch4_window7_224.ms_in1k \
swinv2_base_window8_256.ms_in1k@256"}
BENCH=(python -m bob_jax.bench --batch ${GPU_CHECK_BATCH:-256} --dtype bfloat16 --repeats 3 --warmup 3 --iters 10
       --compare-timm --append --workdir "$OUTDIR/bench")

echo "== pass 1: JAX + timm eager, all models in one process"
timeout -k 5 "$(step_timeout 135)" "${BENCH[@]}" --models "$MODELS" --no-torch-compile > "$OUTDIR/bench_eager.log" 2>&1
rc=$?
[ "$rc" -ne 0 ] && { echo "  exit code $rc (see bench_eager.log)"; status=1; }

echo "== pass 2: torch.compile, added to the pass-1 rows, while time remains"
for m in $COMPILE_MODELS; do
  if [ "$(left)" -lt 30 ]; then echo "deadline: no torch.compile for $m"; continue; fi
  echo "-- $m"
  timeout -k 5 "$(step_timeout 80)" "${BENCH[@]}" --models "$m" --torch-compile --no-timm-eager --no-jax \
    >> "$OUTDIR/bench_compile.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && { echo "  exit code $rc (see bench_compile.log)"; status=1; }
done
[ -f "$OUTDIR/bench/bench.md" ] && cat "$OUTDIR/bench/bench.md"
echo "elapsed $((SECONDS - START)) s; results in $OUTDIR"
exit $status
