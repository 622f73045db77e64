#!/usr/bin/env bash
# The evidence experiments (issue 14) on one GPU. At tiny scale one run leaves an H200 mostly idle
# (300 steps of 8 x 256 tokens: ~60 s, launch-bound), so every run of an experiment trains at
# once (--parallel: each its own python -m train), and `all` starts the five experiments at once
# too (17 runs: load_balance's 3 bias-update speeds on top of the other four's 14), each under a
# wall-time budget: runs still going at the budget are stopped and reported as far as they got
# ("stopped at step k of n").
#
#   bash bench/experiments/gpu.sh OUT_DIR all [SCALE] [BUDGET_S]       # all five at once (~BUDGET_S + 30 s)
#   bash bench/experiments/gpu.sh OUT_DIR hyper_connections|optim|sparse_attention|spike_detector|load_balance \
#        [SCALE] [script args...]                                     # one of them
#
# SCALE: tiny (default) or small. BUDGET_S (all; default 190): each experiment's budget, from its
# start; with 17 runs at once at tiny scale expect ~1.5-2.5x one run's time (startup ~15-25 s;
# the 3 more runs than the four-experiment `all` may leave more runs stopped short of 300 steps).
# In `all`, optim sweeps 2 lrs (OPTIM_LRS, default "0.01 0.03"; its report says the grid is
# smaller than the scale's default) so that 17 runs share the GPU, not 19.
# Each experiment's output: OUT_DIR/<experiment>.log (which run started, finished, failed or was
# stopped, with the path of each run's own log), the plot, CSV and table under OUT_DIR/results,
# the runs under OUT_DIR/work/<experiment>/ (metrics.jsonl, .hydra/, train.log; checkpoints are
# deleted). Re-plot later from the returned runs, without training (any machine):
#   python -m bench.experiments.<experiment> --scale SCALE --device cpu --reuse \
#       --work OUT_DIR/work --out bench/results [the same script args]
# (the device, date and command come from OUT_DIR/work/<experiment>/experiment.json: the files
# are named <experiment>-h200-<date>.{md,svg,csv}.)
# Expects the project's dependencies importable (see bench/scaling_gpu.sh for an air-gapped image).
set -uo pipefail
EXPERIMENTS="hyper_connections optim sparse_attention spike_detector load_balance"
USAGE="usage: bench/experiments/gpu.sh OUT_DIR all|${EXPERIMENTS// /|} [tiny|small] [BUDGET_S | script args...]"
OUT=${1:?$USAGE}
EXP=${2:?$USAGE}
SCALE=${3:-tiny}
shift $(( $# >= 3 ? 3 : 2 ))
case " all $EXPERIMENTS " in *" $EXP "*) ;; *) echo "gpu.sh: unknown experiment '$EXP'; $USAGE" >&2; exit 2;; esac
case "$SCALE" in tiny|small) ;; *) echo "gpu.sh: SCALE must be tiny or small, got '$SCALE'; $USAGE" >&2; exit 2;; esac
mkdir -p "$OUT/results" "$OUT/work"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)

run_one() {   # experiment, then its script args; output to OUT/<experiment>.log
    local exp=$1; shift
    $PY -m bench.experiments."$exp" --scale "$SCALE" --device cuda --threads 1 \
        --out "$OUT/results" --work "$OUT/work" "$@" >"$OUT/$exp.log" 2>&1
}

rc=0
if [ "$EXP" = all ]; then
    BUDGET=${1:-190}
    declare -A PIDS
    for exp in $EXPERIMENTS; do
        extra=()
        [ "$exp" = optim ] && read -r -a lrs <<<"${OPTIM_LRS:-0.01 0.03}" && extra=(--lrs "${lrs[@]}")
        run_one "$exp" --budget-s "$BUDGET" ${extra[@]+"${extra[@]}"} &
        PIDS[$exp]=$!
    done
    for exp in $EXPERIMENTS; do
        wait "${PIDS[$exp]}"; r=$?
        echo "== $exp: exit $r after $(( $(date +%s) - start )) s (log $OUT/$exp.log)"
        [ "$r" -ne 0 ] && rc=$r && tail -5 "$OUT/$exp.log"
    done
else
    run_one "$EXP" "$@"; rc=$?
    echo "== $EXP: exit $rc after $(( $(date +%s) - start )) s (log $OUT/$EXP.log)"
    [ "$rc" -ne 0 ] && tail -15 "$OUT/$EXP.log"
fi
find "$OUT/work" -name checkpoints -prune -exec rm -rf {} +   # never ship checkpoints back
grep -h "stopped at the budget\|failed (exit\|nothing to report" "$OUT"/*.log 2>/dev/null | head -30
for md in "$OUT"/results/*.md; do [ -f "$md" ] && echo "---- $md" && sed -n '/^| /p' "$md" | head -14; done
echo "total $(( $(date +%s) - start )) s"
exit "$rc"
