#!/usr/bin/env bash
# Run one shell command in a fresh rxe test VM and print its output:  scripts/vm/exec.sh 'ibv_devinfo -v'
# The command runs in the checkout (/mnt/proj, read-only) with rxe0 up; $RDMAPOOL_JOB (/mnt/job) is a
# writable folder whose contents are copied to --out DIR on the host if given. Exit status: the command's.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="" opts=()
while [ $# -gt 1 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --timeout|--smp|--mem) opts+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: exec.sh [--out DIR] [--timeout S] 'COMMAND'" >&2; exit 2; }
job="$(mktemp -d /tmp/rdmapool-vm-job.XXXXXX)"
trap 'rm -rf "$job"' EXIT
printf '%s\n' "$1" >"$job/cmd.sh"
set +e
bash "$here/run.sh" "${opts[@]}" "$job"
rc=$?
set -e
cat "$job/guest.log" 2>/dev/null | sed 's/^/[guest] /' >&2 || true
cat "$job/output.log" 2>/dev/null || true
if [ -n "$out" ]; then mkdir -p "$out" && cp -r "$job"/. "$out"/; fi
exit $rc
