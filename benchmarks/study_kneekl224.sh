#!/usr/bin/env bash
# The whole study on the real kneeKL224 crops (Chen 2018, doi:10.17632/56rmx5bjcr.1; OAI-derived):
#   train on kneeKL224 train, select models on a patient-level 10% hold-out of train,
#   report on kneeKL224 val (kept out of training and model selection; called 'test' in the runs).
# Uses whatever weights are available: WEIGHTS=none (default; offline = random init) or auto.
# Sized for a 2-core CPU in under two hours; on a GPU set DEVICE=cuda IMG=224 and more epochs.
#   nohup bash benchmarks/study_kneekl224.sh > results/study_kneekl224.log 2>&1 &
# Order: ResNet18 -> embeddings + MLP head -> report -> ConvNeXt -> report again, so a report of
# the first two approaches exists even if the ConvNeXt run is cut short.
set -euo pipefail
cd "$(dirname "$0")/.."
KL=${KL:-../shared/data/kneeKL224}
OUT=${OUT:-results/study_kneekl224}
WEIGHTS=${WEIGHTS:-none}
DEVICE=${DEVICE:-auto}
IMG=${IMG:-192}  # ResNet18 (the issue-3 cpu1h recipe: 192 px, 30 epochs, ~50 min with bf16 on 2 cores)
IMG_CNX=${IMG_CNX:-128}  # ConvNeXt is ~10x slower per image on this CPU
EPOCHS_R18=${EPOCHS_R18:-30}
EPOCHS_CNX=${EPOCHS_CNX:-8}
BATCH=${BATCH:-32}
BACKBONE=${BACKBONE:-biomedclip}
SEED=${SEED:-0}
N_BOOT=${N_BOOT:-2000}
BIN=${BIN:-.venv/bin/klgrade}  # without the venv: BIN="python3 -m klgrade.cli" PYTHONPATH=src
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [[ ! -f "$OUT/data/manifest.csv" ]]; then
  log "prepare: kneeKL224 -> $OUT/data (its val kept for the report as 'test')"
  $BIN prepare folders "$KL" --out "$OUT/data"
  $BIN split "$OUT/data" --rename val=test --holdout 0.1 --seed "$SEED"
fi

train() {  # model img epochs lr extra...
  local m=$1 img=$2 e=$3 lr=$4; shift 4
  if [[ -f "$OUT/runs/$m/metrics_test.json" ]]; then log "$m: done already"; return; fi
  if [[ -f "$OUT/runs/$m/last.pt" ]]; then log "$m: resuming"; $BIN train --resume "$OUT/runs/$m"; return; fi
  log "train $m ($WEIGHTS weights, ${img}px, $e epochs)"
  $BIN train --data "$OUT/data" --model "$m" --weights "$WEIGHTS" --img-size "$img" --epochs "$e" \
    --batch-size "$BATCH" --lr "$lr" --seed "$SEED" --device "$DEVICE" "$@" --out "$OUT/runs/$m"
}
compare() {
  local runs=() names=()
  for r in convnext_tiny:ConvNeXt resnet18:ResNet18 "${BACKBONE}_mlp:${BACKBONE}+MLP"; do
    [[ -f "$OUT/runs/${r%%:*}/metrics_test.json" ]] && runs+=("$OUT/runs/${r%%:*}") && names+=("${r#*:}")
  done
  log "compare ${names[*]} on kneeKL224 val"
  $BIN compare "${runs[@]}" --names "$(IFS=,; echo "${names[*]}")" --split test --n-boot "$N_BOOT" \
    --seed "$SEED" --out "$OUT/report"
}

train resnet18 "$IMG" "$EPOCHS_R18" 2e-3
log "embed with $BACKBONE ($WEIGHTS weights)"
$BIN embed --data "$OUT/data" --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" \
  --out "$OUT/embeddings/$BACKBONE"
[[ -f "$OUT/runs/${BACKBONE}_mlp/metrics_test.json" ]] || $BIN fit-head --embeddings "$OUT/embeddings/$BACKBONE" \
  --data "$OUT/data" --head mlp --seed "$SEED" --out "$OUT/runs/${BACKBONE}_mlp"
compare
train convnext_tiny "$IMG_CNX" "$EPOCHS_CNX" 5e-4 --drop-path-rate 0.1
compare
log "done: $OUT/report/report.html"
