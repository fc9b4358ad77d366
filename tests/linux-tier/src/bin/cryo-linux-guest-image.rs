//! `cryo-linux-guest-image OUT`: builds cryo's Linux test guest initramfs
//! (busybox-static, the statically linked `cryo-workload`, the `/init` of
//! `resources/linux-guest`, the virtio modules of the Debian cloud kernel
//! and the ext4 tools) and writes it to OUT, for
//! `cryo run --kernel VMLINUX --initrd OUT`.

use std::path::PathBuf;
use std::process::ExitCode;

use cryo_linux_tier::{artifacts, guest_image};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cryo-linux-guest-image OUT.cpio");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    let result = artifacts::busybox().and_then(|busybox| {
        let bins = artifacts::static_binaries()?;
        let modules = artifacts::guest_modules()?;
        let tools = artifacts::guest_disk_tools()?;
        guest_image::write_guest_initramfs(&out, &busybox, &bins, &modules, &tools)
    });
    match result {
        Ok(()) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cryo-linux-guest-image: {e}");
            ExitCode::FAILURE
        }
    }
}
