#!/usr/bin/env bash
# Knee-specific self-supervised pretraining vs ImageNet (issue 14), kneeKL224 (OAI-derived crops).
# Data and the ImageNet baseline come from benchmarks/study_pretrained_kneekl224.sh (same data dir,
# same lite0 embedding store and lite0_frozen_mlp head): run that first, or this script prepares
# the data and makes the baseline itself.
#   pretrain on the train split ONLY (held-out discipline: the hold-out 'val' and the reported
#   'test' = kneeKL224 val are never seen, not even unlabelled); embed at 224 px; MLP head;
#   one `klgrade compare --split test` with paired patient-level tests.
# Rows:
#   ssl_lite0_frozen_mlp        Lite0, init ImageNet, + SimCLR (3 epochs, 160 px) on knee train images, frozen + MLP
#   lite0_frozen_mlp            Lite0 ImageNet, frozen + MLP (the baseline)
#   ssl_scratch_frozen_mlp      Lite0, init none, + the same SimCLR, frozen + MLP   (SCRATCH=1)
#   ssl_lite0_ft / efficientnet_lite0_ft   fine-tuned from knee-SSL / from ImageNet (FINETUNE=1)
#   variants, each compared on the hold-out: ssl_lite0_224 (STAGE2=1), ssl_byol (BYOL=1),
#   ssl_crop60 (CROP60=1)
# Sizing (2 CPU cores, bf16 + channels-last where the CPU has it): SimCLR chosen over BYOL in a
# smoke run (no momentum teacher: ~12% less per step, same RankMe rise, better kNN QWK); 160 px,
# batch 64: ~6 s per batch beside another job, so 3 epochs of the ~5.2k train images (81 batches
# each) take ~25-30 min per pretraining; embedding 6.6k images at 224 px ~10 min; the --init none
# run (SCRATCH=1) as much again. Default total ~1.3 h; FINETUNE=1 adds two 8-epoch fine-tunings.
# Resumable: finished steps are skipped; a killed pretraining or training resumes from last.pt.
#   HF_HUB_OFFLINE=1 nohup nice -n 10 bash benchmarks/ssl_kneekl224.sh > results/ssl_kneekl224.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
KL=${KL:-../shared/data/kneeKL224}
STUDY=${STUDY:-results/study_pretrained_kneekl224}  # its data/ and embeddings/lite0 are reused
OUT=${OUT:-results/ssl_kneekl224}
DEVICE=${DEVICE:-auto}
METHOD=${METHOD:-simclr}
SSL_EPOCHS=${SSL_EPOCHS:-3}
SSL_IMG=${SSL_IMG:-160}
SSL_BS=${SSL_BS:-64}
SSL_LR=${SSL_LR:-5e-4}
SCRATCH=${SCRATCH:-1}
FINETUNE=${FINETUNE:-0}
# STAGE2=1: continue ssl_lite0's pretraining at the embedding size (224 px), a second run
# ssl_lite0_224 (--init ssl_lite0), embedded and headed like the first
STAGE2=${STAGE2:-0}
SSL2_EPOCHS=${SSL2_EPOCHS:-3}
SSL2_LR=${SSL2_LR:-3e-4}
# BYOL=1: the same budget with BYOL instead of SimCLR (ssl_byol, init ImageNet, 160 px)
BYOL=${BYOL:-0}
# CROP60=1: SimCLR with milder crops (at least 60% of the view's area, not 35%: ssl_crop60)
CROP60=${CROP60:-0}
SSL_CROP=${SSL_CROP:-0.35}
FT_EPOCHS=${FT_EPOCHS:-8}
SEED=${SEED:-0}
N_BOOT=${N_BOOT:-2000}
BIN=${BIN:-.venv/bin/klgrade}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
DATA=$STUDY/data
mkdir -p "$OUT/runs" "$OUT/embeddings" "$STUDY/runs" "$STUDY/embeddings"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
done_epochs() { [[ -f "$1/history.csv" ]] && tail -n 1 "$1/history.csv" | cut -d, -f1 || echo -1; }

if [[ ! -f "$DATA/manifest.csv" ]]; then
  log "prepare: kneeKL224 -> $DATA (its val kept for the report as 'test')"
  $BIN prepare folders "$KL" --out "$DATA"
  $BIN split "$DATA" --rename val=test --holdout 0.1 --seed "$SEED"
fi

pretrain() {  # name init
  local run=$OUT/runs/$1
  if [[ "$(done_epochs "$run")" == "$SSL_EPOCHS" ]]; then log "$1: pretrained already"; return; fi
  if [[ -f "$run/last.pt" ]]; then log "$1: resuming"; $BIN pretrain --resume "$run"; return; fi
  rm -rf "$run"  # killed before its first epoch: nothing to resume
  log "pretrain $1 ($METHOD, init $2, $SSL_EPOCHS epochs at $SSL_IMG px, train split only)"
  $BIN pretrain --data "$DATA" --splits train --model efficientnet_lite0 --init "$2" --method "$METHOD" \
    --epochs "$SSL_EPOCHS" --img-size "$SSL_IMG" --batch-size "$SSL_BS" --lr "$SSL_LR" --warmup-epochs 0.25 \
    --crop-scale-min "$SSL_CROP" --seed "$SEED" --device "$DEVICE" --out "$run"
}
embed() {  # store-path backbone [weights]: incremental, so a killed embed resumes
  log "embed $1 ($2)"
  $BIN embed --data "$DATA" --backbone "$2" ${3:+--weights "$3"} --device "$DEVICE" --out "$1"
}
fit_head() {  # run-path store-path
  [[ -f "$1/metrics_test.json" ]] && { log "$(basename "$1"): done already"; return; }
  rm -rf "$1"
  log "fit-head $(basename "$1")"
  $BIN fit-head --embeddings "$2" --data "$DATA" --head mlp --seed "$SEED" --out "$1"
}
frozen_row() {  # head-run store backbone [weights]: embed + MLP head, unless the head run is finished
  # (a finished head is not re-embedded: e.g. a store of an older view version, whose kneeKL224
  # views are byte-identical to today's, would be refused)
  if [[ -f "$1/metrics_test.json" ]]; then log "$(basename "$1"): done already"; return; fi
  embed "$2" "$3" ${4:+"$4"}
  fit_head "$1" "$2"
}
finetune() {  # run-path weights (a pretrain run dir, or auto = ImageNet)
  if [[ -f "$1/metrics_test.json" ]]; then log "$(basename "$1"): done already"; return; fi
  if [[ -f "$1/last.pt" ]]; then log "$(basename "$1"): resuming"; $BIN train --resume "$1"; return; fi
  rm -rf "$1"
  log "fine-tune $(basename "$1") from $2"
  # the study's fine-tuning recipe (`--recipe finetune`) at this script's size and epochs
  $BIN train --recipe finetune --data "$DATA" --model efficientnet_lite0 --weights "$2" --img-size 224 \
    --epochs "$FT_EPOCHS" --batch-size 32 --seed "$SEED" --device "$DEVICE" --out "$1"
}
compare() {
  local runs=() names=()
  for r in "$OUT/runs/ssl_lite0_frozen_mlp:Lite0 knee-SSL frozen+MLP" \
           "$OUT/runs/ssl_lite0_224_frozen_mlp:Lite0 knee-SSL 2nd stage (224 px) frozen+MLP" \
           "$OUT/runs/ssl_byol_frozen_mlp:Lite0 knee-BYOL frozen+MLP" \
           "$OUT/runs/ssl_crop60_frozen_mlp:Lite0 knee-SSL milder crops frozen+MLP" "$STUDY/runs/lite0_frozen_mlp:Lite0 ImageNet frozen+MLP" \
           "$OUT/runs/ssl_scratch_frozen_mlp:Lite0 knee-SSL from scratch frozen+MLP" \
           "$OUT/runs/ssl_lite0_ft:Lite0 fine-tuned from knee-SSL" \
           "$STUDY/runs/efficientnet_lite0_ft:Lite0 fine-tuned from ImageNet"; do
    [[ -f "${r%%:*}/predictions_test.csv" ]] && runs+=("${r%%:*}") && names+=("${r#*:}")
  done
  log "compare ${#runs[@]} runs on kneeKL224 val ('test')"
  $BIN compare "${runs[@]}" --names "$(IFS=,; echo "${names[*]}")" --split test --n-boot "$N_BOOT" \
    --seed "$SEED" --title "Knee-specific SSL vs ImageNet (EfficientNet-Lite0)" --out "$OUT/report"
}

# The ImageNet baseline (shared with the pretrained study; skipped when that made it already)
frozen_row "$STUDY/runs/lite0_frozen_mlp" "$STUDY/embeddings/lite0" efficientnet_lite0 auto

pretrain ssl_lite0 imagenet
frozen_row "$OUT/runs/ssl_lite0_frozen_mlp" "$OUT/embeddings/ssl_lite0" "$OUT/runs/ssl_lite0"
compare

if [[ "$STAGE2" == 1 ]]; then
  SSL_EPOCHS=$SSL2_EPOCHS SSL_IMG=224 SSL_LR=$SSL2_LR pretrain ssl_lite0_224 "$OUT/runs/ssl_lite0"
  frozen_row "$OUT/runs/ssl_lite0_224_frozen_mlp" "$OUT/embeddings/ssl_lite0_224" "$OUT/runs/ssl_lite0_224"
  compare
fi
if [[ "$BYOL" == 1 ]]; then
  METHOD=byol pretrain ssl_byol imagenet
  frozen_row "$OUT/runs/ssl_byol_frozen_mlp" "$OUT/embeddings/ssl_byol" "$OUT/runs/ssl_byol"
  compare
fi
if [[ "$CROP60" == 1 ]]; then
  SSL_CROP=0.6 pretrain ssl_crop60 imagenet
  frozen_row "$OUT/runs/ssl_crop60_frozen_mlp" "$OUT/embeddings/ssl_crop60" "$OUT/runs/ssl_crop60"
  compare
fi
if [[ "$SCRATCH" == 1 ]]; then
  pretrain ssl_scratch none
  frozen_row "$OUT/runs/ssl_scratch_frozen_mlp" "$OUT/embeddings/ssl_scratch" "$OUT/runs/ssl_scratch"
  compare
fi
if [[ "$FINETUNE" == 1 ]]; then
  finetune "$OUT/runs/ssl_lite0_ft" "$OUT/runs/ssl_lite0"
  finetune "$STUDY/runs/efficientnet_lite0_ft" auto
  compare
fi
for r in ssl_lite0 ssl_lite0_224 ssl_byol ssl_crop60 ssl_scratch; do
  [[ -f "$OUT/runs/$r/history.csv" ]] && { log "$r history (RankMe, kNN QWK per epoch):"; cat "$OUT/runs/$r/history.csv"; }
done
log "done: $OUT/report/report.html"
