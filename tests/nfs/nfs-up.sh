#!/bin/sh
# Inside the VM (see vm.sh): start the kernel NFS server and give two
# "hosts" the same export, as two machines mounting one NFS volume would.
#
#   nfs-up.sh LEASE_SECS GRACE_SECS HOST:ADDRESS:MOUNT_OPTIONS...
#
# LEASE_SECS/GRACE_SECS "default" leaves the server's own (90 s each).
# The export (a tmpfs) is /mnt/export; nothing but the server touches it
# there. Each HOST (a name: a, b, ...) mounts it from ADDRESS (127.0.0.1,
# 127.0.0.2, ...: any address of the loopback) at /mnt/HOST, from its own
# UTS namespace (host name host-HOST). Hosts on different addresses are
# different NFSv4 clients, with their own client id, lease, delegations and
# caches, as two machines are (two mounts of one address, even with
# `nosharecache`, share one client: one lease, one set of delegations).
# Each host also has a mount namespace (/run/ns/mnt-HOST) and a UTS
# namespace (/run/ns/uts-HOST), in which its mount is also at /localdisk:
# the same workspace path on every side, as the LAT container and the
# builder have. Enter with
#   nsenter --mount=/run/ns/mnt-a --uts=/run/ns/uts-a COMMAND
set -eu
lease=$1 grace=$2
shift 2

modprobe nfsd
mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
[ "$lease" = default ] || echo "$lease" >/proc/fs/nfsd/nfsv4leasetime
[ "$grace" = default ] || echo "$grace" >/proc/fs/nfsd/nfsv4gracetime
mkdir -p /run/rpcbind
rpcbind -w
mountpoint -q /mnt || mount -t tmpfs -o mode=755 tmpfs /mnt
mkdir -p /mnt/export /localdisk
mount -t tmpfs -o mode=755 export /mnt/export
exportfs -o rw,no_root_squash,fsid=0,insecure,no_subtree_check,sync 127.0.0.0/8:/mnt/export
rpc.mountd
rpc.nfsd 4

mkdir -p /run/ns
mount --bind /run/ns /run/ns
mount --make-private /run/ns
for spec in "$@"; do
    h=${spec%%:*} rest=${spec#*:}
    addr=${rest%%:*} opts=${rest#*:}
    mkdir -p "/mnt/$h"
    unshare -u sh -c "hostname host-$h && mount -t nfs4 -o '$opts' $addr:/ /mnt/$h"
    touch "/run/ns/mnt-$h" "/run/ns/uts-$h"
    unshare --mount="/run/ns/mnt-$h" --uts="/run/ns/uts-$h" --propagation private \
        sh -c "hostname host-$h && mount --bind /mnt/$h /localdisk"
done
echo "nfs-up: lease $(cat /proc/fs/nfsd/nfsv4leasetime) s, grace $(cat /proc/fs/nfsd/nfsv4gracetime) s"
grep ' nfs4 ' /proc/mounts
