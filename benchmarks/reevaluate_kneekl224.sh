#!/usr/bin/env bash
# Re-grade every finished kneeKL224 study run on the current canonical view, after a view change
# (klgrade.view.cache.CACHE_VERSION): trained weights are kept, views, embeddings, heads, Table 1
# and the JSW check are made anew. CNN runs: `klgrade evaluate` on the hold-out ('val') and the
# report split ('test' = kneeKL224 val); frozen rows: the store rebuilt, the head refitted (same
# seed); then the compare step of study_pretrained_kneekl224.sh and bench_jsw.py on kneeKL224.
# Runs whose checkpoint is not on this machine are listed and left as they are.
#   HF_HUB_OFFLINE=1 nohup bash benchmarks/reevaluate_kneekl224.sh > results/reevaluate.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/study_pretrained_kneekl224}
SSL=${SSL:-results/ssl_kneekl224}
BIN=${BIN:-.venv/bin/klgrade}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

for run in "$OUT"/runs/efficientnet_*/; do
  run=${run%/}
  if [[ ! -f "$run/checkpoint.pt" ]]; then log "SKIP $run: no checkpoint here"; continue; fi
  for split in val test; do log "evaluate $(basename "$run") on $split"; $BIN evaluate --run "$run" --split "$split"; done
done

rehead() {  # head-run store backbone weights
  local run=$1 store=$2 backbone=$3 weights=$4
  log "embed $(basename "$store") anew ($backbone, weights $weights)"
  $BIN embed --data "$OUT/data" --backbone "$backbone" --weights "$weights" --out "$store" --rebuild
  local head; head=$(sed -n 's/^head: //p' "$run/config.yaml")
  log "fit-head $(basename "$run") ($head)"
  rm -rf "$run"
  $BIN fit-head --embeddings "$store" --data "$OUT/data" --head "$head" --seed 0 --out "$run"
}
rehead "$OUT/runs/lite0_frozen_mlp" "$OUT/embeddings/lite0" efficientnet_lite0 auto
for h in linear xgboost; do  # the same store, other heads
  rm -rf "$OUT/runs/lite0_frozen_$h"
  $BIN fit-head --embeddings "$OUT/embeddings/lite0" --data "$OUT/data" --head "$h" --seed 0 --out "$OUT/runs/lite0_frozen_$h"
done
rehead "$OUT/runs/lite2_frozen_mlp" "$OUT/embeddings/lite2" efficientnet_lite2 auto
if [[ -f "$SSL/runs/ssl_lite0/checkpoint.pt" ]]; then
  rehead "$SSL/runs/ssl_lite0_frozen_mlp" "$SSL/embeddings/ssl_lite0" efficientnet_lite0 "$SSL/runs/ssl_lite0"
fi

log "Table 1"
rm -rf "$OUT/report"
BIN=$BIN bash benchmarks/study_pretrained_kneekl224.sh compare
log "JSW on kneeKL224"
$PY benchmarks/bench_jsw.py kneekl224
log "done"
