#!/bin/busybox sh
# /init of cryo's Linux test guest (run by busybox sh as PID 1), and
# /sbin/init of its root-on-disk variant.
#
# Mounts the pseudo file systems, says what the kernel found, starts the
# workload in the background and hands the console to an interactive shell.
# Its output lines are described in docs/linux-guest.md.
#
# Settings come from the kernel command line (unknown name=value words
# reach init as environment variables):
#   workload_workers   worker processes (default 2)
#   workload_mib       MiB each worker rewrites and re-verifies (default 8)
#   workload_hb_ms     heartbeat period in milliseconds (default 500)
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
# Drivers the kernel builds as modules (virtio-mmio, virtio-blk and
# virtio-net with failover and net_failover on
# Debian's cloud kernel), in the order their names give. As the root
# filesystem's /sbin/init (the root-on-disk guest, booted through
# root-boot.sh), only virtio-net's are here: the others are loaded.
for m in /lib/modules/*.ko; do
    [ -e "$m" ] && insmod "$m"
done

rtc=$(cat /sys/class/rtc/rtc0/name 2>/dev/null || echo none)
echo "INIT cpus=$(nproc) uptime=$(cut -d' ' -f1 /proc/uptime) rtc=$rtc boot_id=$(cat /proc/sys/kernel/random/boot_id)"

/bin/cryo-workload --workers "${workload_workers:-2}" --mib "${workload_mib:-8}" \
    --hb-ms "${workload_hb_ms:-500}" --dir /tmp/cryo-workload &

# The console belongs to the shell from here on; the workload keeps printing.
exec setsid cttyhack sh
