#!/usr/bin/env bash
# The GPU half of benchmarks/results.md, in one call of about 5 minutes on one GPU:
#   bash benchmarks/gpu_run.sh OUT_DIR
# 0. the CUDA-only tests (Recipe(cuda_graph=True) gives the eager weights; concurrent phase 1; CUDA data paths);
# 1. images/s of the reference pipeline vs pmal's paths (eager; whole step as one CUDA graph): classifier32 and
#    wrn40_4, 32x32 (30,000 images) and 64x64 (10,000 images), batch 128;
#    then classifier32 compiled + graphed (profile paper_fast);
# 2. phase 1's U=2 models one after the other vs two processes vs two threads (pmal.train.run_concurrently).
# Every part has its own time limit; the JSON files are written as the figures come in.
set -u
OUT=${1:-${OUT:-bench_out}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_graph.py > "$OUT/pytest_cuda.log" 2>&1
timeout 60 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_data.py tests/test_robustness.py tests/test_metrics.py >> "$OUT/pytest_cuda.log" 2>&1
grep -E "passed|failed|^E " "$OUT/pytest_cuda.log"   # the whole log is in OUT
B="python3 benchmarks/bench_training.py --device cuda --workers 8"
timeout 200 $B --seconds 2.0 --steps 600 --warmup 15 --pipelines reference fast fast_stepgraph \
    --json "$OUT/bench_matrix.json" 2>&1 | tee "$OUT/matrix.log"
timeout 150 $B --models classifier32 --shapes cifar tiny --seconds 2.0 --steps 1500 \
    --pipelines reference fast_stepgraph fast_compile_stepgraph --json "$OUT/bench_compile_graph.json" 2>&1 | tee "$OUT/compile_graph.log"
timeout 100 $B --models classifier32 --shapes cifar --skip-matrix --concurrent 2 --u-steps 300 \
    --u-pipeline fast_stepgraph --json "$OUT/bench_concurrent.json" 2>&1 | grep -v Warning | tee "$OUT/concurrent.log"
echo "done"
