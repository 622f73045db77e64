#!/usr/bin/env bash
# GPU calls for issue 12 (long context), each meant for one call of under 10 minutes, results
# under OUT_DIR:
#
#   bash bench/long_context_gpu.sh OUT_DIR sparse     # step sweep 4K .. 1M, sparse attention
#   bash bench/long_context_gpu.sh OUT_DIR 4m         # one 4M-token step (if it fits)
#   bash bench/long_context_gpu.sh OUT_DIR dense      # 4K, 16K, 64K dense (64K = indexer warm-up)
#   bash bench/long_context_gpu.sh OUT_DIR train      # python -m train experiment=long_gpu
#   bash bench/long_context_gpu.sh OUT_DIR eval RUN   # passkey 4K .. 1M + NLL buckets of a run
#
# Expects the project's dependencies importable (see bench/scaling_gpu.sh for an air-gapped
# image: launch/wheelhouse.sh --minimal, then PYTHONPATH=/tmp/site:$PWD).
set -uo pipefail
USAGE="usage: bench/long_context_gpu.sh OUT_DIR sparse|4m|dense|train|eval [RUN_DIR]"
OUT=${1:?$USAGE}
WHAT=${2:?$USAGE}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$WHAT" in
  sparse)   # the sparse stages (64K on, 1M); the sweep stops at its first OOM or the budget
    $PY bench/long_context.py --out "$OUT" --mode sparse --budget-s 500 \
        --lengths 4096,16384,65536,262144,1048576
    ;;
  4m)
    $PY bench/long_context.py --out "$OUT" --mode sparse --warmup 0 --steps 1 --lengths 4194304
    ;;
  dense)    # the dense 4K/16K stages and the 64K indexer warm-up's attention
    $PY bench/long_context.py --out "$OUT" --mode dense --budget-s 500 --lengths 4096,16384,65536
    ;;
  train)
    $PY -m train experiment=long_gpu "hydra.run.dir=$OUT/long_gpu" 2>&1 | tee "$OUT/long_gpu.log" | grep -vE '^\s*$' | tail -60
    ;;
  eval)
    RUN=${3:?eval needs the run directory}
    $PY -m train.eval "$RUN" --out "$OUT" --lengths 4096,16384,65536,262144,1048576 --trials 2
    $PY bench/plot_eval.py "$OUT/eval.json" --out "$OUT/long_context_eval.svg"
    ;;
  *) echo "$USAGE"; exit 2 ;;
esac
