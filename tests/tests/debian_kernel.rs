//! A stock Debian cloud kernel under cryo, directly on this host's KVM: its
//! early boot (banner, e820 map), which every host kind gets through.
//!
//! Full boots to user space, of the vmlinux and the bzImage, are the Linux
//! tier's (`tests/linux-tier`): directly on hardware KVM, nested under QEMU
//! TCG on PVM hosts, where guest ring 0 is emulated and a stock kernel
//! stops in early boot.

use std::path::PathBuf;
use std::time::Duration;

use cryo_tests::initramfs::fetch_debian_kernel;
use cryo_tests::Guest;

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

#[test]
fn debian_vmlinux_early_boot() {
    early_boot("debian-cloud-vmlinux", Duration::from_secs(120));
}

#[test]
#[ignore = "on PVM the bzImage's decompressor runs for minutes in KVM's instruction emulator; the Linux tier (tests/linux-tier) boots the bzImage to user space on every host kind; run this with --ignored"]
fn debian_bzimage_early_boot() {
    early_boot("debian-cloud-bzImage", Duration::from_secs(900));
}
