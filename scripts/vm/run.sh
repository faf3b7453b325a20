#!/usr/bin/env bash
# Boot the rxe test VM once and run JOBDIR/cmd.sh inside it, with the checkout shared read-only at /mnt/proj
# (the working directory) and JOBDIR shared read-write at /mnt/job (results go there: output.log, guest.log,
# rc, plus whatever the job writes, e.g. a pytest junit file). The disk is used with -snapshot, so several
# VMs can boot the same cached image at once and nothing they write survives.
#
#   scripts/vm/run.sh [--ip ADDR/PREFIX] [--net user|listen:PORT|connect:PORT] [--mac MAC]
#                     [--smp N] [--mem MB] [--timeout SECONDS] [--share DIR] JOBDIR
#
# --share DIR adds a third 9p share (tag "xchg", mount it in the job) that several VMs may use together.
#
# Exit status: the job's exit status; 124 if the job ran past --timeout; 90 if the VM never reported one
# (boot failed, QEMU killed): see JOBDIR/console.log. Uses TCG: KVM does not work on these machines.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
checkout="$(cd "$here/../.." && pwd)"
ip=10.0.2.15/24 net=user mac="" smp=2 mem=2048 timeout=600 share=""
while [ $# -gt 1 ]; do
  case "$1" in
    --ip) ip="$2"; shift 2 ;;
    --net) net="$2"; shift 2 ;;
    --mac) mac="$2"; shift 2 ;;
    --smp) smp="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --share) share="$(cd "$2" && pwd)"; shift 2 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: run.sh [options] JOBDIR (JOBDIR/cmd.sh is run in the guest)" >&2; exit 2; }
job="$(cd "$1" && pwd)"
[ -f "$job/cmd.sh" ] || { echo "run.sh: $job/cmd.sh is missing" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 2; }

cache="$(bash "$here/build-image.sh" | tail -1)"
rm -f "$job/rc" "$job/output.log" "$job/guest.log" "$job/console.log"

case "$net" in
  user) nic=(-nic "user,model=virtio-net-pci${mac:+,mac=$mac}") ;;
  listen:*|connect:*)
    nic=(-netdev "socket,id=n0,${net%%:*}=127.0.0.1:${net#*:}" -device "virtio-net-pci,netdev=n0${mac:+,mac=$mac}") ;;
  *) echo "run.sh: --net must be user, listen:PORT or connect:PORT" >&2; exit 2 ;;
esac

extra=()
[ -z "$share" ] || extra=(-virtfs "local,path=$share,mount_tag=xchg,security_model=none")

# Kill QEMU (in its own process group, made by timeout) when this script is told to stop.
qpid=""
trap '[ -z "$qpid" ] || kill -TERM "$qpid" 2>/dev/null' TERM INT HUP

boot() {
  # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic at boot
  timeout -k 10 $((timeout + 90)) qemu-system-x86_64 -accel tcg -cpu max -smp "$smp" -m "$mem" \
    -nographic -no-reboot -snapshot \
    -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
    -append "console=ttyS0 root=/dev/vda rw init=/init.sh panic=-1 quiet no_timer_check rdmapool.ip=$ip rdmapool.timeout=$timeout" \
    -drive "file=$cache/rootfs.img,format=raw,if=virtio" \
    "${nic[@]}" \
    -virtfs "local,path=$checkout,mount_tag=proj,security_model=none,readonly=on" \
    -virtfs "local,path=$job,mount_tag=job,security_model=none" \
    "${extra[@]}" \
    </dev/null >"$job/console.log" 2>&1 &
  qpid=$!
  wait "$qpid"
  qrc=$?
  while kill -0 "$qpid" 2>/dev/null; do wait "$qpid"; qrc=$?; done  # wait returns early when a trap ran
}

start=$(date +%s)
set +e
boot
if [ ! -f "$job/rc" ] && [ ! -f "$job/guest.log" ] && grep -q "Kernel panic" "$job/console.log"; then
  # the guest died before running anything (a TCG boot-time flake): one more try, keeping the first console
  mv "$job/console.log" "$job/console-first-boot.log"
  echo "[vm] kernel panic during boot; booting once more" >&2
  boot
fi
set -e
elapsed=$(( $(date +%s) - start ))
if [ ! -f "$job/rc" ]; then
  echo "[vm] no exit status from the guest after ${elapsed}s (qemu exit $qrc); console tail:" >&2
  tail -20 "$job/console.log" >&2
  exit 90
fi
rc="$(cat "$job/rc")"
echo "[vm] guest job exit $rc after ${elapsed}s" >&2
exit "$rc"
