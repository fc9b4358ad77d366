//! The initramfs images: the Linux guest's (busybox, the workload and the
//! `/init` of `resources/linux-guest`), and the nested machine's (busybox,
//! the KVM modules, cryo, the driver and the guest's kernel and initramfs).

use std::fs;
use std::path::{Path, PathBuf};

use cryo_tests::initramfs::CpioArchive;
use cryo_tests::workspace_root;

use crate::artifacts::{GuestKernel, HostKernel, StaticBinaries};
use crate::TierError;

/// Where the nested machine's `/init` finds the guest's kernel.
pub const NESTED_GUEST_KERNEL: &str = "guest/vmlinux";
/// Where the nested machine's `/init` finds the guest's kernel as a bzImage.
pub const NESTED_GUEST_BZIMAGE: &str = "guest/bzImage";
/// Where the nested machine's `/init` finds the guest's initramfs.
pub const NESTED_GUEST_INITRD: &str = "guest/initramfs.cpio";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TierError + '_ {
    move |e| TierError::Io(path.to_path_buf(), e)
}

fn skeleton(archive: &mut CpioArchive) -> std::io::Result<()> {
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        archive.dir(dir)?;
    }
    archive.char_device("dev/console", 5, 1)?;
    Ok(())
}

/// Builds the Linux guest's initramfs into `work`; returns its path.
/// `modules` go to `/lib/modules/` (the guest's `/init` loads them in name
/// order), `tools` (path in the guest, host file) are added as they are.
pub fn guest_initramfs(
    work: &Path,
    busybox: &Path,
    bins: &StaticBinaries,
    modules: &[PathBuf],
    tools: &[(String, PathBuf)],
) -> Result<PathBuf, TierError> {
    let path = work.join("guest-initramfs.cpio");
    write_guest_initramfs(&path, busybox, bins, modules, tools)?;
    Ok(path)
}

/// Writes the Linux guest's initramfs to `path`: busybox, the workload,
/// the kernel modules `/init` loads, and the disk tools (each with the
/// name it gets in the guest).
pub fn write_guest_initramfs(
    path: &Path,
    busybox: &Path,
    bins: &StaticBinaries,
    modules: &[PathBuf],
    tools: &[(String, PathBuf)],
) -> Result<(), TierError> {
    let init = workspace_root().join("resources/linux-guest/init.sh");
    let mut a = CpioArchive::new();
    skeleton(&mut a)
        .and_then(|()| a.host_file("init", 0o755, &init).map(|_| ()))
        .and_then(|()| a.host_file("bin/busybox", 0o755, busybox).map(|_| ()))
        .and_then(|()| {
            a.host_file("bin/cryo-workload", 0o755, &bins.workload)
                .map(|_| ())
        })
        .map_err(io(path))?;
    add_modules_and_tools(&mut a, modules, tools).map_err(io(path))?;
    fs::write(path, a.finish().map_err(io(path))?).map_err(io(path))
}

fn add_modules_and_tools(
    a: &mut CpioArchive,
    modules: &[PathBuf],
    tools: &[(String, PathBuf)],
) -> std::io::Result<()> {
    a.dir("lib")?.dir("lib/modules")?;
    for (i, module) in modules.iter().enumerate() {
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        // The number keeps the load order that the guest's /init follows.
        a.host_file(&format!("lib/modules/{i}-{name}"), 0o644, module)?;
    }
    let mut dirs: Vec<String> = Vec::new();
    for (guest, host) in tools {
        let mut prefix = String::new();
        for part in Path::new(guest).parent().into_iter().flat_map(Path::iter) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&part.to_string_lossy());
            if !dirs.contains(&prefix) && prefix != "bin" && prefix != "lib" {
                a.dir(&prefix)?;
                dirs.push(prefix.clone());
            }
        }
        a.host_file(guest, 0o755, host)?;
    }
    Ok(())
}

/// Builds the nested machine's initramfs into `work`; returns its path.
pub fn nested_initramfs(
    work: &Path,
    busybox: &Path,
    bins: &StaticBinaries,
    host_kernel: &HostKernel,
    guest_kernel: &GuestKernel,
    guest_initrd: &Path,
) -> Result<PathBuf, TierError> {
    let init = workspace_root().join("tests/linux-tier/nested-init.sh");
    let path = work.join("nested-initramfs.cpio");
    let mut a = CpioArchive::new();
    let build = |a: &mut CpioArchive| -> std::io::Result<()> {
        skeleton(a)?;
        a.dir("modules")?.dir("guest")?;
        a.host_file("init", 0o755, &init)?;
        a.host_file("bin/busybox", 0o755, busybox)?;
        a.host_file("bin/cryo", 0o755, &bins.cryo)?;
        a.host_file("bin/cryo-linux-driver", 0o755, &bins.driver)?;
        for (i, module) in host_kernel.modules.iter().enumerate() {
            let name = module.file_name().unwrap_or_default().to_string_lossy();
            // The number keeps the load order that nested-init.sh follows.
            a.host_file(&format!("modules/{i}-{name}"), 0o644, module)?;
        }
        a.host_file(NESTED_GUEST_KERNEL, 0o644, &guest_kernel.vmlinux)?;
        a.host_file(NESTED_GUEST_BZIMAGE, 0o644, &guest_kernel.bzimage)?;
        a.host_file(NESTED_GUEST_INITRD, 0o644, guest_initrd)?;
        Ok(())
    };
    build(&mut a).map_err(io(&path))?;
    fs::write(&path, a.finish().map_err(io(&path))?).map_err(io(&path))?;
    Ok(path)
}
