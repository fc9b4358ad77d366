//! A stock Debian cloud kernel under cryo.
//!
//! On PVM hosts (this project's machines) guest ring 0 is emulated: the
//! kernel gets through early boot (banner, e820 map) and no further. There
//! the ELF vmlinux is checked up to its e820 map; the bzImage (whose
//! decompressor alone takes minutes in the emulator) only with
//! `CRYO_SLOW_TESTS=1`. On hardware KVM both boot to an initramfs `/init`
//! that prints a marker and the CPU count, then reset through the i8042.

use std::path::PathBuf;
use std::time::Duration;

use cryo_tests::initramfs::{build_initramfs, fetch_debian_kernel, INIT_MARKER};
use cryo_tests::{host_is_pvm, slow_tests_enabled, Guest};

fn kernel(name: &str) -> PathBuf {
    let dir = fetch_debian_kernel()
        .unwrap_or_else(|e| panic!("the Debian kernel is needed (resources/fetch-kernel.sh): {e}"));
    dir.join(name)
}

/// Follows early boot: the banner and the e820 map on the serial console.
fn early_boot(image: &str, timeout: Duration) {
    let k = kernel(image);
    let mut guest = Guest::spawn([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--mem-mib",
        "512",
        "--vcpus",
        "2",
        "--cmdline",
        "console=ttyS0 earlyprintk=serial reboot=k panic=-1",
    ]);
    let banner = guest.wait_for(timeout, |l| l.contains("Linux version"));
    assert!(banner.is_some(), "no Linux banner\n{}", guest.transcript());
    let e820 = guest.wait_for(timeout, |l| {
        l.contains("BIOS-e820:") && l.contains("usable")
    });
    assert!(e820.is_some(), "no e820 map\n{}", guest.transcript());
    let mut last_usable = None;
    let end = guest.wait_for(Duration::from_secs(10), |l| {
        if l.contains("BIOS-e820:") {
            last_usable = Some(l.to_string());
            false
        } else {
            true
        }
    });
    assert!(
        end.is_some(),
        "e820 map never ended\n{}",
        guest.transcript()
    );
    // 512 MiB of RAM ends at 0x1fffffff.
    assert!(
        guest
            .output()
            .iter()
            .any(|l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable")),
        "unexpected e820 map\n{}",
        guest.transcript()
    );
    guest.kill();
}

/// Boots to the initramfs /init (hardware KVM only).
fn full_boot(image: &str) {
    let k = kernel(image);
    let work = std::env::temp_dir().join(format!("cryo-initramfs-{}-{image}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let initrd = build_initramfs(&work).expect("build the initramfs");
    let mut guest = Guest::spawn([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem-mib",
        "512",
        "--vcpus",
        "2",
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1",
    ]);
    let marker = guest.wait_for(Duration::from_secs(120), |l| l.contains(INIT_MARKER));
    let marker = marker.unwrap_or_else(|| panic!("no {INIT_MARKER}\n{}", guest.transcript()));
    assert!(marker.contains("cpus=2"), "{marker}");
    let status = guest.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        guest.transcript()
    );
}

#[test]
fn debian_vmlinux_early_boot() {
    early_boot("debian-cloud-vmlinux", Duration::from_secs(120));
}

#[test]
fn debian_bzimage_early_boot() {
    if host_is_pvm() && !slow_tests_enabled() {
        eprintln!("skipped: on PVM the bzImage decompressor runs for minutes in the emulator; set CRYO_SLOW_TESTS=1 to run it");
        return;
    }
    early_boot("debian-cloud-bzImage", Duration::from_secs(900));
}

#[test]
fn debian_vmlinux_boots_to_init() {
    if host_is_pvm() {
        eprintln!("skipped: this host's KVM is PVM (/sys/module/kvm_pvm), where guest ring 0 is emulated and a stock kernel dies in early boot; runs on hardware KVM");
        return;
    }
    full_boot("debian-cloud-vmlinux");
}

#[test]
fn debian_bzimage_boots_to_init() {
    if host_is_pvm() {
        eprintln!("skipped: this host's KVM is PVM (/sys/module/kvm_pvm), where guest ring 0 is emulated and a stock kernel dies in early boot; runs on hardware KVM");
        return;
    }
    full_boot("debian-cloud-bzImage");
}
