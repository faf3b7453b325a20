#!/usr/bin/env bash
# The verbs checks that need an RDMA device (real or rxe), shared by the QEMU VM harness (tests/vm) and the
# Docker client container (docker/), so both run the same entry points:
#   scripts/verbs-checks.sh [smoke|conformance|bench|all] [--junit PATH] [--out DIR]
#   smoke        one pyverbs RDMA READ between two RC queue pairs, byte-exact (scripts/vm/smoke_read.py)
#   conformance  the transport conformance suite against the verbs backend (tests/transport -k verbs)
#   bench        rdmapool bench verbs on this device (perftest vs ours), JSON into DIR/bench-verbs.json
# Exit status: non-zero when any selected check fails.
set -u
cd "$(dirname "$0")/.."
what="${1:-all}"; shift || true
junit="" out="${RDMAPOOL_JOB:-/tmp}"
while [ $# -gt 0 ]; do
  case "$1" in
    --junit) junit="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "verbs-checks: unknown option $1" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
rc=0
run_smoke() { "$py" scripts/vm/smoke_read.py || rc=1; }
run_conformance() {
  "$py" -m pytest -p no:cacheprovider -q -o addopts='' -rs tests/transport -k verbs --timeout 600 \
    ${junit:+--junitxml="$junit"} || rc=1
}
run_bench() { "$py" bench/verbs.py --here >"$out/bench-verbs.json" || rc=1; tail -1 "$out/bench-verbs.json"; }
case "$what" in
  smoke) run_smoke ;;
  conformance) run_conformance ;;
  bench) run_bench ;;
  all) run_smoke; run_conformance; run_bench ;;
  *) echo "verbs-checks: unknown check $what" >&2; exit 2 ;;
esac
exit $rc
