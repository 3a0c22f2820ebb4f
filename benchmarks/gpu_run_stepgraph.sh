#!/usr/bin/env bash
# Prepared, NOT yet run: is 5x reachable for classifier32 if the whole training step is one CUDA graph?
#   bash benchmarks/gpu_run_stepgraph.sh OUT_DIR        (~1.5 minutes on an H200)
set -u
OUT=${1:-${OUT:-bench_out}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 200 python3 benchmarks/bench_training.py --device cuda --workers 8 --models classifier32 wrn40_4 \
    --seconds 2.5 --steps 600 --warmup 15 --pipelines reference fast fast_stepgraph \
    --json "$OUT/bench_stepgraph.json" 2>&1 | tee "$OUT/stepgraph.log"
