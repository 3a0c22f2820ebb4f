#!/usr/bin/env bash
# The GPU half of benchmarks/results.md, in one call of about 6 minutes on one GPU:
#   bash benchmarks/gpu_run.sh OUT_DIR
# 1. phase 1's U=2 models one after the other vs two processes at once (classifier32, CIFAR shape);
# 2. images/s of the reference pipeline vs pmal's fast path: classifier32 and wrn40_4, 32x32 (30,000 images) and
#    64x64 (10,000 images), batch 128 (torch.compile variants for classifier32).
# Every part has its own time limit; the JSON files are written as the figures come in.
set -u
OUT=${1:-${OUT:-bench_out}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
B="python3 benchmarks/bench_training.py --device cuda --workers 8"
timeout 110 $B --models classifier32 --shapes cifar --skip-matrix --concurrent 2 --u-steps 150 --u-pipeline fast \
    --json "$OUT/bench_concurrent_fast.json" 2>&1 | grep -v Warning | tee "$OUT/concurrent.log"
timeout 270 $B --check --seconds 2.5 --steps 400 --warmup 15 \
    --pipelines reference fast_fp32 fast fast_epochidx fast_compile fast_graphs \
    --json "$OUT/bench_matrix.json" 2>&1 | tee "$OUT/matrix.log"
echo "done"
