#!/usr/bin/env bash
# MoE load collapse on one GPU: experiment=small_gpu at 131072-token steps with a 2-step lr
# warm-up (the throughput benches' setting, where the learned routers collapsed: layer 11 MaxVio
# 1.14 -> 8.5 of 9.67 over steps 1-10 at V4's bias_update_speed 0.001; the preset now sets 0.01),
# once per router-bias speed.
#
#   bash bench/moe_balance_gpu.sh OUT_DIR              # SPEEDS="0.01" STEPS=15 by default
#   SPEEDS="0.01 0.001" STEPS=12 bash bench/moe_balance_gpu.sh OUT_DIR
#
# OUT_DIR/maxvio.md: per speed and step, the LM loss and moe/maxvio_step of every MoE layer
# (layers < model.n_hash_layers are hash-routed); OUT_DIR/<speed>/metrics.jsonl, train.log.
# ~100 s per speed on an H200 (start-up included).
set -uo pipefail
OUT=${1:?usage: bench/moe_balance_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}
STEPS=${STEPS:-15}
STEP_TOKENS=131072
T0=$(date +%s)
for speed in ${SPEEDS:-0.01}; do
  RUN=${TMPDIR:-/tmp}/hybridlm_moe_balance_$speed; rm -rf "$RUN"
  timeout 170 $PY -m train experiment=small_gpu "hydra.run.dir=$RUN" train.global_batch_tokens=$STEP_TOKENS \
    train.tokens=$(( STEPS * STEP_TOKENS )) train.val_every=0 train.ckpt_every=0 data.val_batches=1 \
    optim.warmup_steps=2 model.bias_update_speed=$speed logging.wandb.mode=disabled train.progress=false \
    > "$RUN.log" 2>&1
  echo "speed $speed: exit $? after $(( $(date +%s) - T0 )) s"
  mkdir -p "$OUT/$speed"; cp "$RUN/metrics.jsonl" "$OUT/$speed/" 2>/dev/null; tail -40 "$RUN.log" > "$OUT/$speed/train.log"
done
$PY - "$OUT" > "$OUT/maxvio.md" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*/metrics.jsonl")):
    rows = [json.loads(l) for l in open(path)]
    train = [r for r in rows if r.get("kind") == "train"]
    warn = [r for r in rows if r.get("event") == "moe_collapse"]
    if not train:
        continue
    layers = sorted((k.rsplit("/", 1)[1] for k in train[0] if k.startswith("moe/maxvio_step/")), key=int)
    print(f"## model.bias_update_speed={path.parent.name}\n")
    print("| step | LM loss | " + " | ".join(f"L{i}" for i in layers) + " |")
    print("|---" * (len(layers) + 2) + "|")
    for r in train:
        print(f"| {r['step']} | {r['loss/lm']:.3f} | " + " | ".join(f"{r['moe/maxvio_step/' + i]:.2f}" for i in layers) + " |")
    print(f"\ncollapse warnings: {[(w['step'], w['layers']) for w in warn] or 'none'}\n")
EOF
cat "$OUT/maxvio.md"
