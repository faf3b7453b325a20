#!/usr/bin/env bash
# Build (or reuse) the soft-RoCE test VM: Debian bookworm rootfs with rdma-core, pyverbs, perftest and the
# Python packages rdmapool needs, Debian's 6.1 kernel (rdma_rxe is a module there), an initramfs that can
# mount a virtio disk. Cached OUTSIDE the checkout in $RDMAPOOL_VM_CACHE (default ~/.cache/rdmapool/rxe-vm);
# rebuilt when missing or when this recipe changed (the stamp holds a hash of this file and guest-init.sh).
# Needs root (debootstrap, chroot) and the host packages debootstrap, qemu-utils, e2fsprogs.
# Prints the cache directory on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RDMAPOOL_VM_CACHE:-$HOME/.cache/rdmapool/rxe-vm}"
mirror="${RDMAPOOL_VM_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && !/security/ {print $2; exit}' || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
guest_pkgs="kmod,iproute2,rdma-core,ibverbs-utils,ibverbs-providers,python3,python3-pyverbs,perftest,procps,\
initramfs-tools,busybox,python3-msgpack,python3-xxhash,python3-numpy,python3-pytest,python3-pytest-timeout,\
python3-hypothesis,python3-prometheus-client,python3-etcd3gw,etcd-server,etcd-client"

die() { echo "[vm-image] error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "building the VM image needs root (debootstrap and chroot)"
for tool in debootstrap mkfs.ext4 dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh (apt packages debootstrap, e2fsprogs)"
done

recipe="$(cat "$0" "$here/guest-init.sh" | sha256sum | cut -c1-16)"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 900 9 || die "timed out waiting for another build holding $cache/.lock"

if [ -f "$cache/stamp" ] && [ "$(cat "$cache/stamp")" = "$recipe" ] && [ -f "$cache/rootfs.img" ] \
   && [ -f "$cache/vmlinuz" ] && [ -f "$cache/initrd.img" ]; then
  echo "[vm-image] cached image is current ($recipe)" >&2
  echo "$cache"
  exit 0
fi

echo "[vm-image] building in $cache (recipe $recipe, mirror $mirror)" >&2
start=$(date +%s)
work="$cache/build"
rm -rf "$work" "$cache/stamp"
mkdir -p "$work/kernel"

# Kernel: the version the linux-image-amd64 metapackage points at, downloaded (not installed) and unpacked.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
[ -n "$kpkg" ] || { apt-get update -qq || true; kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"; }
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (apt-get update?)"
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed"
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
kver="$(ls "$work/kernel/lib/modules" | head -1)"
[ -f "$work/kernel/lib/modules/$kver/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko" ] \
  || die "kernel $kver has no rdma_rxe module"

root="$work/rootfs"
debootstrap --variant=minbase --include="$guest_pkgs" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }

mkdir -p "$root/lib/modules" "$root/boot"
cp -a "$work/kernel/lib/modules/$kver" "$root/lib/modules/"
cp "$work/kernel/boot/config-$kver" "$root/boot/"
chroot "$root" depmod "$kver"
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$root/etc/initramfs-tools/modules"
chroot "$root" mkinitramfs -o /boot/initrd.img "$kver" >/dev/null 2>&1 || die "mkinitramfs failed"
install -m 0755 "$here/guest-init.sh" "$root/init.sh"
mkdir -p "$root/mnt/proj" "$root/mnt/job"
echo rxe-vm >"$root/etc/hostname"
# Shrink: docs, apt caches and locales are dead weight on a test disk.
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*

cp "$work/kernel/boot/vmlinuz-$kver" "$cache/vmlinuz"
cp "$root/boot/initrd.img" "$cache/initrd.img"
size_mb=$(( $(du -sm "$root" | cut -f1) + 400 ))
rm -f "$cache/rootfs.img"
mkfs.ext4 -q -F -L rxe-root -d "$root" "$cache/rootfs.img" "${size_mb}M" || die "mkfs.ext4 -d failed"
echo "$kver" >"$cache/kernel-version"
rm -rf "$work"
echo "$recipe" >"$cache/stamp"
echo "[vm-image] built in $(( $(date +%s) - start ))s: kernel $kver, disk ${size_mb} MB" >&2
echo "$cache"
