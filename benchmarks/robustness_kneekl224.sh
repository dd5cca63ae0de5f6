#!/usr/bin/env bash
# Robustness of a trained kneeKL224 run (Chen 2018, doi:10.17632/56rmx5bjcr.1; OAI-derived) to site
# shifts: the kneeKL224 val images re-rendered under every controlled shift (zoom +-30%, off-centre,
# non-square, gamma 0.6/1.6, blur, noise, 16-bit, RGB), each through the canonical view.
# Issue-8 target: QWK drop <= 0.05 from clean under every shift, for the default training recipe.
#   RUN=results/study_kneekl224/runs/resnet18 DATA=results/study_kneekl224/data SPLIT=test \
#     bash benchmarks/robustness_kneekl224.sh
# (study_kneekl224.sh renames kneeKL224 val to 'test' in its dataset dir; with a dataset made by
#  `klgrade prepare folders` alone, use SPLIT=val.)
# Without RUN it first trains a short default-recipe resnet18 (site-shift augmentation on).
set -euo pipefail
cd "$(dirname "$0")/.."
KL=${KL:-../shared/data/kneeKL224}
OUT=${OUT:-results/robustness_kneekl224}
DATA=${DATA:-$OUT/data}
SPLIT=${SPLIT:-val}
DEVICE=${DEVICE:-auto}
WEIGHTS=${WEIGHTS:-none}
IMG=${IMG:-160}
EPOCHS=${EPOCHS:-16}
BIN=${BIN:-.venv/bin/klgrade}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [ ! -f "$DATA/manifest.csv" ]; then
  log "prepare: kneeKL224 -> $DATA"
  $BIN prepare folders "$KL" --out "$DATA"
fi
if [ -z "${RUN:-}" ]; then
  RUN=$OUT/runs/resnet18
  log "train resnet18 (default recipe, site_shift on; $WEIGHTS weights, ${IMG}px, $EPOCHS epochs)"
  $BIN train --data "$DATA" --model resnet18 --weights "$WEIGHTS" --img-size "$IMG" \
    --epochs "$EPOCHS" --device "$DEVICE" --out "$RUN"
fi
log "robustness of $RUN on $DATA split $SPLIT"
$BIN robustness --run "$RUN" --data "$DATA" --split "$SPLIT" --device "$DEVICE" \
  --out "$OUT/$(basename "$RUN")_$SPLIT"
log "done: $OUT/$(basename "$RUN")_$SPLIT/robustness.md"
