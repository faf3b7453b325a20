#!/usr/bin/env bash
# The pool benchmark on one many-core host standing in for a client host and a server host: the server
# processes get the first SERVER_CORES physical cores, the client the next CLIENT_CORES (one hardware thread
# of each core, so neither side shares a core with the other), and both run `rdmapool bench pool` under that
# pinning, raw baseline included. Needs >= SERVER_CORES + CLIENT_CORES physical cores.
# Output: the bench JSON (recorded) and a log under ${OUT:-bench/results}; extra arguments go to the bench.
# Usage: [SERVER_CORES=4 CLIENT_CORES=8] scripts/pool-bench-split.sh [--sizes 1MiB,4MiB,32MiB --label NAME ...]
set -euo pipefail
# shellcheck source=lib/device-run.sh
source "$(dirname "$0")/lib/device-run.sh"
"$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || { tail -5 "$out/build.log"; exit 1; }
read -r server_cpus client_cpus < <("$py" - "${SERVER_CORES:-4}" "${CLIENT_CORES:-8}" <<'EOF'
import glob, os, sys
want_server, want_client = int(sys.argv[1]), int(sys.argv[2])
first = {}  # (package, core) -> its first CPU, in CPU order
for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/core_id"),
                   key=lambda p: int(p.split("/cpu")[-1].split("/")[0])):
    cpu = int(path.split("/cpu")[-1].split("/")[0])
    if cpu not in os.sched_getaffinity(0):
        continue
    top = os.path.dirname(path)
    core = (open(f"{top}/physical_package_id").read().strip(), open(path).read().strip())
    first.setdefault(core, cpu)
cpus = list(first.values())
if len(cpus) < want_server + want_client:
    sys.exit(f"pool-bench-split: {len(cpus)} physical cores here, need {want_server + want_client}")
print(",".join(map(str, cpus[:want_server])), ",".join(map(str, cpus[want_server:want_server + want_client])))
EOF
)
[ -n "${server_cpus:-}" ] && [ -n "${client_cpus:-}" ] || { echo "pool-bench-split: no CPU sets (see above)" >&2; exit 1; }
echo "pool-bench-split: server CPUs $server_cpus, client CPUs $client_cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2))"
# recorded as pool-<date>-split.json unless the arguments name another --label (the last one counts)
started="$(mktemp)"
"$py" -m rdmapool bench pool --server-cpus "$server_cpus" --client-cpus "$client_cpus" --record --label split "$@" \
  2>&1 | tee "$out/pool-split.log" | tail -1
# only this run's record (a device run returns few files; the older records are in the tree already)
if [ "$out" != "$here/bench/results" ]; then
  find bench/results -maxdepth 1 -name 'pool-*.json' -newer "$started" -exec cp {} "$out/" \;
fi
rm -f "$started"
