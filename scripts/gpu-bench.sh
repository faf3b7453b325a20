#!/usr/bin/env bash
# GPU run of the KV layer, for the device machine (python3 there holds torch+CUDA): builds the native extensions,
# runs the gpu-marked tests and bench/kv.py (Llama-3-8B-shaped bf16 model, prefixes 4k/16k/32k, shm and tcp).
# Output: the test log and bench JSON under ${OUT:-bench/results}. Extra arguments go to bench/kv.py.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
out="${OUT:-$here/bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
missing=$("$py" - <<'PY'
import importlib.util
print(" ".join(m for m in ("msgpack", "xxhash", "prometheus_client", "transformers", "triton", "pytest")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu-bench: missing Python packages: $missing (carry them as wheels, see the device README)" >&2
  exit 2
fi
"$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 \
  || { echo "gpu-bench: native build failed (see build.log); going on with what imports" >&2; tail -5 "$out/build.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# the KV tests run their Triton kernels on the GPU here (no interpreter); shm's gpu-marked tests if present
timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/kv/test_gpu.py tests/kv/test_layouts.py 2>&1 \
  | tee "$out/gpu-tests.log" | tail -8
if [ -f tests/transport/test_shm.py ]; then
  timeout 60 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/transport/test_shm.py 2>&1 \
    | tee -a "$out/gpu-tests.log" | tail -4
fi
timeout 420 "$py" bench/kv.py --record "$@" 2>&1 | tee "$out/kv-bench.log" | tail -6
cp bench/results/kv-*.json "$out/" 2>/dev/null || true
