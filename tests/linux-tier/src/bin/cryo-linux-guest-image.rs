//! `cryo-linux-guest-image OUT.cpio`: builds cryo's Linux test guest
//! initramfs (busybox-static, the statically linked `cryo-workload`, the
//! `/init` of `resources/linux-guest`, the virtio modules of the Debian
//! cloud kernel and the ext4 tools) and writes it to OUT, for
//! `cryo run --kernel VMLINUX --initrd OUT`.
//!
//! `cryo-linux-guest-image --rootfs ROOT.ext4 BOOT.cpio`: builds the
//! root-on-disk guest instead: an ext4 root filesystem image (busybox, the
//! workload, `/sbin/init`, the virtio-net modules) and the small initramfs
//! that loads the virtio-blk modules, mounts it and `switch_root`s into it,
//! for `cryo run --kernel VMLINUX --initrd BOOT.cpio --disk ROOT.ext4`.

use std::path::PathBuf;
use std::process::ExitCode;

use cryo_linux_tier::guest_image::RootDisk;
use cryo_linux_tier::{artifacts, guest_image, TierError};

const USAGE: &str =
    "usage: cryo-linux-guest-image OUT.cpio | cryo-linux-guest-image --rootfs ROOT.ext4 BOOT.cpio";

fn build(args: &[PathBuf]) -> Option<Result<PathBuf, TierError>> {
    let result = match args {
        [out] => artifacts::busybox().and_then(|busybox| {
            let bins = artifacts::static_binaries()?;
            let modules = artifacts::guest_modules()?;
            let tools = artifacts::guest_disk_tools()?;
            guest_image::write_guest_initramfs(out, &busybox, &bins, &modules, &tools)
                .map(|()| out.clone())
        }),
        [flag, image, initrd] if flag.as_os_str() == "--rootfs" => {
            artifacts::busybox().and_then(|busybox| {
                let bins = artifacts::static_binaries()?;
                let modules = artifacts::guest_modules()?;
                let disk = RootDisk {
                    image: image.clone(),
                    initrd: initrd.clone(),
                };
                guest_image::write_root_disk(&disk, &busybox, &bins, &modules)
                    .map(|()| image.clone())
            })
        }
        _ => return None,
    };
    Some(result)
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    match build(&args) {
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Some(Ok(out)) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("cryo-linux-guest-image: {e}");
            ExitCode::FAILURE
        }
    }
}
