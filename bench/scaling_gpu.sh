#!/usr/bin/env bash
# One GPU call for issue 5's scaling table: bench/scaling.py on 1, 2 and 4 GPUs of one host.
#
#   bash bench/scaling_gpu.sh OUT_DIR [GPU_COUNTS] [extra bench/scaling.py args...]
#
# Expects the project's dependencies importable. On an air-gapped image that has torch (as our
# H200 machines): `bash launch/wheelhouse.sh --minimal .whl` where pip works, carry .whl, then
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD Writes OUT_DIR/scaling.jsonl, one log per GPU count and
# OUT_DIR/scaling.md (the table to commit under bench/results/).
set -uo pipefail
OUT=${1:?usage: bench/scaling_gpu.sh OUT_DIR [GPU_COUNTS] [args...]}
COUNTS=${2:-"1 2 4"}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
for n in $COUNTS; do
    echo "=== $n GPU(s) ==="
    torchrun --standalone --nproc_per_node "$n" bench/scaling.py --out "$OUT/scaling.jsonl" "$@" \
        >"$OUT/scaling-$n.log" 2>&1
    echo "exit $?"; grep -E '^\{' "$OUT/scaling-$n.log" | cut -c1-300
    grep -iE 'error|Traceback' "$OUT/scaling-$n.log" | head -5
done
python3 bench/scaling.py --report "$OUT/scaling.jsonl" | tee "$OUT/scaling.md"
