#!/usr/bin/env bash
# The GPU path in a few minutes on a lent GPU (issue 19): input-pipeline throughput real vs bare for
# ResNet18 and EfficientNet-Lite0 at batch 128 on all of kneeKL224, and the CUDA-only tests.
# Writes benchmarks/results/train_throughput_cuda_<model>_<size>.json (device, train_ratio, eval_ratio)
# and, under $OUT when set (the device tool's output folder), copies of them + the pytest log.
#   bash benchmarks/gpu_check.sh            # needs the venv (make install) and ../shared/data/kneeKL224
# The whole study on the GPU (target <= 10 min) is the next call: benchmarks/study_gpu_kneekl224.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for m in resnet18:224 efficientnet_lite0:224; do
  timeout 240 "$PY" benchmarks/bench_train_throughput.py --device cuda --model "${m%%:*}" --img-size "${m#*:}" \
    --batch-size 128 --steps 20 --rounds 3 --workers 4 || echo "throughput ${m%%:*}: failed ($?)"
done
"$PY" -m pytest tests/test_train.py -q -k cuda 2>&1 | tee /tmp/gpu_pytest.log | tail -3
if [[ -n "${OUT:-}" ]]; then cp benchmarks/results/train_throughput_cuda_*.json /tmp/gpu_pytest.log "$OUT"/ 2>/dev/null || true; fi
