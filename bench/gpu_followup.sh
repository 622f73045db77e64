#!/usr/bin/env bash
# The GPU measurements still owed (issue 16 open; 13 and 14 ended blocked, their parts kept), in parts
# that fit one H200 device call each or together, most important first; each part under its own limit.
#
#   bash bench/gpu_followup.sh OUT_DIR [PART ...]     # default: idxtune attntune balance graph8
#
#   experiments  issue 14: all evidence experiments at tiny scale at once (bench/experiments/gpu.sh all;
#                ~190 s); the runs and reports come back as OUT_DIR/exp.tgz (re-plot: gpu.sh's header)
#   trainer      issue 16: python -m train experiment=small_gpu (its 4 x 4K micro-batch) for 10 steps
#                of 32 x 4K: tok/s, MFU, peak memory, routing balance (OUT_DIR/trainer_metrics.jsonl; ~125 s)
#   cp1          issue 13: the trainer's step through the context-parallel path on a one-rank group
#                vs the plain path, interleaved (bench/cp1_step.py; ~60 s)
#   mhc          issue 16: one mHC site, checks + unfused vs fused vs compiled, Sinkhorn backward
#                saved vs recomputed (bench/mhc.py --ops site; ~80 s)
#   peers        issue 16: hybridlm vs transformers' eager V4 vs torchtitan DeepSeek-V3 vs the dense GPT
#                at 1 x 4K (bench/peers.py; needs the --peers wheels of launch/wheelhouse.sh; ~75 s here,
#                the full table at 4K and 16K wants its own call: `python3 bench/peers.py --out OUT`)
#   tp4          issue 16: MoE kernels and compiled blocks at 4 x 4K, interleaved (bench/throughput.py; ~130 s)
#   launches     issue 16: bench/launches.py's CPU-side launch count beside the profiler's (calibrates
#                its table of Triton launches; the CPU count at 1 x 1024 takes ~1-2 min)
#   compiled     issue 16: the trainer as `trainer` with model.compile=block (compiling + 8 steps did not fit
#                170 s on 2026-12-03: 300 s here; OUT_DIR/compiled_metrics.jsonl)
#   matmul       issue 16: the compressor's/router's bf16 -> fp32 GEMM forms, fwd+bwd (bench/matmul_fp32_out.py; ~30 s)
#   loss         issue 16: the LM-head loss's per-chunk Triton kernel vs its torch reference at 16384 x 1024
#                -> 129280 bf16: checks, tile sweep, linear_cross_entropy fwd+bwd both ways (bench/cross_entropy.py;
#                < 60 s); tp4's auto vs all variants differ only by this kernel (held back from auto)
#   mhcpre       issue 16: the mHC site pre, fused vs split (autotuned) per kernel with GB/s (bench/mhc.py --ops pre; ~40 s)
#   mhchead      issue 16: the stream head (HyperHead), reference vs mhc_head_triton (autotuned): checks, per kernel
#                with GB/s, fwd+bwd ms at 16K tokens (bench/mhc.py --ops head; ~30 s); the trace had ~49 ms per step
#   attntune     issue 16: sparse-attention tiles, old vs autotuned, checked (bench/attention.py --tune; ~60-120 s)
#   idxtune      issue 16: indexer-loss tiles old vs autotuned, top-k sorted vs unsorted sets, the new dense forms
#                checked and timed against the old (dk atomics -> key-major dense, mass gather -> dense tiles;
#                expected ~1.20 -> ~0.65 ms and ~0.54 -> ~0.2 ms a launch, unmeasured) (bench/indexer_loss.py; ~90 s)
#   balance      MoE MaxVio per layer at small_gpu's bias speed 0.01, 15 steps (bench/moe_balance_gpu.sh; ~100 s)
#   graph8       issue 16: the preset (8 x 4K) eager vs train.cuda_graph=true, 4 steps of 524K tokens each (~250 s):
#                make graphs the preset's default if they win with the same losses
#   base8        issue 16: the preset (8 x 4K) eager, 4 steps of 524K tokens, run from an older tree of the project
#                (BASE_TREE, default .carry/base: `mkdir -p .carry/base && git archive <rev> | tar -x -C .carry/base`,
#                carried) beside graph8's run of this tree in the same call: what the commits between did
#                (~110 s; OUT_DIR/base8.jsonl; the tree's commit in OUT_DIR/summary.txt: BASE_REV, or the tree's .rev file)
#   attnglue     issue 16: the attention glue rework (q/kv norm with RoPE fused, o's RoPE^-1 + wo_a without
#                copies, dx un-rotated in place): its kernel tests on CUDA, then old vs new fwd+bwd at 4 x 4K
#                (bench/attn_glue.py; ~60 s; OUT_DIR/attn_glue.md)
#   graphstep    issue 16: train.cuda_graph=false vs true in python -m train experiment=small_gpu, 10 steps
#                each at 1 x 4K and 4 x 4K (bench/graph_step.py: losses side by side, tok/s; ~200 s)
#
# Expects the project's dependencies importable (on the air-gapped image: install the carried
# wheels into /tmp/site and put it on PYTHONPATH, see bench/throughput_gpu.sh).
set -uo pipefail
OUT=${1:?usage: bench/gpu_followup.sh OUT_DIR [experiments|trainer|cp1|mhc|peers|tp4|launches|graphstep|loss ...]}
shift
PARTS=${*:-idxtune attntune balance graph8}
for part in $PARTS; do   # refuse a misspelled part before any GPU time is spent
  case $part in experiments|trainer|compiled|matmul|cp1|mhc|peers|tp4|launches|graphstep|loss|mhcpre|mhchead|attntune|idxtune|balance|graph8|base8|attnglue) ;;
    *) echo "gpu_followup.sh: unknown part '$part' (experiments trainer compiled matmul cp1 mhc peers tp4 launches graphstep loss mhcpre mhchead attntune idxtune balance graph8 base8 attnglue)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
TMP=${TMPDIR:-/tmp}   # scratch: logs and run directories of this call
T0=$(date +%s)
el() { echo "$1 after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/summary.txt" 2>&1
for part in $PARTS; do
  case $part in
    experiments)
      timeout 200 bash bench/experiments/gpu.sh "$OUT/exp" all tiny 150 > $TMP/exp_all.log 2>&1; el "experiments exit $?"
      tail -80 $TMP/exp_all.log > "$OUT/exp_all.log"
      tar -C "$OUT" -czf "$OUT/exp.tgz" exp && rm -rf "$OUT/exp" ;;
    trainer)
      RUN=$TMP/hybridlm_followup_trainer; rm -rf "$RUN"
      timeout 125 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" train.global_batch_tokens=131072 \
        train.tokens=$(( 10 * 131072 )) train.val_every=0 train.ckpt_every=0 data.val_batches=2 optim.warmup_steps=2 \
        logging.wandb.mode=disabled train.progress=false > $TMP/followup_trainer.log 2>&1; el "trainer exit $?"
      tail -30 $TMP/followup_trainer.log > "$OUT/trainer.log"
      cp "$RUN/metrics.jsonl" "$OUT/trainer_metrics.jsonl" 2>/dev/null ;;
    compiled)
      RUN=$TMP/hybridlm_followup_compiled; rm -rf "$RUN"
      timeout 300 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" train.global_batch_tokens=131072 \
        train.tokens=$(( 8 * 131072 )) train.val_every=0 train.ckpt_every=0 data.val_batches=1 optim.warmup_steps=2 \
        model.compile=block logging.wandb.mode=disabled train.progress=false > $TMP/followup_compiled.log 2>&1
      el "trainer compiled exit $?"; tail -30 $TMP/followup_compiled.log > "$OUT/compiled.log"
      cp "$RUN/metrics.jsonl" "$OUT/compiled_metrics.jsonl" 2>/dev/null ;;
    attnglue)
      timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/kernels/test_rms_norm_kernel.py tests/kernels/test_rope_kernel.py \
        tests/model/test_grouped_linear.py tests/model/test_matmul.py > "$OUT/attn_glue_tests.log" 2>&1; el "attnglue tests exit $?"
      timeout 120 $PY bench/attn_glue.py > "$OUT/attn_glue.md" 2>&1; el "attnglue bench exit $?" ;;
    matmul)
      timeout 40 $PY bench/matmul_fp32_out.py --rounds 3 > "$OUT/matmul.md" 2>&1; el "matmul exit $?" ;;
    cp1)
      timeout 60 $PY bench/cp1_step.py --preset small --seq 4096 --out "$OUT" --budget 20 > "$OUT/cp1.log" 2>&1; el "cp1 exit $?" ;;
    mhc)
      timeout 80 $PY bench/mhc.py --ops site > $TMP/followup_mhc.log 2>&1; el "mhc site exit $?"
      grep -vi warn $TMP/followup_mhc.log | tail -60 > "$OUT/mhc_site.txt" ;;
    peers)
      timeout 75 $PY bench/peers.py --out "$OUT/peers" --seqs 4096 --budget 65 --rounds 2 \
        --rows hybridlm-eager hybridlm-graph hf-eager dense-compiled titan-eager > "$OUT/peers.log" 2>&1; el "peers exit $?" ;;
    tp4)
      timeout 130 $PY bench/throughput.py --out "$OUT/tp4" --budget 120 --rounds 2 \
        --variants mhc-eager-auto-4x mhc-eager-all-4x mhc-compiled-auto-4x > $TMP/followup_tp4.log 2>&1
      el "throughput 4x exit $?"; grep -vE '^(W|I)[0-9]{4} ' $TMP/followup_tp4.log | tail -8 > "$OUT/tp4.log" ;;
    loss)
      timeout 90 $PY bench/cross_entropy.py --out "$OUT/cross_entropy.md" > "$OUT/cross_entropy.log" 2>&1; el "loss exit $?" ;;
    mhcpre)
      timeout 100 $PY bench/mhc.py --ops pre > $TMP/followup_mhcpre.log 2>&1; el "mhc pre exit $?"
      grep -vi warn $TMP/followup_mhcpre.log | tail -70 > "$OUT/mhc_pre.txt" ;;
    mhchead)
      timeout 90 $PY bench/mhc.py --ops head > $TMP/followup_mhchead.log 2>&1; el "mhc head exit $?"
      grep -vi warn $TMP/followup_mhchead.log | tail -50 > "$OUT/mhc_head.txt" ;;
    attntune)
      timeout 300 $PY bench/attention.py --tune --out "$OUT/attention-tune.md" > "$OUT/attntune.log" 2>&1; el "attention tune exit $?" ;;
    idxtune)
      timeout 240 $PY bench/indexer_loss.py --out "$OUT" > "$OUT/idxtune.log" 2>&1; el "indexer tune exit $?" ;;
    balance)
      timeout 150 bash bench/moe_balance_gpu.sh "$TMP/balance" > "$OUT/balance.log" 2>&1; el "balance exit $?"
      cp "$TMP/balance/maxvio.md" "$OUT/maxvio.md" 2>/dev/null ;;
    graph8)
      for g in false true; do
        RUN=$TMP/hybridlm_followup_graph8_$g; rm -rf "$RUN"
        timeout 140 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" train.tokens=$(( 4 * 524288 )) train.val_every=0 \
          train.ckpt_every=0 data.val_batches=1 optim.warmup_steps=2 train.cuda_graph=$g logging.wandb.mode=disabled \
          train.progress=false > $TMP/followup_graph8_$g.log 2>&1; el "preset cuda_graph=$g exit $?"
        cp "$RUN/metrics.jsonl" "$OUT/graph8_$g.jsonl" 2>/dev/null
      done ;;
    base8)
      BASE=$(cd "${BASE_TREE:-.carry/base}" 2>/dev/null && pwd)
      if [ -z "$BASE" ] || [ ! -f "$BASE/train/__main__.py" ]; then
        el "base8 skipped: BASE_TREE=${BASE_TREE:-.carry/base} holds no project tree (git archive <rev> | tar -x -C it)"
        continue
      fi
      BASE_REV=${BASE_REV:-$(cat "$BASE/.rev" 2>/dev/null)}
      RUN=$TMP/hybridlm_followup_base8; rm -rf "$RUN"
      # the older tree first on the path (its train/, model/, kernels/), the carried wheels after it
      (cd "$BASE" && PYTHONPATH="$BASE:${PYTHONPATH:-}" timeout 140 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" \
        train.tokens=$(( 4 * 524288 )) train.val_every=0 train.ckpt_every=0 data.val_batches=1 optim.warmup_steps=2 \
        logging.wandb.mode=disabled train.progress=false > $TMP/followup_base8.log 2>&1); el "base8 (${BASE_REV:-older tree}) exit $?"
      tail -20 $TMP/followup_base8.log > "$OUT/base8.log"
      cp "$RUN/metrics.jsonl" "$OUT/base8.jsonl" 2>/dev/null ;;
    launches)
      timeout 150 $PY bench/launches.py --preset small --seq 1024 --cuda > "$OUT/launches.txt" 2>&1; el "launches exit $?" ;;
    graphstep)
      timeout 240 $PY bench/graph_step.py --out "$OUT/graphstep" --steps 10 --budget 228 --python "$PY" \
        > "$OUT/graphstep.log" 2>&1; el "graphstep exit $?" ;;
  esac
done
el "done"
