#!/usr/bin/env bash
# Container entry point. Roles:
#   server HOST:PORT         a memory server over verbs (rdmapool server); tenants from $RDMAPOOL_TENANTS
#                            (NAME:TOKEN:QUOTA,...), which also sets the pool size
#   checks WHAT              scripts/verbs-checks.sh WHAT (smoke | conformance | bench | all): the same entry
#                            point the QEMU VM harness (tests/vm) runs
#   pool ADDR,ADDR,...       scripts/vm/pool_check.py against running memory servers (put/get over verbs)
#   shell                    bash
set -euo pipefail
cd /opt/rdmapool
ulimit -l unlimited 2>/dev/null || echo "entrypoint: cannot raise the memlock limit: run with --ulimit memlock=-1 and --cap-add IPC_LOCK" >&2
if ! ls /dev/infiniband/uverbs* >/dev/null 2>&1; then
  echo "entrypoint: no /dev/infiniband/uverbs*: pass --device /dev/infiniband (and bring up rxe on the host: scripts/rxe-setup.sh)" >&2
fi
role="${1:-checks}"; shift || true
case "$role" in
  server)
    exec python3 -m rdmapool server --listen "${1:?HOST:PORT}" --transport verbs ;;
  checks)
    mkdir -p /results
    exec bash scripts/verbs-checks.sh "${1:-all}" --junit /results/conformance.xml --out /results ;;
  pool)
    exec python3 scripts/vm/pool_check.py --servers "${1:?comma-separated server addresses}" ;;
  shell) exec bash ;;
  *) echo "entrypoint: unknown role $role (server | checks | pool | shell)" >&2; exit 2 ;;
esac
