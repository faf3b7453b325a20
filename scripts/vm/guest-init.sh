#!/bin/sh
# PID 1 of the rxe test VM (installed as /init.sh by build-image.sh). There is no udev or systemd: mount the
# pseudo file systems, load the modules, bring up the NIC and rxe0, mount the host's shares over 9p, run the
# job's cmd.sh from the "job" share with the checkout as working directory, leave its output and exit code in
# that share, power off. Kernel command line parameters (set by run.sh):
#   rdmapool.ip=ADDR/PREFIX   address of the first NIC (default 10.0.2.15/24, QEMU user networking)
#   rdmapool.timeout=SECONDS  the job is killed after this long (default 600)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

ip=10.0.2.15/24
timeout=600
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    rdmapool.ip=*) ip="${arg#rdmapool.ip=}" ;;
    rdmapool.timeout=*) timeout="${arg#rdmapool.timeout=}" ;;
  esac
done

for m in virtio_net 9pnet_virtio 9p rdma_rxe ib_uverbs; do modprobe "$m" || echo "[guest] modprobe $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 job /mnt/job || { echo "[guest] no job share"; echo o >/proc/sysrq-trigger; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 proj /mnt/proj || echo "[guest] no checkout share" >>/mnt/job/guest.log

ip link set lo up
nic=""
for n in /sys/class/net/*; do
  n="${n##*/}"; [ "$n" = lo ] && continue; nic="$n"; break
done
{
  echo "[guest] kernel $(uname -r), nic ${nic:-none}, ip $ip"
  if [ -n "$nic" ]; then
    ip link set "$nic" up && ip addr add "$ip" dev "$nic"
    rdma link add rxe0 type rxe netdev "$nic" && echo "[guest] rxe0 on $nic"
  fi
} >>/mnt/job/guest.log 2>&1
hostname "rxe-vm-${ip%%/*}"
ulimit -l unlimited

cd /mnt/proj 2>/dev/null || cd /
# The checkout is read-only: byte-code goes to a tmpfs cache, compiled once per boot (TCG compiles slowly).
export HOME=/root PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONPATH=/mnt/proj RDMAPOOL_JOB=/mnt/job RDMAPOOL_IN_VM=1
export RDMAPOOL_VM_IP="${ip%%/*}"
timeout -k 5 "$timeout" sh /mnt/job/cmd.sh >/mnt/job/output.log 2>&1
echo $? >/mnt/job/rc.tmp
sync
mv /mnt/job/rc.tmp /mnt/job/rc
sync
umount /mnt/job /mnt/proj 2>/dev/null
echo o >/proc/sysrq-trigger
sleep 30
