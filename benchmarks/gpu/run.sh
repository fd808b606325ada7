#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU (here: the `device` tool's H100/H200).
# Prints the environment, runs the CUDA tests (8 workers), the GPU benchmark in float32
# and bfloat16, then the whole-model comparison; logs and CSV rows go to $OUT (default
# /tmp/normlab-gpu). On the H100 the whole run took ~4 minutes (tests ~70 s, each
# benchmark ~40 s, the models ~50 s), inside the device tool's 10 minutes a call.
#
#   OUT=dir bash benchmarks/gpu/run.sh [all|tests|bench|models] [extra bench args...]
#
# Each stage has its own time limit so that a hang still leaves the other logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/normlab-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
what=${1:-all}
shift || true

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name(), \
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.txt"

if [[ $what == all || $what == tests ]]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu_cuda.py 2>&1 | tee "$OUT/tests.log"
fi
if [[ $what == all || $what == bench ]]; then
  for dtype in fp32 bf16; do
    timeout 150 python3 -m normlab.backends.gpu.bench --dtype "$dtype" --csv "$OUT/gpu-$dtype.csv" "$@" \
      2>&1 | tee "$OUT/bench-$dtype.txt"
  done
fi
if [[ $what == all || $what == models ]]; then
  timeout 150 python3 benchmarks/gpu/models.py --rounds 5 2>&1 | tee "$OUT/models.txt"
fi
