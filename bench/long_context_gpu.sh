#!/usr/bin/env bash
# GPU calls for issue 12 (long context), each under 10 minutes, results under OUT_DIR:
#
#   bash bench/long_context_gpu.sh OUT_DIR bench     # step sweep 4K .. 4M, sparse (+ 4K..64K dense)
#   bash bench/long_context_gpu.sh OUT_DIR train     # python -m train experiment=long_gpu
#   bash bench/long_context_gpu.sh OUT_DIR eval RUN  # passkey 4K .. 1M + NLL buckets of a run
#
# Expects the project's dependencies importable (see bench/scaling_gpu.sh for an air-gapped
# image: launch/wheelhouse.sh --minimal, then PYTHONPATH=/tmp/site:$PWD).
set -uo pipefail
OUT=${1:?usage: bench/long_context_gpu.sh OUT_DIR bench|train|eval [RUN_DIR]}
WHAT=${2:?usage: bench/long_context_gpu.sh OUT_DIR bench|train|eval [RUN_DIR]}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$WHAT" in
  bench)
    # the sparse stages (64K on, the 1M stage) up to 4M, then the dense 4K/16K/64K steps
    # (64K dense = the indexer warm-up's attention); each sweep stops at its first OOM
    $PY bench/long_context.py --out "$OUT" --mode sparse --lengths 4096,16384,65536,262144,1048576,4194304
    $PY bench/long_context.py --out "$OUT" --mode dense --lengths 4096,16384,65536
    ;;
  train)
    $PY -m train experiment=long_gpu "hydra.run.dir=$OUT/long_gpu" 2>&1 | tee "$OUT/long_gpu.log" | grep -vE '^\s*$' | tail -60
    ;;
  eval)
    RUN=${3:?eval needs the run directory}
    $PY -m train.eval "$RUN" --out "$OUT" --lengths 4096,16384,65536,262144,1048576 --trials 2
    $PY bench/plot_eval.py "$OUT/eval.json" --out "$OUT/long_context_eval.svg"
    ;;
  *) echo "unknown step $WHAT: bench | train | eval"; exit 2 ;;
esac
