#!/usr/bin/env bash
# Remove a soft-RoCE device made by rxe-setup.sh:  scripts/rxe-teardown.sh [RXE_NAME]   (default rxe0)
# Processes still holding the device keep it busy: stop memory servers and clients first. Idempotent.
set -euo pipefail
name="${1:-rxe0}"
[ "$(id -u)" = 0 ] || { echo "rxe-teardown: needs root" >&2; exit 1; }
command -v rdma >/dev/null || { echo "rxe-teardown: the 'rdma' tool is missing (iproute2)" >&2; exit 1; }
if rdma link show "$name/1" >/dev/null 2>&1; then
  rdma link delete "$name" && echo "rxe-teardown: removed $name"
else
  echo "rxe-teardown: no $name: nothing to do"
fi
