#!/bin/sh
# Boot a Linux kernel in a qemu virtual machine and run one command in it.
#
#   tests/nfs/vm.sh OUTDIR COMMAND [ARG...]
#
# The guest's root file system is this machine's own root, read-only, over
# 9p, under a writable overlay kept in memory (the host sees no change);
# OUTDIR (created if missing) is shared writable at the same path, so
# the command can leave files there. The command runs as root in the guest,
# in OUTDIR, with an empty tmpfs on /run. Its output goes to
# OUTDIR/guest.log, its exit status to OUTDIR/guest.rc, the kernel's console
# to OUTDIR/console.log. This script exits with the command's status, or:
#   77  the machine cannot boot a VM here (the reason is on stderr, one line
#       starting "cannot boot:");
#   124 the guest did not finish within VM_TIMEOUT seconds (default 600).
#
# Needs (Debian): qemu-system-x86, linux-image-amd64 (a kernel with the 9p
# modules), busybox-static. Environment: VM_KERNEL (default: the newest
# /boot/vmlinuz-*), VM_MEM (MiB, default 1024), VM_CPUS (default 1),
# VM_ACCEL (default tcg: plain emulation; "kvm" where it works),
# VM_TIMEOUT.
set -eu

here=$(cd "$(dirname "$0")" && pwd)

cannot() {
    echo "cannot boot: $*" >&2
    exit 77
}

[ "$#" -ge 2 ] || { echo "usage: $0 OUTDIR COMMAND [ARG...]" >&2; exit 2; }
out=$1
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
case "$out" in
*[!A-Za-z0-9/._-]*) echo "OUTDIR must be a plain path: $out" >&2; exit 2 ;;
esac

qemu=$(command -v qemu-system-x86_64 || true)
[ -n "$qemu" ] || cannot "qemu-system-x86_64 not found (Debian: qemu-system-x86)"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || cannot "busybox not found (Debian: busybox-static)"
# The initramfs runs busybox alone, so it must be the static build.
if command -v ldd >/dev/null && ldd "$busybox" >/dev/null 2>&1; then
    cannot "$busybox is dynamically linked (Debian: busybox-static)"
fi

kernel=${VM_KERNEL:-}
if [ -z "$kernel" ]; then
    kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$kernel" ] && [ -r "$kernel" ] || cannot "no readable kernel in /boot (Debian: linux-image-amd64)"
kver=${kernel##*/vmlinuz-}
moddir=/lib/modules/$kver
[ -d "$moddir" ] || cannot "no modules for kernel $kver in $moddir"

# 9p root: virtio transport and the 9p file system, in load order.
mods="kernel/drivers/virtio/virtio_ring kernel/drivers/virtio/virtio
kernel/drivers/virtio/virtio_pci_modern_dev kernel/drivers/virtio/virtio_pci_legacy_dev
kernel/drivers/virtio/virtio_pci kernel/net/9p/9pnet kernel/net/9p/9pnet_virtio
kernel/fs/netfs/netfs kernel/fs/fscache/fscache kernel/fs/9p/9p kernel/fs/overlayfs/overlay"

work=$(mktemp -d)
qpid=
cleanup() {
    if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

mkdir -p "$work/root/bin" "$work/root/mods" "$work/root/newroot" "$work/root/proc" "$work/root/dev" \
    "$work/root/lower" "$work/root/rw"
cp "$busybox" "$work/root/bin/busybox"
n=0
for m in $mods; do
    f=
    for ext in .ko .ko.xz .ko.zst .ko.gz; do
        if [ -e "$moddir/$m$ext" ]; then f=$moddir/$m$ext; break; fi
    done
    if [ -z "$f" ]; then
        # Built into the kernel rather than a module: nothing to load.
        grep -q "/${m##*/}.ko" "$moddir/modules.builtin" 2>/dev/null && continue
        cannot "module ${m##*/} not found under $moddir"
    fi
    case "$f" in
    *.ko) cp "$f" "$work/root/mods/$n.ko" ;;
    *.ko.xz) xz -dc "$f" >"$work/root/mods/$n.ko" ;;
    *.ko.zst) zstd -dcq "$f" >"$work/root/mods/$n.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$work/root/mods/$n.ko" ;;
    esac
    n=$((n + 1))
done

# Stage 1 (in the initramfs): load the modules, mount the host's root over
# 9p and switch to it; stage 2 is guest-init.sh from this directory.
cat >"$work/root/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
i=0
while [ -e /mods/\$i.ko ]; do
    /bin/busybox insmod /mods/\$i.ko || echo "vm: insmod \$i failed"
    i=\$((i + 1))
done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower \
    || { echo "vm: cannot mount the host root"; /bin/busybox poweroff -f; }
# Writable on top (in memory), so the guest can create what it needs
# anywhere (/localdisk, /tmp) without hiding any of the host's files.
/bin/busybox mount -t tmpfs -o mode=755 rw /rw
/bin/busybox mkdir -p /rw/upper /rw/work
/bin/busybox mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
    || { echo "vm: cannot mount the overlay root"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev 2>/dev/null || /bin/busybox umount /dev
exec /bin/busybox switch_root /newroot /bin/sh $here/guest-init.sh "$out"
EOF
chmod +x "$work/root/init"
(cd "$work/root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd"

# The command, quoted for the guest's shell.
{
    printf 'cd %s || exit 125\nexec' "$out"
    for a in "$@"; do
        printf " '%s'" "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"
    done
    printf '\n'
} >"$out/guest.cmd"
rm -f "$out/guest.rc" "$out/guest.log" "$out/console.log"

accel=${VM_ACCEL:-tcg}
"$qemu" -accel "$accel" -machine q35 -cpu max -m "${VM_MEM:-1024}" -smp "${VM_CPUS:-1}" \
    -kernel "$kernel" -initrd "$work/initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$out,mount_tag=out,security_model=none,multidevs=remap" \
    -nic none -display none -monitor none -no-reboot \
    -serial "file:$out/console.log" </dev/null >"$work/qemu.log" 2>&1 &
qpid=$!

deadline=$(($(date +%s) + ${VM_TIMEOUT:-600}))
while kill -0 "$qpid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "vm: the guest did not finish within ${VM_TIMEOUT:-600} s" >&2
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
        qpid=
        exit 124
    fi
    sleep 1
done
wait "$qpid" 2>/dev/null || true
qpid=
if [ ! -s "$out/guest.rc" ]; then
    # qemu itself failed, or the kernel never reached the command.
    if [ -s "$work/qemu.log" ]; then
        cannot "qemu: $(head -c 300 "$work/qemu.log" | tr '\n' ' ')"
    fi
    if ! grep -q "vm: guest started" "$out/console.log" 2>/dev/null; then
        cannot "the guest kernel did not reach its init (see $out/console.log: $(tail -n 3 "$out/console.log" 2>/dev/null | tr '\n' ' ' | head -c 300))"
    fi
    echo "vm: the guest stopped before its command finished (see $out/console.log)" >&2
    exit 125
fi
exit "$(cat "$out/guest.rc")"
