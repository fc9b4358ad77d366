#!/bin/busybox sh
# /init of the boot initramfs of cryo's root-on-disk Linux guest, as a
# distribution's initramfs does it: load the drivers that reach the root
# disk, mount the root filesystem, and hand over to its /sbin/init.
#
# The Debian cloud kernel builds virtio, virtio_mmio and virtio_blk as
# modules (ext4 is built in), so `root=/dev/vda` alone cannot boot it.
# The root device comes from `root=` on the kernel command line (default
# /dev/vda); it is mounted read-write as ext4. The rest of the command
# line's name=value words stay in the environment for the next init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in /lib/modules/*.ko; do
    [ -e "$m" ] && insmod "$m"
done
root=/dev/vda
for word in $(cat /proc/cmdline); do
    case "$word" in
    root=*) root=${word#root=} ;;
    esac
done
# The disk appears when virtio_blk has probed it.
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if mount -t ext4 -o rw "$root" /newroot; then
    umount /dev /proc
    exec switch_root /newroot /sbin/init
fi
echo "ROOT-BOOT cannot mount $root as ext4; a shell instead"
exec sh
