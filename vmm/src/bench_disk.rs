//! The raw disk reference of `cryo bench save-restore`: the I/O a fixed-ram
//! save and an eager restore do, without cryo.
//!
//! Measured the way the save writes: the same bytes (the guest's filled
//! RAM) at the same file offsets (those the fixed-ram layout gives each
//! page) into one fresh sparse file of the image's size, opened with
//! `O_DIRECT`, in the same blocks (one 4 MiB unit per system call), by as
//! many threads as the save has writes in flight (channels times
//! `multifd::SAVE_QUEUE_DEPTH`), each taking the next block from a shared
//! cursor with one write in flight. The bench also runs it with one thread
//! per channel, the depth a channel without a queue would have.
//! The write is timed as it is (not durable), then the file is made durable
//! the way the save makes its image durable (`fdatasync` of the file, then
//! `fsync` of its directory) and that is timed separately. Reads go the same
//! way, into one 4 MiB buffer per thread, with as many threads as a restore
//! has reads in flight (channels times `multifd::LOAD_QUEUE_DEPTH`), after
//! the file has left the page cache; then once more into fresh memory, as
//! a restore reads: one new anonymous mapping the size of the file, advised
//! for huge pages as a restore advises guest RAM, each block faulted in
//! (`MADV_POPULATE_WRITE`, as the restore does ahead of its reads) and then
//! read to its own place in it. A restore cannot reuse a buffer: its memory
//! is new, and the kernel must fault in and zero every page the reads land
//! in.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::bench::AlignedBuf;
use crate::error::CliError;
use crate::image::fixed::for_each_index as on_threads;

/// The bytes of one unit a save channel writes with one system call.
pub const BLOCK: usize = 4 << 20;

/// What the save writes: each filled 4 MiB block of guest RAM and its
/// offset in the image file.
pub struct RawPlan<'a> {
    /// (file offset, bytes) per block, in file order.
    pub blocks: Vec<(u64, &'a [u8])>,
    /// The size of the sparse file (the image's page area and metadata).
    pub file_len: u64,
}

/// Times of one raw pass over the plan.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawTimes {
    /// Writing every block (not durable).
    pub write: Duration,
    /// `fdatasync` of the file plus `fsync` of its directory afterwards.
    pub sync: Duration,
    /// Reading every block back (page cache dropped) into one reused
    /// buffer per thread.
    pub read: Duration,
    /// Reading every block back (page cache dropped) into fresh memory.
    pub read_fresh: Duration,
}

impl RawTimes {
    /// The better (shorter) of two passes, step by step: the disk is shared
    /// and noisy, and the limit is what it can do.
    pub fn best(self, other: RawTimes) -> RawTimes {
        RawTimes {
            write: self.write.min(other.write),
            sync: self.sync.min(other.sync),
            read: self.read.min(other.read),
            read_fresh: self.read_fresh.min(other.read_fresh),
        }
    }
}

/// How many threads write and read (each with one call in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threads {
    /// Writers: the save's channels times its writes in flight per channel.
    pub write: usize,
    /// Readers: the restore's channels times its reads in flight per channel.
    pub read: usize,
}

impl Threads {
    /// The queue depths of `channels` save and restore channels.
    pub fn of_channels(channels: usize) -> Threads {
        Threads {
            write: channels * multifd::SAVE_QUEUE_DEPTH,
            read: channels * multifd::LOAD_QUEUE_DEPTH,
        }
    }

    /// One write and one read in flight per channel.
    pub fn one_per_channel(channels: usize) -> Threads {
        Threads {
            write: channels,
            read: channels,
        }
    }

    /// Twice as many of each.
    pub fn doubled(self) -> Threads {
        Threads {
            write: 2 * self.write,
            read: 2 * self.read,
        }
    }
}

/// One raw pass: a fresh sparse file in `dir`, written, made durable, read
/// back, removed.
pub fn raw_pass(dir: &Path, plan: &RawPlan<'_>, threads: Threads) -> Result<RawTimes, CliError> {
    let path = dir.join(format!(".cryo-bench-raw-{}", std::process::id()));
    let result = pass_on(&path, plan, threads);
    let _ = std::fs::remove_file(&path);
    result
}

fn pass_on(path: &Path, plan: &RawPlan<'_>, threads: Threads) -> Result<RawTimes, CliError> {
    let fail =
        |e: std::io::Error| CliError::failure(format!("raw disk test on {}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            CliError::bad_input(format!(
                "{} does not support O_DIRECT ({e}): the raw bandwidth cannot be measured there",
                path.display()
            ))
        })?;
    file.set_len(plan.file_len).map_err(fail)?;
    let blocks = &plan.blocks;
    let start = Instant::now();
    on_threads(
        threads.write,
        blocks.len(),
        || Ok(()),
        |_, i| {
            let (off, bytes) = blocks[i];
            file.write_all_at(bytes, off)
        },
    )
    .map_err(fail)?;
    let write = start.elapsed();
    let start = Instant::now();
    file.sync_data().map_err(fail)?;
    File::open(crate::files::parent_dir(path))
        .and_then(|d| d.sync_all())
        .map_err(fail)?;
    let sync = start.elapsed();
    crate::bench::drop_file_cache(path);
    let start = Instant::now();
    let new_buffer = || AlignedBuf::new(BLOCK).map_err(|e| std::io::Error::other(e.to_string()));
    on_threads(threads.read, blocks.len(), new_buffer, |buf, i| {
        let (off, bytes) = blocks[i];
        file.read_exact_at(&mut buf.as_mut()[..bytes.len()], off)
    })
    .map_err(fail)?;
    let read = start.elapsed();
    crate::bench::drop_file_cache(path);
    let fresh = AlignedBuf::new(plan.file_len as usize)?;
    fresh.advise_huge_pages();
    let start = Instant::now();
    on_threads(
        threads.read,
        blocks.len(),
        || Ok(()),
        |_, i| {
            let (off, bytes) = blocks[i];
            // SAFETY: [off, off + len) lies inside the mapping (the plan's
            // blocks lie inside the file, and the mapping is the file's
            // size); the blocks do not overlap, so each thread writes a
            // part no other thread touches, and nothing reads the mapping
            // meanwhile.
            let dst = unsafe { fresh.part_mut(off as usize, bytes.len()) };
            // SAFETY: populating changes no contents; dst is this
            // thread's part of the mapping.
            unsafe {
                libc::madvise(
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    libc::MADV_POPULATE_WRITE,
                )
            };
            file.read_exact_at(dst, off)
        },
    )
    .map_err(fail)?;
    Ok(RawTimes {
        write,
        sync,
        read,
        read_fresh: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_is_visited_once_with_per_thread_state() {
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let states = AtomicUsize::new(0);
        on_threads(
            3,
            seen.len(),
            || Ok::<_, std::io::Error>(states.fetch_add(1, Ordering::Relaxed)),
            |_, i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert!(seen.iter().all(|n| n.load(Ordering::Relaxed) == 1));
        assert_eq!(states.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_first_error_stops_the_threads() {
        let done = AtomicUsize::new(0);
        let err = on_threads(
            2,
            10_000,
            || Ok(()),
            |_: &mut (), i| {
                done.fetch_add(1, Ordering::Relaxed);
                if i == 10 {
                    return Err(std::io::Error::other("block 10"));
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "block 10");
        assert!(done.load(Ordering::Relaxed) < 10_000);
    }

    #[test]
    fn a_raw_pass_writes_syncs_reads_and_removes_its_file() {
        let dir = std::env::temp_dir().join(format!("cryo-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // O_DIRECT needs aligned memory, as guest RAM is.
        let mut buf = AlignedBuf::new(3 * BLOCK).unwrap();
        buf.as_mut().fill(0x5a);
        let data = buf.as_ref();
        let plan = RawPlan {
            // Blocks out of order, at a gap: the writes go where the plan says.
            blocks: vec![
                (8 * BLOCK as u64, &data[..BLOCK]),
                (BLOCK as u64, &data[BLOCK..2 * BLOCK]),
                (2 * BLOCK as u64, &data[2 * BLOCK..]),
            ],
            file_len: 10 * BLOCK as u64,
        };
        match raw_pass(&dir, &plan, Threads::of_channels(2)) {
            Ok(t) => assert!(
                t.write > Duration::ZERO
                    && t.read > Duration::ZERO
                    && t.read_fresh > Duration::ZERO
            ),
            // A filesystem without O_DIRECT says so by name.
            Err(e) => assert!(e.to_string().contains("O_DIRECT"), "{e}"),
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
