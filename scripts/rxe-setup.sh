#!/usr/bin/env bash
# Bring up soft-RoCE (rxe) on this host:  scripts/rxe-setup.sh [IFACE] [RXE_NAME]
# IFACE defaults to the interface of the default route; RXE_NAME to rxe0. Idempotent. Needs root, a kernel
# built with CONFIG_RDMA_RXE (module rdma_rxe) and the `rdma` tool (iproute2). Where the kernel lacks rxe (these
# CI machines), use scripts/vm/exec.sh: it runs commands in a QEMU VM with Debian's kernel and rxe0 up.
set -euo pipefail
iface="${1:-$(ip -o route show default 2>/dev/null | awk '{print $5; exit}')}"
name="${2:-rxe0}"
die() { echo "rxe-setup: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (modprobe, rdma link add)"
command -v rdma >/dev/null || die "the 'rdma' tool is missing: apt-get install iproute2"
[ -n "$iface" ] || die "no interface given and no default route to pick one from"
ip link show "$iface" >/dev/null 2>&1 || die "no network interface $iface"
if ! modprobe rdma_rxe 2>/dev/null; then
  if [ ! -e "/lib/modules/$(uname -r)" ]; then
    die "kernel $(uname -r) has no module tree (/lib/modules/$(uname -r)): it cannot load rdma_rxe. Containers use the host's kernel: load it on the host. Or test in the VM: scripts/vm/exec.sh 'ibv_devinfo'"
  fi
  die "kernel $(uname -r) has no rdma_rxe module (CONFIG_RDMA_RXE not set?). Test in the VM instead: scripts/vm/exec.sh 'ibv_devinfo'"
fi
modprobe ib_uverbs 2>/dev/null || true
if rdma link show "$name/1" >/dev/null 2>&1; then
  echo "rxe-setup: $name already exists: $(rdma link show "$name/1")"
else
  ip link set "$iface" up
  rdma link add "$name" type rxe netdev "$iface" || die "rdma link add $name type rxe netdev $iface failed (see dmesg)"
  echo "rxe-setup: $name on $iface"
fi
[ -e /dev/infiniband/uverbs0 ] || echo "rxe-setup: warning: /dev/infiniband/uverbs* missing (no udev? mknod or load ib_uverbs)" >&2
if ! ip -o addr show "$iface" | grep -q 'inet '; then
  echo "rxe-setup: warning: $iface has no IPv4 address, so rxe has no RoCE v2 IPv4 GID; peers need an address" >&2
fi
echo "rxe-setup: memlock limit for this shell: $(ulimit -l) (registration pins memory: use 'ulimit -l unlimited')"
command -v ibv_devinfo >/dev/null && ibv_devinfo -d "$name" | grep -E 'hca_id|state|active_mtu' || true
