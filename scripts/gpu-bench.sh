#!/usr/bin/env bash
# GPU run of the KV layer, for the device machine (python3 there holds torch+CUDA): builds the native extensions,
# runs the gpu-marked tests and bench/kv.py (Llama-3-8B-shaped bf16 model, prefixes 4k/16k/32k, shm and tcp).
# Output: the test log and bench JSON under ${OUT:-bench/results}. Extra arguments go to bench/kv.py.
set -uo pipefail
# shellcheck source=lib/device-run.sh
source "$(dirname "$0")/lib/device-run.sh"
absent() { "$py" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') is None else 1)"; }
missing=""
for m in msgpack xxhash prometheus_client transformers; do absent "$m" && missing="$missing $m"; done
if [ -n "$missing" ]; then
  echo "gpu-bench: missing Python packages:$missing (carry them as wheels, see the device README)" >&2
  exit 2
fi
"$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 \
  || { echo "gpu-bench: native build failed (see build.log); going on with what imports" >&2; tail -5 "$out/build.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# the KV tests run their Triton kernels on the GPU here (no interpreter); shm's gpu-marked tests if present
if absent pytest; then
  echo "gpu-bench: no pytest here: tests skipped, benchmark only" >&2
else
timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/kv/test_gpu.py tests/kv/test_layouts.py 2>&1 \
  | tee "$out/gpu-tests.log" | tail -8
shm_gpu=$(ls tests/transport/test_shm_gpu.py tests/transport/test_shm.py 2>/dev/null | head -1)
if [ -n "$shm_gpu" ]; then
  timeout 60 "$py" -m pytest -q -p no:cacheprovider -m gpu "$shm_gpu" 2>&1 \
    | tee -a "$out/gpu-tests.log" | tail -4
fi
fi
timeout 420 "$py" bench/kv.py --record "$@" 2>&1 | tee "$out/kv-bench.log" | tail -6
cp bench/results/kv-*.json "$out/" 2>/dev/null || true
