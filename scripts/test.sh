#!/usr/bin/env bash
# The test command: set up what is missing (idempotent), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/transport -x
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
venv="${RDMAPOOL_VENV:-$here/.venv}"
"$venv/bin/ruff" check rdmapool tests bench scripts
set +e
# Triton's nanobind bindings print a reference-leak report at interpreter exit (a known upstream issue, harmless);
# it would bury pytest's summary line, so those lines alone are dropped.
"$venv/bin/python" -m pytest "$@" 2>&1 | grep -v -E '^(nanobind: |nanobind: this| - leaked | - \.\.\. skipped remainder|See https://nanobind)'
rc=${PIPESTATUS[0]}
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
