#!/usr/bin/env bash
# Start one memory server in the foreground (Ctrl-C or SIGTERM stops it cleanly).
# Usage: scripts/start-server.sh [rdmapool server options]
# Defaults: control port 7400 on all interfaces, the tcp transport, one tenant from $RDMAPOOL_TENANT
# (NAME:TOKEN:QUOTA, e.g. prod:$(openssl rand -hex 16):64GiB), metrics on :7401, and etcd membership when
# $RDMAPOOL_ETCD is set (comma-separated endpoints). Use --transport verbs on an RDMA host.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${RDMAPOOL_VENV:-$here/.venv}"
[ -x "$venv/bin/rdmapool" ] || bash "$here/scripts/setup.sh"
args=(--listen "${RDMAPOOL_LISTEN:-0.0.0.0:7400}" --metrics "${RDMAPOOL_METRICS:-0.0.0.0:7401}")
if [ -n "${RDMAPOOL_TENANT:-}" ]; then args+=(--tenant "$RDMAPOOL_TENANT"); fi
if [ -z "${RDMAPOOL_TENANT:-}${RDMAPOOL_TENANTS:-}" ] && [[ " $* " != *" --tenant"* ]]; then
  echo "start-server: no tenant: set RDMAPOOL_TENANT=NAME:TOKEN:QUOTA (e.g. prod:\$(openssl rand -hex 16):64GiB)," \
       "or pass --tenant or --tenants-file" >&2
  exit 2
fi
if [ -n "${RDMAPOOL_ETCD:-}" ]; then args+=(--etcd "$RDMAPOOL_ETCD"); fi
exec "$venv/bin/rdmapool" server "${args[@]}" "$@"
