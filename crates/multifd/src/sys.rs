//! Thin wrappers around the system calls the channels use.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The most bytes one `pread`/`pwrite` moves (Linux caps a call at
/// 0x7fff_f000 bytes anyway).
pub(crate) const MAX_IO: usize = 1 << 30;

/// Waits up to `wait` for `conn` to have bytes to read (or its end):
/// true when it has.
pub(crate) fn readable(conn: &impl AsRawFd, wait: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd that lives on this stack for the call; the fd is
    // the caller's open connection.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    match r {
        0 => Ok(false),
        r if r > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Opens `path` for writing (`write`) or reading, with `O_DIRECT` when `direct`.
pub(crate) fn open(path: &Path, write: bool, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true);
    }
    o.custom_flags(if direct { libc::O_DIRECT } else { 0 } | libc::O_CLOEXEC);
    o.open(path)
}

/// The name of the filesystem holding `path` (from `statfs`'s `f_type`).
pub(crate) fn fs_type_name(path: &Path) -> String {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return "unknown filesystem".into();
    };
    // SAFETY: statfs is plain data; all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown filesystem".into();
    }
    // f_type's integer type differs between targets; the magic fits in 32 bits.
    let magic = st.f_type as u64 & 0xffff_ffff;
    let name = match magic {
        0x0102_1994 => "tmpfs",
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x0102_1997 => "9p",
        0x2FC1_2FC1 => "zfs",
        0x858_458f6 => "ramfs",
        _ => return format!("unknown filesystem, f_type {magic:#x}"),
    };
    name.into()
}

/// Writes `len` bytes at `ptr` to `file` at `offset`, retrying on short
/// writes and EINTR, at most [`MAX_IO`] bytes per call.
///
/// # Safety
///
/// `ptr..ptr+len` must be valid for reads.
pub(crate) unsafe fn pwrite_all(
    file: &File,
    mut ptr: *const u8,
    mut len: usize,
    mut offset: u64,
) -> io::Result<()> {
    while len > 0 {
        let n = len.min(MAX_IO);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: the caller guarantees ptr..ptr+len (and so ptr..ptr+n) is readable.
        let r = unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), n, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote 0 bytes",
            ));
        }
        let r = r as usize;
        // SAFETY: r <= n <= len, so the result stays inside the caller's range.
        ptr = unsafe { ptr.add(r) };
        len -= r;
        offset += r as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes from `file` at `offset` into `ptr`, retrying on
/// short reads and EINTR; the end of the file before `len` bytes is an error.
///
/// # Safety
///
/// `ptr..ptr+len` must be valid for writes and not accessed by anyone else.
pub(crate) unsafe fn pread_all(
    file: &File,
    mut ptr: *mut u8,
    mut len: usize,
    mut offset: u64,
) -> io::Result<()> {
    while len > 0 {
        let n = len.min(MAX_IO);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: the caller guarantees ptr..ptr+len (and so ptr..ptr+n) is writable.
        let r = unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), n, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends at byte offset {offset}, {len} bytes short"),
            ));
        }
        let r = r as usize;
        // SAFETY: r <= n <= len, so the result stays inside the caller's range.
        ptr = unsafe { ptr.add(r) };
        len -= r;
        offset += r as u64;
    }
    Ok(())
}

/// The nice level [`background_thread`] gives a channel thread.
pub const TRANSFER_NICE: i32 = 5;

/// Moves the calling thread to the background of the scheduler:
/// `SCHED_BATCH` (it does not preempt threads it wakes up beside) at nice
/// [`TRANSFER_NICE`] (or nicer, as it was). The sending channel threads of
/// a live round do this while the guest runs, so that its vCPU threads keep
/// their CPUs (on a small host the transfer threads otherwise take turns
/// with them, and the guest stalls); not in the last round (the guest is
/// paused, and every ms is downtime), and not the receivers (a batch thread
/// does not preempt anyone when data wakes it: on a busy host the last
/// round then waited up to 60 ms to be read). Best effort: a refusal leaves
/// the thread as it was.
pub(crate) fn background_thread() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // (priority 0, as SCHED_BATCH requires). Lowering one's own priority
    // needs no privilege; a failure changes nothing.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
        // On Linux the nice value is per thread: `who` 0 is this thread.
        // Only ever lower the priority (a nicer thread stays as nice).
        if libc::getpriority(libc::PRIO_PROCESS, 0) < TRANSFER_NICE {
            libc::setpriority(libc::PRIO_PROCESS, 0, TRANSFER_NICE);
        }
    }
}

/// Pre-faults `ptr..ptr+len` for writing with `MADV_POPULATE_WRITE`
/// (Linux 5.14+). Errors (an older kernel, memory it cannot populate) are
/// ignored: the reads that follow fault the pages in anyway.
pub(crate) fn populate_write(ptr: *mut u8, len: usize) {
    // SAFETY: madvise only changes how the kernel backs the range; the range
    // is memory the caller is about to write anyway, so populating it changes
    // no contents (MADV_POPULATE_WRITE never alters data).
    unsafe {
        libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE);
    }
}

/// A random 64-bit number from the kernel (falls back to time and pid).
pub(crate) fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 bytes of writes.
    let r = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if r == 8 {
        return u64::from_le_bytes(buf);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// The host's page size in bytes (0 if it cannot be read).
pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(ps).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_background_thread_is_batch_at_the_transfer_nice_level() {
        std::thread::spawn(|| {
            super::background_thread();
            // SAFETY: queries of the calling thread's own scheduling.
            let (policy, nice) = unsafe {
                *libc::__errno_location() = 0;
                (
                    libc::sched_getscheduler(0),
                    libc::getpriority(libc::PRIO_PROCESS, 0),
                )
            };
            assert_eq!(policy, libc::SCHED_BATCH);
            assert!(nice >= super::TRANSFER_NICE, "nice {nice}");
        })
        .join()
        .unwrap();
    }

    use super::*;

    #[test]
    fn fs_names() {
        assert_eq!(fs_type_name(Path::new("/dev/shm")), "tmpfs");
        assert!(!fs_type_name(Path::new("/")).is_empty());
    }
}
