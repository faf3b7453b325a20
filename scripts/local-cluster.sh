#!/usr/bin/env bash
# A local cluster on loopback for trying rdmapool by hand: one etcd member and N memory servers that join it
# (shard map, replicas). Ctrl-C stops everything it started.
# Usage: scripts/local-cluster.sh [N=2] [transport=tcp]
# Then: rdmapool cluster status --etcd http://127.0.0.1:2379 ; rdmapool stats 127.0.0.1:7410 --token local-token-0123
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${RDMAPOOL_VENV:-$here/.venv}"
[ -x "$venv/bin/rdmapool" ] || bash "$here/scripts/setup.sh"
n="${1:-2}"; transport="${2:-tcp}"
data="$(mktemp -d /tmp/rdmapool-local-XXXXXX)"
pids=()
etcd_pid=""
# servers first (they leave the cluster through etcd), then etcd
cleanup() {
  set +e
  [ "${#pids[@]}" -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null
  rm -rf "$data"
}
trap cleanup EXIT INT TERM
etcd --name local --data-dir "$data/etcd" --listen-client-urls http://127.0.0.1:2379 \
  --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --auto-compaction-retention 1 --pre-vote >"$data/etcd.log" 2>&1 &
etcd_pid=$!
sleep 1
for i in $(seq 0 $((n - 1))); do
  "$venv/bin/rdmapool" server --listen "127.0.0.1:$((7410 + i))" --metrics "127.0.0.1:$((7510 + i))" \
    --transport "$transport" --tenant "local:local-token-0123:256MiB" --etcd http://127.0.0.1:2379 \
    --rack "rack$((i % 2))" >"$data/server$i.log" 2>&1 &
  pids+=($!)
done
echo "etcd on 127.0.0.1:2379; $n servers on 127.0.0.1:7410.. ($transport); tenant token local-token-0123"
echo "logs in $data; Ctrl-C stops all"
wait
