//! Managed save, as libvirt has it: a VM started with `cryo run --name NAME`
//! can be saved into its state directory with `cryo managed-save` (which
//! ends it); the next `cryo run --name NAME` restores from that image instead
//! of booting, and deletes the image once the restored VM runs.
//!
//! Layout of a state directory (`--state-dir`, default
//! `$XDG_STATE_HOME/cryo` or `~/.local/state/cryo`):
//! ```text
//! <state-dir>/<name>/config.json   what the VM was started with
//! <state-dir>/<name>/managed.img   the managed save image (fixed-ram), when there is one
//! <state-dir>/<name>/api.sock      the API socket when --api is not given
//! <state-dir>/<name>/lock          held (flock) by the running VM
//! ```

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::CliError;

/// The default state directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("cryo");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/state/cryo")
}

/// Checks a VM name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), CliError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CliError::bad_input(format!(
            "invalid VM name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// What a named VM was started with; a managed image restores only into the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub cmdline: String,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// A named VM's directory, locked for as long as this value lives.
pub struct ManagedVm {
    /// The name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    _lock: File,
}

impl ManagedVm {
    /// Creates (if needed) and locks the VM's directory. A second `cryo run`
    /// with the same name is refused while the first runs.
    pub fn open(state_dir: &Path, name: &str) -> Result<ManagedVm, CliError> {
        check_name(name)?;
        let dir = state_dir.join(name);
        // The VM's directory holds its memory image: owner-only (0700),
        // also when an older cryo created it with the umask's mode.
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| {
                CliError::bad_input(format!(
                    "cannot create the state directory {}: {e}",
                    dir.display()
                ))
            })?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| CliError::bad_input(format!("cannot lock {}: {e}", dir.display())))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(CliError::bad_input(format!(
                "a VM named {name} is already running (its state directory {} is locked)",
                dir.display()
            )));
        }
        // Temporary files of saves that were killed: with the lock held no
        // other cryo writes here, so they are garbage.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let n = e.file_name();
                if n.to_string_lossy().starts_with(".managed.img.tmp-") {
                    log::info!(
                        "removing {} left by an interrupted save",
                        e.path().display()
                    );
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(ManagedVm {
            name: name.to_string(),
            dir,
            _lock: lock,
        })
    }

    /// The managed save image's path.
    pub fn image(&self) -> PathBuf {
        self.dir.join("managed.img")
    }

    /// The default API socket path.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The recorded configuration, if any.
    pub fn config(&self) -> Option<ManagedConfig> {
        let text = std::fs::read_to_string(self.dir.join("config.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records the configuration (atomically).
    pub fn write_config(&self, cfg: &ManagedConfig) -> Result<(), CliError> {
        let tmp = self.dir.join(".config.json.tmp");
        let text = serde_json::to_string_pretty(cfg)
            .map_err(|e| CliError::failure(format!("encoding the configuration: {e}")))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join("config.json")))
            .map_err(|e| CliError::failure(format!("writing {}: {e}", self.dir.display())))
    }

    /// Deletes the managed image (after the restored VM runs), durably.
    pub fn remove_image(&self) -> std::io::Result<()> {
        std::fs::remove_file(self.image())?;
        crate::image::sync_dir(&self.image())
    }
}

/// Compares the configuration asked for with the one the image was made
/// with; returns the differences, one per item.
pub fn differences(
    asked: &ManagedConfig,
    recorded: Option<&ManagedConfig>,
    machine: &microvm::persist::MachineState,
) -> Vec<String> {
    let mut d = Vec::new();
    if u32::from(machine.vcpus) != asked.vcpus {
        d.push(format!(
            "--vcpus {} (the image has {})",
            asked.vcpus, machine.vcpus
        ));
    }
    if machine.mem_mib != asked.mem_mib {
        d.push(format!(
            "--mem-mib {} (the image has {})",
            asked.mem_mib, machine.mem_mib
        ));
    }
    if machine.cmdline != asked.cmdline {
        d.push(format!(
            "--cmdline {:?} (the image has {:?})",
            asked.cmdline, machine.cmdline
        ));
    }
    if let Some(r) = recorded {
        if r.kernel != asked.kernel {
            d.push(format!(
                "--kernel {} (the image was made with {})",
                asked.kernel.display(),
                r.kernel.display()
            ));
        }
        if r.initrd != asked.initrd {
            d.push(format!(
                "--initrd {:?} (the image was made with {:?})",
                asked.initrd, r.initrd
            ));
        }
    }
    d
}

/// `cryo managed-save-remove NAME`.
pub fn remove(state_dir: &Path, name: &str, out: crate::client::Output) -> Result<(), CliError> {
    check_name(name)?;
    let image = state_dir.join(name).join("managed.img");
    match std::fs::remove_file(&image) {
        Ok(()) => {
            let _ = crate::image::sync_dir(&image);
            if out.json {
                println!("{}", serde_json::json!({"name": name, "removed": image}));
            } else {
                println!(
                    "removed the managed save image of {name} ({})",
                    image.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CliError::bad_input(format!(
            "{name} has no managed save image (looked for {})",
            image.display()
        ))),
        Err(e) => Err(CliError::failure(format!(
            "removing {}: {e}",
            image.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("web-1.test_a").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65), ".."] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_differences() {
        let asked = ManagedConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            mem_mib: 256,
            vcpus: 2,
        };
        let machine = microvm::persist::MachineState {
            vcpus: 2,
            mem_mib: 512,
            regions: vec![(0, 512 << 20)],
            cmdline: "console=ttyS0".into(),
            tsc_khz: 1,
            kernel: "/k".into(),
            writer: String::new(),
        };
        let d = differences(&asked, Some(&asked), &machine);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("--mem-mib 256"));
    }
}
