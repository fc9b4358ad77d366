//! How cryo treats paths the user names: sockets it may replace, inputs it
//! may open, save targets it may write, and the temporary files of a save.
//!
//! The rules, in one place:
//! - a socket path (`--api`, `--listen unix:`) is taken only when nothing is
//!   there or a stale socket nobody listens on; anything else is refused;
//! - an image to read must be a regular file (a FIFO would block `open`);
//! - a save target must sit in an existing directory and, if it exists,
//!   be a regular file;
//! - a save writes `.<name>.tmp-<pid>-<random>` beside the target and removes
//!   only the temporary file it created itself.

use std::fs::File;
use std::io::{Error, ErrorKind};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Makes `path` free for a new unix socket: nothing there, or a stale socket
/// (which is removed). A socket someone listens on, or any other file, is
/// refused: binding over it would cut off a running VM or destroy a file.
pub fn claim_socket_path(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::new(
            ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            log::info!("replacing the stale socket {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// Checks that `path` is something cryo may open for reading as an image:
/// a regular file or a block device. Checked before `open`, which blocks
/// forever on a FIFO without a writer.
pub fn check_input_file(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() {
        Ok(())
    } else {
        Err(format!(
            "{} is not a regular file (it is a {})",
            path.display(),
            describe(kind)
        ))
    }
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Why a save target cannot be used; always the request's fault.
#[derive(Debug)]
pub struct BadTarget(pub String);

/// Checks a save or snapshot target before anything is paused or written:
/// its directory exists and is a directory, and the target itself, if it
/// exists, is a regular file (never a socket, FIFO, device or directory).
pub fn check_save_target(path: &Path) -> Result<(), BadTarget> {
    let dir = parent_dir(path);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(BadTarget(format!("{} is not a directory", dir.display()))),
        Err(e) => {
            return Err(BadTarget(format!(
                "the target directory {}: {e}",
                dir.display()
            )))
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(BadTarget(format!(
            "{} exists and is not a regular file (it is a {}): refusing to replace it",
            path.display(),
            describe(m.file_type())
        ))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BadTarget(format!("{}: {e}", path.display()))),
    }
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cryo-save".into());
    format!(".{name}.tmp-")
}

/// 64 unpredictable bits from the kernel (falling back to the clock, which
/// still differs between attempts).
fn random_suffix() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte value we own.
    let n = unsafe { libc::getrandom(std::ptr::addr_of_mut!(v).cast(), 8, 0) };
    if n != 8 {
        v = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }
    v
}

/// A fresh, unpredictable temporary name beside `target`:
/// `.<name>.tmp-<pid>-<random>`. The pid lets a later save tell a dead
/// process's leftovers from a running one's.
pub fn temp_path(target: &Path) -> PathBuf {
    target.with_file_name(format!(
        "{}{}-{:016x}",
        temp_prefix(target),
        std::process::id(),
        random_suffix()
    ))
}

fn process_is_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporary files that saves to `target` left when their
/// process died (SIGKILL, power loss): `.<name>.tmp-<pid>[-<random>]`
/// whose pid no longer runs. Files of living processes are left alone.
pub fn remove_stale_temps(target: &Path) {
    let prefix = temp_prefix(target);
    let Ok(entries) = std::fs::read_dir(parent_dir(target)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let pid_text = rest.split('-').next().unwrap_or("");
        let Ok(pid) = pid_text.parse::<i32>() else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if pid > 0 && is_file && !process_is_alive(pid) {
            log::info!(
                "removing {} left by an interrupted save (process {pid} is gone)",
                entry.path().display()
            );
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A temporary file this process created; removed when dropped unless
/// [`TempFile::keep`] was called (after it was renamed over its target).
pub struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Takes charge of `path`, which the caller has just created.
    pub fn created(path: PathBuf) -> TempFile {
        TempFile { path, armed: true }
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file is no longer ours to remove (it was renamed).
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Opens (creating or truncating) a file that may carry guest data, such
/// as a serial log: mode 0600 when created.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A fresh scratch directory for a unit test.
#[cfg(test)]
pub(crate) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cryo-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_unpredictable_and_carry_the_pid() {
        let t = Path::new("/x/vm.img");
        let (a, b) = (temp_path(t), temp_path(t));
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!(".vm.img.tmp-{}-", std::process::id())),
            "{name}"
        );
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed_live_ones_kept() {
        let d = scratch("stale");
        let target = d.join("vm.img");
        // pid_max is at most 2^22: this pid cannot exist.
        let dead = d.join(".vm.img.tmp-99999999-0123456789abcdef");
        let dead_old_style = d.join(".vm.img.tmp-99999998");
        let live = d.join(format!(".vm.img.tmp-{}-00", std::process::id()));
        let other = d.join(".other.img.tmp-99999999");
        for p in [&dead, &dead_old_style, &live, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        remove_stale_temps(&target);
        assert!(!dead.exists() && !dead_old_style.exists());
        assert!(live.exists() && other.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn socket_paths_are_claimed_only_when_free_or_stale() {
        let d = scratch("sock");
        let regular = d.join("vm.img");
        std::fs::write(&regular, b"image").unwrap();
        assert!(claim_socket_path(&regular).is_err());
        assert_eq!(std::fs::read(&regular).unwrap(), b"image");

        let stale = d.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        claim_socket_path(&stale).unwrap();
        assert!(!stale.exists());

        let live = d.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = claim_socket_path(&live).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        assert!(claim_socket_path(&d.join("free.sock")).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn save_targets_must_be_regular_files_in_existing_directories() {
        let d = scratch("target");
        assert!(check_save_target(&d.join("new.img")).is_ok());
        std::fs::write(d.join("old.img"), b"x").unwrap();
        assert!(check_save_target(&d.join("old.img")).is_ok());
        assert!(check_save_target(&d.join("missing/vm.img")).is_err());
        assert!(check_save_target(&d).is_err());
        let sock = d.join("api.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(check_save_target(&sock).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
