//! Positioned I/O helpers, the zero-page scan and hole punching.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::FixedRamError;

/// Writes all of `buf` at `offset` (retrying on EINTR and short writes).
pub(crate) fn write_all_at(
    file: &File,
    buf: &[u8],
    offset: u64,
    what: &dyn Fn() -> String,
) -> Result<(), FixedRamError> {
    // std's write_all_at loops over short writes and retries EINTR.
    file.write_all_at(buf, offset).map_err(|e| {
        FixedRamError::io(
            format!(
                "writing {} ({} bytes at offset {offset:#x})",
                what(),
                buf.len()
            ),
            e,
        )
    })
}

/// Reads exactly `buf.len()` bytes at `offset` (retrying on EINTR and short
/// reads); the end of the file is an error.
pub(crate) fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &dyn Fn() -> String,
) -> Result<(), FixedRamError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        FixedRamError::io(
            format!(
                "reading {} ({} bytes at offset {offset:#x})",
                what(),
                buf.len()
            ),
            e,
        )
    })
}

/// Zeros for the no-punch fallback, aligned so that `O_DIRECT` takes them.
#[repr(C, align(4096))]
struct Zeros([u8; 64 * 1024]);

static ZEROS: Zeros = Zeros([0; 64 * 1024]);

/// The granularity of [`write_padded`]: a multiple of every logical block
/// size `O_DIRECT` may require, and at most the minimum alignment.
const DIRECT_BLOCK: usize = 4096;

/// Writes `buf` at `offset` (a multiple of 4096) from a 4096-aligned copy
/// padded with zeros to a multiple of 4096 bytes, so that the write also works
/// on a file opened with `O_DIRECT`. The caller makes sure the padding lands
/// in a gap (every area ends before the next aligned offset) or past the end
/// of the file (then it truncates).
pub(crate) fn write_padded(
    file: &File,
    buf: &[u8],
    offset: u64,
    what: &dyn Fn() -> String,
) -> Result<(), FixedRamError> {
    if buf.is_empty() {
        return Ok(());
    }
    let padded = buf.len().next_multiple_of(DIRECT_BLOCK);
    let mut backing = vec![0u8; padded + DIRECT_BLOCK];
    let shift = backing.as_ptr().align_offset(DIRECT_BLOCK);
    let aligned = backing
        .get_mut(shift..shift + padded)
        .ok_or_else(|| FixedRamError::BadArgument("cannot align a buffer".into()))?;
    aligned[..buf.len()].copy_from_slice(buf);
    write_all_at(file, aligned, offset, what)
}

/// Makes `len` bytes at `offset` read as zeros without changing the file
/// size: punches a hole, or writes zeros where the file system cannot punch.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> Result<(), FixedRamError> {
    let context = || format!("punching a hole ({len} bytes at offset {offset:#x})");
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(FixedRamError::BadArgument(context()));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned
        // by `file`, which outlives the call.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => break,
            _ => return Err(FixedRamError::io(context(), err)),
        }
    }
    // Fallback: write zeros.
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(ZEROS.0.len() as u64) as usize;
        write_all_at(file, &ZEROS.0[..n], pos, &|| {
            "zeros over a page that became zero".to_string()
        })?;
        pos += n as u64;
    }
    Ok(())
}
