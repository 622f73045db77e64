#!/usr/bin/env bash
# One GPU call for issue 16 (throughput on one H200), < 9.5 minutes, 6 files under OUT_DIR:
#
#   COMMIT=<main's hash> bash bench/throughput_gpu.sh OUT_DIR
#
# 1. bench/throughput.py --check: every Triton kernel the small model runs vs its reference on
#    the GPU (MoE router / SwiGLU / permute, RoPE, RMSNorm, sparse attention, indexer, mHC, a
#    whole MoE layer), model.compile=block vs eager; then the interleaved throughput table:
#    kernels as auto / all / none, eager vs blocks compiled, 1 x 4K and 2 x 4K, mHC vs residual,
#    the dense GPT peer eager and compiled (checks.md, throughput.md, profiles.md).
# 2. python -m train experiment=small_gpu for 20 optimizer steps of 8 micro-batches (2 x 4K):
#    the preset's micro batch, 1/8 of its 64 accumulation steps so that 20 steps fit the call
#    (the optimizer's share per token is 8x the preset's: a lower bound on its tok/s); its
#    steady state (median after 5 steps) appended to throughput.md; train.log = its log tail.
#    TRAIN_EXTRA="model.compile=block" adds overrides to that run.
# 3. bench/mhc.py --ops site: what one mHC site launches (mhc_site.md). bench.log: the bench's output.
#
# Expects the project's dependencies importable (the trainer needs DeepSpeed and Hydra; on an
# air-gapped image: `bash launch/wheelhouse.sh --minimal .whl` where pip works, carry .whl, then
# pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD).
set -uo pipefail
OUT=${1:?usage: bench/throughput_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 320 $PY bench/throughput.py --check --out "$OUT" --budget 295 2>&1 | grep -vE '^\s*$' \
    | grep -vE '^(W|I)[0-9]{4} ' > "$OUT/bench.log"
echo "throughput.py exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 ))s"; tail -5 "$OUT/bench.log"
# what one mHC site launches (reference / Triton / compiled), forward and forward+backward
timeout 70 $PY bench/mhc.py --ops site --site-tokens 4096 2>&1 | grep -E '^\||^device' > "$OUT/mhc_site.md"
echo "mhc site done after $(( $(date +%s) - T0 ))s"
RUN=/tmp/hybridlm_small_gpu
rm -rf "$RUN"
STEP_TOKENS=65536   # 8 micro-batches of 2 x 4K
timeout 165 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" train.global_batch_tokens=$STEP_TOKENS \
    train.tokens=$(( 20 * STEP_TOKENS )) train.val_every=0 train.ckpt_every=0 data.val_batches=2 optim.warmup_steps=2 \
    logging.wandb.mode=disabled train.progress=false ${TRAIN_EXTRA:-} > /tmp/train_small.log 2>&1
echo "train exit $? after $(( $(date +%s) - T0 ))s"
tail -40 /tmp/train_small.log > "$OUT/train.log"
if [ -f "$RUN/metrics.jsonl" ]; then
    $PY bench/throughput.py --out "$OUT" --train-metrics "$RUN/metrics.jsonl" \
        --train-label "python -m train experiment=small_gpu train.global_batch_tokens=$STEP_TOKENS (20 steps)"
else
    echo "no metrics.jsonl: see train.log"; tail -20 /tmp/train_small.log
fi
cat "$OUT/throughput.md"
echo "done after $(( $(date +%s) - T0 ))s"
