#!/usr/bin/env bash
# Accuracy benchmark: ResNet18 and ConvNeXt-T trained FROM SCRATCH (--weights none) on kneeKL224
# (Chen P. 2018, "Knee Osteoarthritis Severity Grading Dataset", Mendeley Data,
# doi:10.17632/56rmx5bjcr.1): trained on its train split, model selection on a patient-level,
# grade-stratified hold-out of train, reported on its val split (which the run sees as "test").
#
#   benchmarks/train_kneekl224.sh                      # PRESET=cpu1h: resnet18, 192 px, 30 epochs, <1 h on 2 CPU cores (bf16)
#   PRESET=gpu DEVICE=cuda benchmarks/train_kneekl224.sh   # both models, 224 px, 40 epochs
#   SUBSET=6 EPOCHS=1 IMG=32 MODELS=test_resnet benchmarks/train_kneekl224.sh   # smoke test
#
# Re-running resumes unfinished runs (klgrade train --resume) and skips finished ones.
# Env: PRESET, MODELS, IMG, EPOCHS, BATCH, LR_<model>, DEVICE, WORKERS, SEED, SUBSET (images per
# split and grade, for a quick check), CONFIG (a klgrade train --config YAML, e.g.
# benchmarks/configs/site_shift_light.yaml), WORK (default benchmarks/work/kneekl224), SRC, OUT_JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
KL=("$PY" -m klgrade.cli)
SRC=${SRC:-../shared/data/kneeKL224}
PRESET=${PRESET:-cpu1h}
case "$PRESET" in
  cpu1h) : "${MODELS:=resnet18}" "${IMG:=192}" "${EPOCHS:=30}" "${BATCH:=32}" ;;
  gpu)   : "${MODELS:=resnet18 convnext_tiny}" "${IMG:=224}" "${EPOCHS:=40}" "${BATCH:=64}" ;;
  *) echo "PRESET must be cpu1h or gpu" >&2; exit 2 ;;
esac
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-0}
SEED=${SEED:-0}
SUBSET=${SUBSET:-}
CONFIG=${CONFIG:-}
WORK=${WORK:-benchmarks/work/kneekl224${SUBSET:+_subset$SUBSET}}
OUT_JSON=${OUT_JSON:-benchmarks/results/train_kneekl224_${PRESET}${SUBSET:+_subset$SUBSET}.json}
DATA="$WORK/data"

# 1. ingest once; kneeKL224 val -> "test" (reporting), hold-out of train -> "val" (model selection)
if [[ ! -f "$DATA/.split_done" ]]; then
  "${KL[@]}" prepare folders "$SRC" --out "$DATA"
  if [[ -n "$SUBSET" ]]; then
    "$PY" - "$DATA" "$SUBSET" <<'EOF'
import sys
from klgrade.ingest.manifest import read_manifest, write_manifest
data, n = sys.argv[1], int(sys.argv[2])
df = read_manifest(data)
write_manifest(df.groupby(["split", "klg"], group_keys=False).head(n), data)
EOF
  fi
  "${KL[@]}" split "$DATA" --rename val=test --holdout 0.1 --seed "$SEED"
  touch "$DATA/.split_done"
fi

# 2. train (or resume) each model
for m in $MODELS; do
  run="$WORK/runs/$m"
  lr_var="LR_${m//-/_}"
  case "$m" in
    convnext*) lr=${!lr_var:-5e-4}; extra=(--drop-path-rate 0.1) ;;
    *)         lr=${!lr_var:-2e-3}; extra=() ;;
  esac
  if [[ -f "$run/metrics_test.json" ]]; then
    echo "== $m: done already ($run)"
  elif [[ -f "$run/config.yaml" ]]; then
    echo "== $m: resuming $run"
    "${KL[@]}" train --resume "$run" --device "$DEVICE" --workers "$WORKERS"
  else
    echo "== $m: training into $run"
    /usr/bin/time -f "%e s wall" "${KL[@]}" train --data "$DATA" --model "$m" --weights none \
      --img-size "$IMG" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$lr" --seed "$SEED" \
      --device "$DEVICE" --workers "$WORKERS" --tta flip "${extra[@]}" ${CONFIG:+--config "$CONFIG"} --out "$run"
  fi
done

# 3. collect: hold-out (selection) and kneeKL224 val (report) metrics per model
"$PY" - "$WORK" "$OUT_JSON" $MODELS <<'EOF'
import sys
from pathlib import Path
import pandas as pd
from klgrade import io

work, out, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
res = {}
for m in models:
    run = work / "runs" / m
    rep, sel = io.read_json(run / "metrics_test.json"), io.read_json(run / "metrics_val.json")
    hist = pd.read_csv(run / "history.csv")
    cfg = io.read_yaml(run / "config.yaml")
    res[m] = {
        "reported_on": "kneeKL224 val (run split 'test')",
        "qwk": rep["qwk"], "adjacent_accuracy": rep["adjacent_accuracy"], "accuracy": rep["accuracy"],
        "f1_per_grade": rep["f1"], "macro_f1": rep["macro_f1"], "n": rep["n"],
        "holdout_qwk": sel["qwk"], "best_epoch": rep.get("best_epoch"),
        "epochs": cfg["epochs"], "img_size": cfg["img_size"], "batch_size": cfg["batch_size"],
        "lr": cfg["lr"], "loss": cfg["loss"], "device": cfg["resolved"]["device"],
        "train_minutes": round(float(hist["seconds"].sum()) / 60, 1),
    }
    r = res[m]
    print(f"{m:15s} kneeKL224 val: QWK {r['qwk']:.3f}  adjacent {r['adjacent_accuracy']:.3f}  "
          f"accuracy {r['accuracy']:.3f}  F1 {[round(f, 3) for f in r['f1_per_grade']]}  "
          f"({r['train_minutes']} min, best epoch {r['best_epoch']}/{r['epochs']})")
io.write_json(out, res)
print(f"wrote {out}")
EOF
