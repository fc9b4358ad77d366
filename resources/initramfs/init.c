/*
 * Tiny /init for cryo's Linux boot tests.
 *
 * Prints one marker line to /dev/console (falling back to stdout):
 *
 *     CRYO-INIT-OK cpus=<N>
 *
 * where N is the number of online CPUs, then syncs and reboots the machine.
 * cryo has no ACPI power-off device, so we use RB_AUTOBOOT: with the kernel
 * booted with `reboot=k` it resets through the i8042 keyboard controller,
 * which the VMM treats as a clean guest exit.
 *
 * Build: gcc -static -Os -o init init.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

/* Count CPUs in a cpulist such as "0-3,5,7-8". Returns -1 on parse error. */
static long count_cpulist(const char *s)
{
    long total = 0;
    while (*s && *s != '\n') {
        char *end;
        long a = strtol(s, &end, 10), b;
        if (end == s)
            return -1;
        s = end;
        b = a;
        if (*s == '-') {
            s++;
            b = strtol(s, &end, 10);
            if (end == s || b < a)
                return -1;
            s = end;
        }
        total += b - a + 1;
        if (*s == ',')
            s++;
    }
    return total > 0 ? total : -1;
}

static long online_cpus(void)
{
    char buf[256];
    long n = -1;
    int fd = open("/sys/devices/system/cpu/online", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t len = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (len > 0) {
            buf[len] = '\0';
            n = count_cpulist(buf);
        }
    }
    if (n <= 0)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 0) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0)
            n = CPU_COUNT(&set);
    }
    return n;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += w;
        len -= (size_t)w;
    }
}

int main(void)
{
    char line[64];
    int out, len;

    /* Only sysfs is needed (CPU count); /proc helps sysconf's fallback. */
    mkdir("/sys", 0555);
    mkdir("/proc", 0555);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);

    out = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (out < 0)
        out = STDOUT_FILENO;

    /* Leading newline: start on a fresh line even after kernel output. */
    len = snprintf(line, sizeof(line), "\nCRYO-INIT-OK cpus=%ld\n", online_cpus());
    if (len > 0)
        write_all(out, line, (size_t)len);
    if (out != STDOUT_FILENO)
        close(out);

    sync();
    reboot(RB_AUTOBOOT);
    /* Fallback if reset is refused; init must never exit (kernel panic). */
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}
