//! What the tier needs from the host, each found or built here, and each a
//! loud error when it is missing: the statically linked binaries (built by
//! cargo), the Debian kernels (fetched with `apt-get download`), a static
//! busybox and QEMU (installed by `.ci/run`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use cryo_tests::initramfs::{debian_kernel_cache_dir, fetch_debian_kernel};
use cryo_tests::workspace_root;

use crate::TierError;

/// The target the static binaries are built for (given explicitly so that
/// the static-CRT flag reaches only them, not build scripts or proc macros).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The kernel modules the nested machine loads, in load order: those that
/// give it `/dev/kvm`, and tun (`/dev/net/tun`, for the network scenarios'
/// taps).
pub const NESTED_MODULES: &[&str] = &[
    "virt/lib/irqbypass.ko",
    "drivers/crypto/ccp/ccp.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
    "drivers/net/tun.ko",
];
/// The Debian metapackage of the generic kernel the nested machine runs.
const GENERIC_KERNEL_META: &str = "linux-image-amd64";

/// The three statically linked programs of the tier.
pub struct StaticBinaries {
    /// The VMM.
    pub cryo: PathBuf,
    /// The scenario driver.
    pub driver: PathBuf,
    /// The guest's workload.
    pub workload: PathBuf,
}

/// Builds `cryo`, `cryo-linux-driver` and `cryo-workload` statically linked
/// (release profile, `target/static/`), so that they run inside a busybox
/// initramfs with no shared libraries.
pub fn static_binaries() -> Result<StaticBinaries, TierError> {
    let root = workspace_root();
    let target_dir = root.join("target/static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["build", "--quiet", "--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .args([
            "-p",
            "cryo",
            "-p",
            "cryo-linux-tier",
            "-p",
            "cryo-linux-guest",
        ])
        .args([
            "--bin",
            "cryo",
            "--bin",
            "cryo-linux-driver",
            "--bin",
            "cryo-workload",
        ])
        .status()
        .map_err(|e| TierError::Build(format!("cannot run cargo: {e}")))?;
    if !status.success() {
        return Err(TierError::Build(format!(
            "cargo build of the static binaries failed ({status})"
        )));
    }
    let bin = target_dir.join(TARGET).join("release");
    Ok(StaticBinaries {
        cryo: bin.join("cryo"),
        driver: bin.join("cryo-linux-driver"),
        workload: bin.join("cryo-workload"),
    })
}

/// The guest kernel: the Debian cloud kernel, as fetched by
/// `resources/fetch-kernel.sh`.
pub struct GuestKernel {
    /// Its ELF vmlinux.
    pub vmlinux: PathBuf,
    /// Its bzImage.
    pub bzimage: PathBuf,
}

/// Fetches (or finds cached) the guest kernel.
pub fn guest_kernel() -> Result<GuestKernel, TierError> {
    let dir = fetch_debian_kernel()
        .map_err(|e| TierError::Missing(format!("the Debian cloud kernel: {e}")))?;
    Ok(GuestKernel {
        vmlinux: dir.join("debian-cloud-vmlinux"),
        bzimage: dir.join("debian-cloud-bzImage"),
    })
}

/// A static busybox (package `busybox-static`).
pub fn busybox() -> Result<PathBuf, TierError> {
    let path = PathBuf::from("/bin/busybox");
    let bytes = fs::read(&path).map_err(|e| {
        TierError::Missing(format!(
            "{}: {e}; install the Debian package busybox-static (.ci/run does)",
            path.display()
        ))
    })?;
    if has_interpreter(&bytes) {
        return Err(TierError::Missing(format!(
            "{} is dynamically linked; install busybox-static instead of busybox (.ci/run does)",
            path.display()
        )));
    }
    Ok(path)
}

/// Whether an ELF64 file names a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    })
}

/// QEMU for the nested machine (`qemu-system-x86` from bookworm-backports).
pub fn qemu() -> Result<PathBuf, TierError> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    found.ok_or_else(|| {
        TierError::Missing(
            "qemu-system-x86_64: install qemu-system-x86 from bookworm-backports (.ci/run does)"
                .into(),
        )
    })
}

/// The nested machine's kernel: Debian's generic kernel and the modules it loads.
pub struct HostKernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// [`NESTED_MODULES`], in order, as files in the cache.
    pub modules: Vec<PathBuf>,
}

/// Fetches (once, then cached beside the cloud kernel) Debian's generic
/// kernel package and takes its bzImage and [`NESTED_MODULES`].
pub fn nested_host_kernel() -> Result<HostKernel, TierError> {
    let cache = debian_kernel_cache_dir().join("nested-host");
    let kernel = HostKernel {
        vmlinuz: cache.join("vmlinuz"),
        modules: NESTED_MODULES
            .iter()
            .map(|m| cache.join(Path::new(m).file_name().unwrap_or_default()))
            .collect(),
    };
    if kernel.vmlinuz.is_file() && kernel.modules.iter().all(|m| m.is_file()) {
        return Ok(kernel);
    }
    let package = kernel_package(GENERIC_KERNEL_META)?;
    let (tmp, root) = download_package(&package)?;
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    fs::create_dir_all(&cache).map_err(|e| TierError::Io(cache.clone(), e))?;
    let copy = |from: PathBuf, to: &Path| {
        fs::copy(&from, to)
            .map(|_| ())
            .map_err(|e| TierError::Io(from, e))
    };
    for (module, dest) in NESTED_MODULES.iter().zip(&kernel.modules) {
        copy(
            root.join("lib/modules")
                .join(&version)
                .join("kernel")
                .join(module),
            dest,
        )?;
    }
    // The bzImage last: its presence says the cache is complete.
    copy(
        root.join("boot").join(format!("vmlinuz-{version}")),
        &kernel.vmlinuz,
    )?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(kernel)
}

/// Downloads `package` with `apt-get download` and unpacks it; returns the
/// scratch directory (to remove) and the unpacked root.
fn download_package(package: &str) -> Result<(PathBuf, PathBuf), TierError> {
    let tmp = std::env::temp_dir().join(format!("cryo-deb-{}-{package}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| TierError::Io(tmp.clone(), e))?;
    // apt-get download runs as the _apt user, which must write here.
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o777));
    run(
        Command::new("apt-get")
            .current_dir(&tmp)
            .args(["download", "-q", package]),
        "apt-get download",
    )?;
    let deb = fs::read_dir(&tmp)
        .map_err(|e| TierError::Io(tmp.clone(), e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| TierError::Missing(format!("apt-get download {package} left no .deb")))?;
    let root = tmp.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    )?;
    Ok((tmp, root))
}

/// The kernel modules the guest loads for its virtio disk and network
/// device, in load order (paths under the package's
/// `lib/modules/<abi>/kernel/`). The Debian cloud kernel builds virtio,
/// virtio-mmio, virtio-blk and virtio-net (which needs failover and
/// net_failover) as modules.
pub const GUEST_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];
/// The Debian metapackage of the guest's kernel.
const CLOUD_KERNEL_META: &str = "linux-image-cloud-amd64";

/// Fetches (once, then cached beside the cloud kernel) the modules of
/// [`GUEST_MODULES`] from the cloud kernel package of the same version as
/// the cached guest kernel; returns them in load order.
pub fn guest_modules() -> Result<Vec<PathBuf>, TierError> {
    let dir = debian_kernel_cache_dir();
    let version_file = dir.join("debian-cloud-version");
    let version = fs::read_to_string(&version_file)
        .map_err(|e| TierError::Io(version_file.clone(), e))?
        .trim()
        .to_string();
    let cache = dir.join(format!("guest-modules-{version}"));
    let modules: Vec<PathBuf> = GUEST_MODULES
        .iter()
        .map(|m| cache.join(Path::new(m).file_name().unwrap_or_default()))
        .collect();
    if modules.iter().all(|m| m.is_file()) {
        return Ok(modules);
    }
    let package = kernel_package(CLOUD_KERNEL_META)?;
    let (tmp, root) = download_package(&package)?;
    let abi = package.strip_prefix("linux-image-").unwrap_or(&package);
    let config = root.join("boot").join(format!("config-{abi}"));
    if !config.is_file() {
        return Err(TierError::Missing(format!(
            "{package} has no {}",
            config.display()
        )));
    }
    let vmlinux = fs::read(dir.join("debian-cloud-vmlinux")).unwrap_or_default();
    let needle = format!("Linux version {abi} ");
    if !vmlinux
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
    {
        return Err(TierError::Missing(format!(
            "the cached cloud kernel ({version}) is not {package}: run resources/fetch-kernel.sh --force"
        )));
    }
    fs::create_dir_all(&cache).map_err(|e| TierError::Io(cache.clone(), e))?;
    for (module, dest) in GUEST_MODULES.iter().zip(&modules) {
        let from = root
            .join("lib/modules")
            .join(abi)
            .join("kernel")
            .join(module);
        fs::copy(&from, dest).map_err(|e| TierError::Io(from, e))?;
    }
    let _ = fs::remove_dir_all(&tmp);
    Ok(modules)
}

/// Where the guest finds `mke2fs` and `e2fsck` (not in `/bin` or `/sbin`,
/// where busybox's applets of the same names are).
pub const GUEST_TOOLS_DIR: &str = "opt/e2fsprogs";

/// Host programs run on the guests' disks (`mke2fs`, `e2fsck`, `debugfs`),
/// by the guest and, nested, by the driver, with the shared libraries and
/// loader they need, as (path in the guest, host file). From the host's
/// e2fsprogs.
pub fn guest_disk_tools() -> Result<Vec<(String, PathBuf)>, TierError> {
    let mut files = Vec::new();
    for tool in ["/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/sbin/debugfs"] {
        let path = PathBuf::from(tool);
        if !path.is_file() {
            return Err(TierError::Missing(format!("{tool}: install e2fsprogs")));
        }
        let out = Command::new("ldd")
            .arg(&path)
            .output()
            .map_err(|e| TierError::Missing(format!("ldd: {e}")))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux... (0x...)".
            let lib = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(lib) = lib {
                files.push((lib.trim_start_matches('/').to_string(), PathBuf::from(lib)));
            }
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        files.push((format!("{GUEST_TOOLS_DIR}/{name}"), path.clone()));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The real package behind a kernel metapackage such as
/// `linux-image-amd64` (running `apt-get update` once if apt does not know
/// it yet).
fn kernel_package(meta: &str) -> Result<String, TierError> {
    let resolve = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", "--no-recommends", "--no-suggests", meta])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends: ")?;
            (dep.starts_with("linux-image-") && dep.ends_with("-amd64")).then(|| dep.to_string())
        })
    };
    if let Some(p) = resolve() {
        return Ok(p);
    }
    run(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    resolve().ok_or_else(|| {
        TierError::Missing(format!(
            "apt cannot resolve {meta} to a kernel package (Debian main in apt sources?)"
        ))
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<(), TierError> {
    let out = cmd
        .output()
        .map_err(|e| TierError::Missing(format!("{what}: cannot run: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TierError::Missing(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_static_from_dynamic_elf() {
        let ls = fs::read("/bin/ls").expect("read /bin/ls");
        assert!(has_interpreter(&ls), "/bin/ls is dynamically linked");
        assert!(!has_interpreter(b"not an elf"));
    }
}
