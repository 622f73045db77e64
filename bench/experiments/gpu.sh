#!/usr/bin/env bash
# One GPU call per evidence experiment (issue 14), each meant for one call of under 10 minutes
# on one H200; plot, CSV and table under OUT_DIR/results, the runs (metrics.jsonl, .hydra/,
# train logs; checkpoints are deleted once read) under OUT_DIR/work/<experiment>:
#
#   bash bench/experiments/gpu.sh OUT_DIR hyper_connections [SCALE] [script args...]
#   bash bench/experiments/gpu.sh OUT_DIR optim             [SCALE] [script args...]
#   bash bench/experiments/gpu.sh OUT_DIR sparse_attention  [SCALE] [script args...]
#   bash bench/experiments/gpu.sh OUT_DIR spike_detector    [SCALE] [script args...]
#
# SCALE: tiny (default) or small. Re-plot later from the returned runs without training:
#   python -m bench.experiments.<experiment> --scale SCALE --device cpu --reuse \
#       --work OUT_DIR/work --out bench/results --tag <experiment>-h200-<date>
# (--device cpu only names the device in the report: pass --tag to keep the GPU's name.)
# Expects the project's dependencies importable (see bench/scaling_gpu.sh for an air-gapped image).
set -uo pipefail
USAGE="usage: bench/experiments/gpu.sh OUT_DIR hyper_connections|optim|sparse_attention|spike_detector [tiny|small] [args...]"
OUT=${1:?$USAGE}
EXP=${2:?$USAGE}
SCALE=${3:-tiny}
shift $(( $# >= 3 ? 3 : 2 ))
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
$PY -m bench.experiments."$EXP" --scale "$SCALE" --device cuda --out "$OUT/results" --work "$OUT/work" "$@" \
    2>&1 | tee "$OUT/$EXP.log"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start )) s"
find "$OUT/work" -name checkpoints -prune -exec rm -rf {} +   # never ship checkpoints back
cat "$OUT"/results/*.md 2>/dev/null | tail -40
exit "$rc"
