#!/usr/bin/env sh
# Reproduce the committed CPU baseline: the default suite (issue 3's cases plus small
# shapes), every provider, float32, torch's default thread count, one run.
# Writes benchmarks/results/cpu-2core-float32.{csv,json,png}.
set -eu
cd "$(dirname "$0")/.."
python -m normlab.bench --out benchmarks/results/cpu-2core-float32 --plot \
    --note "${BENCH_NOTE:-}" "$@"
