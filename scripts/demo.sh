#!/usr/bin/env bash
# The main job: set up what is missing (idempotent), then run `rdmapool demo`: two memory servers, a prefill
# worker and a decode worker sharing KV through them, checked against a run without the pool.
# Arguments go to `rdmapool demo`, e.g. scripts/demo.sh --json, scripts/demo.sh --device cuda.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
venv="${RDMAPOOL_VENV:-$here/.venv}"
exec "$venv/bin/rdmapool" demo "$@"
