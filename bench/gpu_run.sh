#!/usr/bin/env bash
# One pass on a GPU machine, from a source checkout whose Python has torch (with CUDA),
# Triton, nvcc and ninja: build the CUDA extension just in time and then ahead of time,
# run the GPU tests and the CUDA backend's op tests, then the kernel benchmarks.
# Logs, CSVs and the measured backend table go to $OUT (default bench/results/).
#   bash bench/gpu_run.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
QUICK=${1:-}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export LORAFAST_CACHE_DIR=${LORAFAST_CACHE_DIR:-$PWD/.lorafast-cache}
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
LOG=$OUT_DIR/gpu_run_$GPU.log
step() { echo; echo "=== $*"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  step "JIT build (torch.utils.cpp_extension.load, ninja)"
  rm -f lorafast/_C*.so
  time python -c "from lorafast import _cuda; _cuda.load(); print('loaded', _cuda._loaded)"
  step "ahead-of-time build (setup.py build_ext --inplace)"
  time python setup.py -q build_ext --inplace 2>&1 | tail -5
  python -c "from lorafast import _cuda; _cuda.load(); print('loaded', _cuda._loaded)"
  step "GPU tests"
  python -m pytest -q -m gpu tests -p no:cacheprovider
  step "op tests, CUDA backend on the GPU"
  python -m pytest -q -k "cuda-cuda" -p no:cacheprovider tests/test_lora_linear.py tests/test_dp_kernels.py \
    tests/test_split_privatize.py tests/test_federated.py tests/test_api.py tests/test_layers.py
  step "noise kernel against copy bandwidth"
  python bench/bench_noise.py $QUICK --out "$OUT_DIR/noise_$GPU.csv" --table "$OUT_DIR/backend_table_$GPU.json"
  step "LoRA linear: Triton vs CUDA vs PEFT"
  python bench/bench_lora_linear.py $QUICK --out "$OUT_DIR/lora_linear_$GPU.csv" \
    --table "$OUT_DIR/backend_table_$GPU.json"
} 2>&1 | tee "$LOG"
echo "log: $LOG"
