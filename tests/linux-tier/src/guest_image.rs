//! The guest images: the Linux guest's initramfs (busybox, the workload and
//! the `/init` of `resources/linux-guest`); the root-on-disk guest's ext4
//! root filesystem and the small initramfs that mounts it; and the nested
//! machine's initramfs (busybox, the KVM modules, cryo, the driver, the
//! guests' kernel and images, and `e2fsck`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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
/// Where the nested machine's `/init` finds the root-on-disk guest's boot
/// initramfs.
pub const NESTED_ROOT_INITRD: &str = "guest/root-initramfs.cpio";
/// Where the nested machine's `/init` finds the root filesystem image.
pub const NESTED_ROOTFS: &str = "guest/rootfs.ext4";
/// Size of the root filesystem image.
pub const ROOTFS_BYTES: u64 = 64 << 20;
/// The modules the boot initramfs loads to reach the root disk (ext4 is
/// built into Debian's cloud kernel); the others go on the root filesystem.
pub const ROOT_BOOT_MODULES: &[&str] = &[
    "virtio_ring.ko",
    "virtio.ko",
    "virtio_mmio.ko",
    "virtio_blk.ko",
];

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
    add_modules(&mut a, modules)
        .and_then(|()| add_tools(&mut a, tools, &["bin", "lib"]))
        .map_err(io(path))?;
    fs::write(path, a.finish().map_err(io(path))?).map_err(io(path))
}

/// `modules` as `lib/modules/<i>-<name>`: the number keeps the load order
/// that the guest's `/init` follows (name order).
fn numbered(modules: &[PathBuf]) -> impl Iterator<Item = (String, &PathBuf)> {
    modules.iter().enumerate().map(|(i, module)| {
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        (format!("lib/modules/{i}-{name}"), module)
    })
}

fn add_modules(a: &mut CpioArchive, modules: &[PathBuf]) -> std::io::Result<()> {
    a.dir("lib")?.dir("lib/modules")?;
    for (guest, module) in numbered(modules) {
        a.host_file(&guest, 0o644, module)?;
    }
    Ok(())
}

/// Adds `tools` (path in the image, host file), with the directories they
/// need beyond `existing`.
fn add_tools(
    a: &mut CpioArchive,
    tools: &[(String, PathBuf)],
    existing: &[&str],
) -> std::io::Result<()> {
    let mut dirs: Vec<String> = existing.iter().map(|d| d.to_string()).collect();
    for (guest, host) in tools {
        let mut prefix = String::new();
        for part in Path::new(guest).parent().into_iter().flat_map(Path::iter) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&part.to_string_lossy());
            if !dirs.contains(&prefix) {
                a.dir(&prefix)?;
                dirs.push(prefix.clone());
            }
        }
        a.host_file(guest, 0o755, host)?;
    }
    Ok(())
}

/// The root-on-disk guest: its root filesystem image and the initramfs
/// that mounts it.
pub struct RootDisk {
    /// The ext4 image (`--disk`, the guest's /dev/vda).
    pub image: PathBuf,
    /// The boot initramfs (`--initrd`).
    pub initrd: PathBuf,
}

/// Builds the root-on-disk guest's images into `work` (see [`write_root_disk`]).
pub fn root_disk(
    work: &Path,
    busybox: &Path,
    bins: &StaticBinaries,
    modules: &[PathBuf],
) -> Result<RootDisk, TierError> {
    let disk = RootDisk {
        image: work.join("rootfs.ext4"),
        initrd: work.join("root-initramfs.cpio"),
    };
    write_root_disk(&disk, busybox, bins, modules)?;
    Ok(disk)
}

/// Writes the root-on-disk guest's images, as a distribution boots: a
/// small initramfs (busybox, `resources/linux-guest/root-boot.sh` as
/// `/init`, the [`ROOT_BOOT_MODULES`]) that mounts the root filesystem and
/// `switch_root`s into it; and that root filesystem, an ext4 image of
/// [`ROOTFS_BYTES`] made by the host's `mke2fs -d` from a staging
/// directory: busybox, the workload, the guest's `init.sh` as `/sbin/init`
/// and the other modules (virtio-net's).
pub fn write_root_disk(
    disk: &RootDisk,
    busybox: &Path,
    bins: &StaticBinaries,
    modules: &[PathBuf],
) -> Result<(), TierError> {
    let (boot, rest): (Vec<PathBuf>, Vec<PathBuf>) = modules.iter().cloned().partition(|m| {
        m.file_name()
            .is_some_and(|n| ROOT_BOOT_MODULES.iter().any(|b| n == *b))
    });
    let resources = workspace_root().join("resources/linux-guest");
    let path = &disk.initrd;
    let mut a = CpioArchive::new();
    skeleton(&mut a)
        .and_then(|()| a.dir("newroot").map(|_| ()))
        .and_then(|()| {
            a.host_file("init", 0o755, &resources.join("root-boot.sh"))
                .map(|_| ())
        })
        .and_then(|()| a.host_file("bin/busybox", 0o755, busybox).map(|_| ()))
        .and_then(|()| add_modules(&mut a, &boot))
        .map_err(io(path))?;
    fs::write(path, a.finish().map_err(io(path))?).map_err(io(path))?;

    let staging = disk.image.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    let mut files = vec![
        ("bin/busybox".to_string(), busybox.to_path_buf(), 0o755),
        (
            "bin/cryo-workload".to_string(),
            bins.workload.clone(),
            0o755,
        ),
        ("sbin/init".to_string(), resources.join("init.sh"), 0o755),
    ];
    files.extend(numbered(&rest).map(|(g, m)| (g, m.clone(), 0o644)));
    stage(&staging, &files).map_err(io(&staging))?;
    let made = mke2fs(&staging, &disk.image);
    let _ = fs::remove_dir_all(&staging);
    made
}

/// Fills `staging` with the root filesystem's directories and `files`
/// (path there, host file, mode).
fn stage(staging: &Path, files: &[(String, PathBuf, u32)]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "var",
        "lib/modules",
        "sbin",
        "bin",
    ] {
        fs::create_dir_all(staging.join(dir))?;
    }
    for (guest, host, mode) in files {
        let to = staging.join(guest);
        fs::copy(host, &to)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// `mke2fs -t ext4 -d staging image` with [`ROOTFS_BYTES`].
fn mke2fs(staging: &Path, image: &Path) -> Result<(), TierError> {
    let _ = fs::remove_file(image);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "cryo-root", "-d"])
        .arg(staging)
        .arg(image)
        .arg(format!("{}k", ROOTFS_BYTES >> 10))
        .output()
        .map_err(|e| TierError::Missing(format!("mke2fs (install e2fsprogs): {e}")))?;
    if !out.status.success() {
        return Err(TierError::Build(format!(
            "mke2fs -d {} {} failed ({}): {}",
            staging.display(),
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What the nested machine carries for its guests.
pub struct NestedGuests<'a> {
    /// The guest kernel.
    pub kernel: &'a GuestKernel,
    /// The guest's initramfs.
    pub initrd: &'a Path,
    /// The root-on-disk guest's images.
    pub root: &'a RootDisk,
    /// Host tools the driver runs on the guests' disks (`e2fsck`), as for
    /// the guest (`crate::artifacts::guest_disk_tools`).
    pub tools: &'a [(String, PathBuf)],
}

/// Builds the nested machine's initramfs into `work`; returns its path.
pub fn nested_initramfs(
    work: &Path,
    busybox: &Path,
    bins: &StaticBinaries,
    host_kernel: &HostKernel,
    guests: &NestedGuests,
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
        a.host_file(NESTED_GUEST_KERNEL, 0o644, &guests.kernel.vmlinux)?;
        a.host_file(NESTED_GUEST_BZIMAGE, 0o644, &guests.kernel.bzimage)?;
        a.host_file(NESTED_GUEST_INITRD, 0o644, guests.initrd)?;
        a.host_file(NESTED_ROOT_INITRD, 0o644, &guests.root.initrd)?;
        a.host_file(NESTED_ROOTFS, 0o644, &guests.root.image)?;
        add_tools(a, guests.tools, &["bin"])
    };
    build(&mut a).map_err(io(&path))?;
    fs::write(&path, a.finish().map_err(io(&path))?).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_filesystem_is_made_from_its_staging_directory() {
        let dir = std::env::temp_dir().join(format!("cryo-rootfs-test-{}", std::process::id()));
        let staging = dir.join("staging");
        let note = dir.join("note");
        fs::create_dir_all(&dir).unwrap();
        fs::write(&note, b"root on a disk\n").unwrap();
        stage(&staging, &[("sbin/init".into(), note.clone(), 0o755)]).unwrap();
        let image = dir.join("root.ext4");
        mke2fs(&staging, &image).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), ROOTFS_BYTES);
        let cat = Command::new("debugfs")
            .args(["-R", "cat /sbin/init"])
            .arg(&image)
            .output()
            .unwrap();
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&image)
            .status()
            .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cat.stdout, b"root on a disk\n");
        assert!(fsck.success(), "e2fsck -fn of a fresh root image");
    }
}
