//! `cryo-linux-driver`: runs the Linux tier's scenarios against a `cryo`
//! binary and prints the results as `LINUX-TIER` lines.
//!
//! It runs where KVM is real: directly on a host with hardware KVM, or as
//! the program of the nested machine's `/init`. It is statically linked, so
//! that the nested machine needs nothing but busybox.
//!
//! Usage: `cryo-linux-driver [--nested] --cryo PATH --kernel VMLINUX --bzimage BZIMAGE --initrd CPIO --root-initrd CPIO --rootfs EXT4 --work DIR`
//! (`--nested`: running inside the tier's QEMU TCG machine; `--root-initrd`
//! and `--rootfs`: the root-on-disk guest's boot initramfs and root
//! filesystem, which the driver copies before use).

use std::path::PathBuf;
use std::process::ExitCode;

use cryo_linux_tier::report;
use cryo_linux_tier::scenarios::{run_all, Setup};

fn main() -> ExitCode {
    let mut cryo = None;
    let mut kernel = None;
    let mut bzimage = None;
    let mut initrd = None;
    let mut root_initrd = None;
    let mut rootfs = None;
    let mut work = None;
    let mut nested = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--nested" {
            nested = true;
            continue;
        }
        let value = args.next().map(PathBuf::from);
        match (flag.as_str(), value) {
            ("--cryo", Some(v)) => cryo = Some(v),
            ("--kernel", Some(v)) => kernel = Some(v),
            ("--bzimage", Some(v)) => bzimage = Some(v),
            ("--initrd", Some(v)) => initrd = Some(v),
            ("--root-initrd", Some(v)) => root_initrd = Some(v),
            ("--rootfs", Some(v)) => rootfs = Some(v),
            ("--work", Some(v)) => work = Some(v),
            (other, _) => {
                eprintln!("cryo-linux-driver: bad argument {other} (usage: --cryo PATH --kernel VMLINUX --bzimage BZIMAGE --initrd CPIO --root-initrd CPIO --rootfs EXT4 --work DIR)");
                return ExitCode::from(2);
            }
        }
    }
    let (
        Some(cryo),
        Some(kernel),
        Some(bzimage),
        Some(initrd),
        Some(root_initrd),
        Some(rootfs),
        Some(work),
    ) = (cryo, kernel, bzimage, initrd, root_initrd, rootfs, work)
    else {
        eprintln!(
            "cryo-linux-driver: --cryo, --kernel, --bzimage, --initrd, --root-initrd, --rootfs and --work are all needed"
        );
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("cryo-linux-driver: cannot create {}: {e}", work.display());
        return ExitCode::from(2);
    }
    // The test helpers run `cryo` from here (there is no cargo to build it).
    std::env::set_var("CRYO_BIN", &cryo);
    report::keep_saying_alive();
    let failed = run_all(&Setup {
        kernel,
        bzimage,
        initrd,
        root_initrd,
        rootfs,
        work,
        nested,
    });
    report::done(failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
