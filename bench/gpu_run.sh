#!/usr/bin/env bash
# A GPU machine's pass over lorafast, in stages that each fit a short slot (≤ 7 minutes on
# an H100/H200), run from a source checkout whose Python has CUDA torch, Triton, nvcc and ninja:
#   a  one JIT build of the CUDA extension, the GPU tests, and `lorafast check` on the GPU
#   b  the headline benchmarks, bf16 forward+backward: the LoRA linear at 4096², r=16, N=2048
#      and 8192 (nn.Linear, PEFT, and lorafast's hybrid, fused and CUDA plans), the DP step,
#      the FedEx merge at k=16, and the noise kernel
#   c  the model-level suites on a 1.1B Llama: one LoRA training step (PEFT vs lorafast) and one
#      federated round of 16 clients (sequential PEFT, sequential lorafast, one batched step); and
#      the QLoRA layer (NF4 base) at 4096², N=2048 and 8192: PEFT + bitsandbytes, lorafast's scratch
#      and fused paths
# Each stage prints its time. Logs and CSVs go to bench/results/<gpu>/ ($OUT overrides), and the
# measured backend table to lorafast/tuning/<gpu>.json, which automatic selection then ships.
#   bash bench/gpu_run.sh a|b|c      (no argument: a, then b; c on its own)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export LORAFAST_CACHE_DIR=${LORAFAST_CACHE_DIR:-$PWD/.lorafast-cache}
GPU_NAME=$(python -c "import torch; print(torch.cuda.get_device_name())") || { echo "no GPU visible" >&2; exit 1; }
GPU=$(python -c "import re, sys; print(re.sub(r'[^a-z0-9]+', '-', sys.argv[1].lower()).strip('-'))" "$GPU_NAME")
OUT_DIR=${OUT:-bench/results/$GPU}
TABLE=lorafast/tuning/$GPU.json
mkdir -p "$OUT_DIR" lorafast/tuning
STAGES=${1:-ab}
status=0     # any failed step fails the stage (and the script), after the rest has run
step() { echo; echo "=== $* ($(date +%T))"; }
run() { "$@" || { status=1; echo "FAILED ($?): $*"; }; }

stage_a() {
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  step "JIT build of the CUDA extension (torch.utils.cpp_extension.load, ninja)"
  rm -f lorafast/_C*.so
  run python -c "from lorafast import _cuda; _cuda.load(); print('loaded', _cuda._loaded)"
  step "GPU tests"
  run python -m pytest -q -p no:cacheprovider -m gpu tests
  step "op tests on the GPU (triton, hybrid and cuda backends)"
  run python -m pytest -q -p no:cacheprovider -k "triton-cuda or hybrid-cuda or cuda-cuda" \
    tests/ops/test_lora_linear.py tests/dp/test_dp_kernels.py tests/split/test_split_privatize.py tests/ops/test_reference.py
  step "lorafast check on the GPU"
  run python -m lorafast check
  return $status
}

stage_b() {
  step "LoRA linear: nn.Linear, PEFT, lorafast hybrid / fused / cuda"
  run python bench/bench_lora_linear.py --quick --out "$OUT_DIR/lora_linear.csv" --table "$TABLE" \
    --providers frozen_linear peft lorafast-hybrid lorafast-triton lorafast-cuda
  step "DP step"
  run python bench/bench_dp.py --quick --out "$OUT_DIR/dp.csv"
  step "FedEx merge, k=16"
  run python bench/bench_federated.py --quick --out "$OUT_DIR/federated.csv"
  step "noise kernel against copy bandwidth"
  run python bench/bench_noise.py --quick --out "$OUT_DIR/noise.csv" --table "$TABLE"
  return $status
}

stage_c() {
  step "model step: PEFT vs lorafast.from_peft, 1.1B Llama"
  run python bench/bench_model.py --quick --out "$OUT_DIR/model.csv"
  step "federated round of 16 clients: sequential PEFT / lorafast, one batched MultiLoRALinear step"
  run python bench/bench_multi.py --quick --out "$OUT_DIR/multi.csv"
  step "QLoRA layer, NF4 base: PEFT + bitsandbytes, lorafast scratch / fused"
  run python bench/bench_qlora.py --quick --out "$OUT_DIR/qlora.csv" --table "$TABLE"
  return $status
}

for s in $(echo "$STAGES" | grep -o .); do
  case $s in
    a|b|c) ;;
    *) echo "usage: bash bench/gpu_run.sh [a|b|c]" >&2; exit 2 ;;
  esac
  SECONDS=0
  "stage_$s" 2>&1 | tee "$OUT_DIR/stage_$s.log" || status=1   # the stage runs in the pipe's subshell
  echo "stage $s: ${SECONDS} s" | tee -a "$OUT_DIR/stage_$s.log"
done
exit $status
