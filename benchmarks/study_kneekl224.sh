#!/usr/bin/env bash
# The whole study on the real kneeKL224 crops (Chen 2018, doi:10.17632/56rmx5bjcr.1; OAI-derived):
#   train on kneeKL224 train, select models on a patient-level hold-out of train,
#   report on kneeKL224 val (kept out of training and model selection).
# Uses whatever weights are available: WEIGHTS=none (default, offline: random init) or auto.
# Sized for about two hours of a 2-core CPU; on a GPU set DEVICE=cuda and bigger EPOCHS/IMG.
#   nohup bash benchmarks/study_kneekl224.sh > results/study_kneekl224.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
KL=${KL:-../shared/data/kneeKL224}
OUT=${OUT:-results/study_kneekl224}
WEIGHTS=${WEIGHTS:-none}
DEVICE=${DEVICE:-auto}
IMG=${IMG:-160}
EPOCHS_R18=${EPOCHS_R18:-16}
EPOCHS_CNX=${EPOCHS_CNX:-6}
BACKBONE=${BACKBONE:-biomedclip}
SEED=${SEED:-0}
BIN=${BIN:-.venv/bin/klgrade}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

log "prepare: kneeKL224 -> $OUT/data (val kept for the report as 'test')"
$BIN prepare folders "$KL" --out "$OUT/data"
$BIN split "$OUT/data" --rename val=test --holdout 0.1 --seed "$SEED"

log "train resnet18 ($WEIGHTS weights, ${IMG}px, $EPOCHS_R18 epochs)"
$BIN train --data "$OUT/data" --model resnet18 --weights "$WEIGHTS" --img-size "$IMG" \
  --epochs "$EPOCHS_R18" --seed "$SEED" --device "$DEVICE" --out "$OUT/runs/resnet18"
log "train convnext_tiny ($WEIGHTS weights, ${IMG}px, $EPOCHS_CNX epochs)"
$BIN train --data "$OUT/data" --model convnext_tiny --weights "$WEIGHTS" --img-size "$IMG" \
  --epochs "$EPOCHS_CNX" --seed "$SEED" --device "$DEVICE" --out "$OUT/runs/convnext_tiny"

log "embed with $BACKBONE ($WEIGHTS weights) and fit the MLP head"
$BIN embed --data "$OUT/data" --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" \
  --out "$OUT/embeddings/$BACKBONE"
$BIN fit-head --embeddings "$OUT/embeddings/$BACKBONE" --data "$OUT/data" --head mlp --seed "$SEED" \
  --out "$OUT/runs/${BACKBONE}_mlp"

log "compare on kneeKL224 val (reported as split 'test')"
$BIN compare "$OUT/runs/convnext_tiny" "$OUT/runs/resnet18" "$OUT/runs/${BACKBONE}_mlp" \
  --names "ConvNeXt,ResNet18,${BACKBONE}+MLP" --split test --n-boot 2000 --seed "$SEED" --out "$OUT/report"
log "done: $OUT/report/report.html"
