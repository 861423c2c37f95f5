#!/bin/sh
# Stage 2 of the VM started by vm.sh: process 1 of the guest, on the host's
# root file system (read-only over 9p). Mounts what a system needs, runs the
# command vm.sh left in OUTDIR/guest.cmd, records its status and powers off.
out=$1
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null || true
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts 2>/dev/null || true
mount -t tmpfs tmpfs /dev/shm 2>/dev/null || true
# Fresh, as after a boot (the rest of the root is the host's, under a
# writable overlay).
for d in /run; do
    mkdir -p "$d" && mount -t tmpfs -o mode=755 tmpfs "$d"
done
mkdir -p "$out"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$out"
# Give the guest its own host name so it never passes for this machine.
hostname latd-vm 2>/dev/null || true
ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || true
echo "vm: guest started $(cat /proc/uptime)" >/dev/console
HOME=/root TMPDIR=/tmp LANG=C.UTF-8
export HOME TMPDIR LANG
sh "$out/guest.cmd" >"$out/guest.log" 2>&1 </dev/null
rc=$?
echo "$rc" >"$out/guest.rc.tmp" && mv "$out/guest.rc.tmp" "$out/guest.rc"
echo "vm: guest command exited $rc $(cat /proc/uptime)" >/dev/console
sync
umount "$out" 2>/dev/null
echo o >/proc/sysrq-trigger
sleep 5
echo b >/proc/sysrq-trigger
