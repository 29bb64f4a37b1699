#!/usr/bin/env bash
# GPU check (issue 13): on one CUDA device, prints
#   1. bench_features: bare backbones vs the whole cached extraction (float32, then bf16 autocast);
#   2. bench_scale: one epoch, bank, inductive embedding and mAP@all at 20,015 and 190,421 items;
#   3. a 2-epoch DCMFG training at MIRFlickr size (20,015 synthetic pairs: 2,000 queries, 10,000 training) with
#      `dcmfg train --device cuda`, features extracted on the GPU first;
#   4. where the 12,274-pair MIRFlickr set is (DCMFG_DATA_12K, default ../shared/data-12k): extraction of all its
#      photos and texts, and a 2-epoch DCMFG training at its protocol split (2,000 queries, 5,000 training pairs),
#      each epoch's seconds read from the run's metrics.jsonl.
# Every figure is also appended as JSON lines under $OUT (default: gpu-check/). Needs CUDA; refuses to run without.
# Usage: benchmarks/gpu_check.sh            (or: make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here (torch.cuda.is_available() is False); nothing was run." >&2
  echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 2
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DCMFG_CACHE=${DCMFG_CACHE:-$PWD/$OUT/cache}
start=$(date +%s)
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"

echo "== 1. feature extraction (images/s; ratio = extraction / bare backbones)"
"$PY" benchmarks/bench_features.py --device cuda --images 1024 --batch-size 128 --workers 8 --out "$OUT/features.jsonl"
"$PY" benchmarks/bench_features.py --device cuda --amp --images 1024 --batch-size 128 --workers 8 --out "$OUT/features.jsonl"

echo "== 2. full-size cost (seconds, peak memory)"
"$PY" benchmarks/bench_scale.py --device cuda --sizes 20015 190421 --out "$OUT/scale.jsonl"

echo "== 3. 2-epoch training at MIRFlickr size"
t0=$(date +%s)
"$PY" -m dcmfg.cli train --config configs/dcmfg.yaml --device cuda --out "$OUT/run" --overwrite \
  --set data.name=synthetic --set data.options.n=20015 --set data.query=2000 --set data.train=10000 \
  --set train.epochs=2 --set train.progress=false
echo "{\"train_2_epochs_s\": $(( $(date +%s) - t0 )), \"run\": \"$OUT/run\"}" | tee -a "$OUT/train.jsonl"
"$PY" -c "import json; r = json.load(open('$OUT/run/report.json')); print('query mAP@all I->T', r['map_i2t'], 'T->I', r['map_t2i'])"
DATA12K=${DCMFG_DATA_12K:-../shared/data-12k}/mirflickr-12k
if [ -d "$DATA12K/mirflickr" ]; then
  echo "== 4. the 12k MIRFlickr set: extraction of every pair, and DCMFG epochs at 5,000 training pairs"
  t0=$(date +%s)
  "$PY" -m dcmfg.cli features extract --dataset mirflickr25k --root "$DATA12K" --device cuda
  echo "{\"extract_12k_s\": $(( $(date +%s) - t0 ))}" | tee -a "$OUT/set12k.jsonl"
  "$PY" -m dcmfg.cli data split mirflickr25k --root "$DATA12K" --protocol random --query 2000 --train 5000 --val 0.1 \
    --seed 0 --out "$OUT/split12k.json"
  "$PY" -m dcmfg.cli train --config configs/dcmfg.yaml --device cuda --out "$OUT/run12k" --overwrite \
    --set data.root="$DATA12K" --set data.split="$OUT/split12k.json" --set train.epochs=2 --set train.progress=false
  "$PY" -c "import json; rows = [json.loads(x) for x in open('$OUT/run12k/metrics.jsonl')]; print(json.dumps({'epoch_12k_s': [r['seconds'] for r in rows], 'train_pairs': json.load(open('$OUT/run12k/report.json'))['n_bank_pairs']}))" | tee -a "$OUT/set12k.jsonl"
else
  echo "== 4. skipped: no 12k MIRFlickr set at $DATA12K (set DCMFG_DATA_12K)"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; figures in $OUT/"
