#!/bin/busybox sh
# /init of the Linux tier's nested machine (QEMU TCG, 2 vCPUs).
#
# Loads the KVM modules (QEMU's "max" CPU emulates AMD SVM, so this is
# ordinary kvm-amd), runs the scenario driver against the guest's kernel and
# initramfs, and powers off. Everything goes to the console, which is
# QEMU's standard output; the harness reads the LINUX-TIER lines from it.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
# KVM's trace events: a stalled guest's failure log shows where it was.
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null ||
    echo "LINUX-TIER NESTED no tracefs"

for module in /modules/*.ko; do
    insmod "$module" || echo "LINUX-TIER NESTED insmod $module failed"
done
if [ -c /dev/kvm ]; then
    echo "LINUX-TIER NESTED kvm ready uptime=$(cut -d' ' -f1 /proc/uptime)"
    /bin/cryo-linux-driver --nested --cryo /bin/cryo --kernel /guest/vmlinux \
        --bzimage /guest/bzImage \
        --initrd /guest/initramfs.cpio --root-initrd /guest/root-initramfs.cpio \
        --rootfs /guest/rootfs.ext4 --work /tmp/tier
    echo "LINUX-TIER NESTED driver exited $?"
else
    echo "LINUX-TIER NESTED no /dev/kvm after loading the modules"
fi
poweroff -f
