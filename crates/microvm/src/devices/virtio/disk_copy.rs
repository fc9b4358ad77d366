//! Point-in-time copies of a virtio-blk disk, taken while the guest runs.
//!
//! [`CopySource::start`] is called while the vCPUs are paused and the disk
//! is quiesced (no request in flight, data `fdatasync`'d). It first tries
//! `FICLONE` (a reflink: the copy is complete at once, on filesystems that
//! share extents such as XFS with reflink or btrfs). Elsewhere the disk
//! enters copy-before-write mode: a background thread copies it to the
//! target in [`COPY_CHUNK`] pieces (skipping holes, found with
//! `SEEK_DATA`), and the device calls [`CopyHook::before_write`] before
//! each guest write, which copies the old contents of every chunk the write
//! touches that is not copied yet. Either way the target holds the disk as
//! it was at the pause. [`DiskCopy::finish`] waits for the copy, fsyncs it
//! and ends copy mode; dropping a [`DiskCopy`] (or a failure) ends it too,
//! and the guest's writes go on as before.
//!
//! A failed copy (a full or failing target) never fails a guest write: the
//! copy stops, records its first error, and `finish` reports it.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Unit of copy and of tracking: 1 MiB.
pub const COPY_CHUNK: u64 = 1 << 20;

/// Why a disk copy failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskCopyError {
    /// The disk could not be reopened for reading, or measured.
    #[error("reading the disk: {0}")]
    Source(#[source] std::io::Error),
    /// The copy's file could not be sized.
    #[error("sizing the copy: {0}")]
    Target(#[source] std::io::Error),
    /// Reading the disk or writing the copy failed at `offset`.
    #[error("copying the chunk at byte {offset}: {source}")]
    Copy {
        /// Start of the chunk.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The copy could not be made durable.
    #[error("fsync of the copy: {0}")]
    Sync(#[source] std::io::Error),
    /// The copy thread could not start, or died.
    #[error("copy thread: {0}")]
    Thread(String),
    /// The copy was cancelled.
    #[error("the disk copy was cancelled")]
    Cancelled,
}

/// How a copy was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: the copy shares the disk's extents; done inside the pause.
    Reflink,
    /// Background copy, with the old contents of a chunk copied before a
    /// guest write changes it.
    CopyBeforeWrite,
}

/// What a finished copy did.
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// How it was made.
    pub method: CopyMethod,
    /// Size of the copy in bytes.
    pub bytes: u64,
    /// Chunks copied by the background thread.
    pub chunks_by_thread: u64,
    /// Chunks copied because the guest was about to write them.
    pub chunks_before_write: u64,
    /// Chunks skipped as holes (left sparse in the copy).
    pub chunks_holes: u64,
    /// From the start of the copy until it was durable.
    pub elapsed: Duration,
}

/// The state of each chunk of a copy: the bookkeeping of copy-before-write,
/// free of I/O.
#[derive(Debug)]
pub struct ChunkMap {
    state: Vec<ChunkState>,
    size: u64,
    done: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Pending,
    Copying,
    Done,
}

/// The answer of [`ChunkMap::claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller now copies the chunk, then calls [`ChunkMap::complete`].
    Mine,
    /// Someone else is copying it: wait.
    Busy,
    /// Already copied.
    Done,
}

impl ChunkMap {
    /// Every chunk of a disk of `size` bytes, none copied.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(COPY_CHUNK);
        ChunkMap {
            state: vec![ChunkState::Pending; usize::try_from(n).unwrap_or(usize::MAX)],
            size,
            done: 0,
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether the disk is empty (no chunks).
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Whether every chunk is copied.
    pub fn all_done(&self) -> bool {
        self.done == self.state.len()
    }

    /// The chunks that bytes `offset..offset + len` touch (clamped to the disk).
    pub fn chunks_of(&self, offset: u64, len: u64) -> Range<usize> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        let first = offset / COPY_CHUNK;
        let last = (end - 1) / COPY_CHUNK;
        let clamp = |c: u64| usize::try_from(c).unwrap_or(usize::MAX).min(self.len());
        clamp(first)..clamp(last + 1)
    }

    /// The byte range of chunk `i`.
    pub fn bytes_of(&self, i: usize) -> Range<u64> {
        let start = i as u64 * COPY_CHUNK;
        start..(start + COPY_CHUNK).min(self.size)
    }

    /// Claims chunk `i` for copying if nobody has.
    pub fn claim(&mut self, i: usize) -> Claim {
        match self.state.get_mut(i) {
            Some(s @ ChunkState::Pending) => {
                *s = ChunkState::Copying;
                Claim::Mine
            }
            Some(ChunkState::Copying) => Claim::Busy,
            Some(ChunkState::Done) | None => Claim::Done,
        }
    }

    /// Marks a claimed chunk copied.
    pub fn complete(&mut self, i: usize) {
        if let Some(s) = self.state.get_mut(i) {
            if *s != ChunkState::Done {
                *s = ChunkState::Done;
                self.done += 1;
            }
        }
    }
}

/// The shared state of a copy in copy-before-write mode.
struct Tracker {
    source: File,
    target: File,
    map: Mutex<ChunkMap>,
    changed: Condvar,
    stop: AtomicBool,
    error: Mutex<Option<DiskCopyError>>,
    by_thread: AtomicU64,
    before_write: AtomicU64,
    holes: AtomicU64,
}

impl Tracker {
    fn new(source: File, target: File, size: u64) -> Self {
        Tracker {
            source,
            target,
            map: Mutex::new(ChunkMap::new(size)),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            by_thread: AtomicU64::new(0),
            before_write: AtomicU64::new(0),
            holes: AtomicU64::new(0),
        }
    }

    fn map(&self) -> MutexGuard<'_, ChunkMap> {
        // A panic while holding the lock leaves the map as it was: keep going.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Records the first error and stops the copy.
    fn fail(&self, e: DiskCopyError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Release);
        drop(slot);
        self.changed.notify_all();
    }

    /// Copies chunk `range` from the disk to the target: in the kernel
    /// (`copy_file_range`) where it can, else through `buf`.
    fn copy(&self, range: Range<u64>, buf: &mut Vec<u8>) -> Result<(), DiskCopyError> {
        let err = |source| DiskCopyError::Copy {
            offset: range.start,
            source,
        };
        match copy_in_kernel(&self.source, &self.target, range.clone()) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(err(e)),
        }
        let len = usize::try_from(range.end - range.start).unwrap_or(0);
        buf.resize(len, 0);
        self.source
            .read_exact_at(&mut buf[..len], range.start)
            .map_err(err)?;
        self.target
            .write_all_at(&buf[..len], range.start)
            .map_err(err)
    }

    /// Copies chunk `i` (claimed by the caller) and marks it done, even when
    /// the copy fails (which stops the whole copy): nobody waits forever.
    fn copy_claimed(&self, i: usize, range: Range<u64>, buf: &mut Vec<u8>) {
        if !self.stopped() {
            if let Err(e) = self.copy(range, buf) {
                self.fail(e);
            }
        }
        self.map().complete(i);
        self.changed.notify_all();
    }

    /// Makes sure every chunk of `offset..offset + len` is copied before the
    /// guest's write there goes ahead.
    fn before_write(&self, offset: u64, len: u64) {
        let chunks = self.map().chunks_of(offset, len);
        let mut buf = Vec::new();
        for i in chunks {
            let mut map = self.map();
            loop {
                if self.stopped() {
                    return;
                }
                match map.claim(i) {
                    Claim::Done => break,
                    Claim::Busy => {
                        map = self.changed.wait(map).unwrap_or_else(|p| p.into_inner());
                    }
                    Claim::Mine => {
                        let range = map.bytes_of(i);
                        drop(map);
                        self.copy_claimed(i, range, &mut buf);
                        self.before_write.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }

    /// The background copy: every chunk nobody claimed yet, holes skipped;
    /// then waits until chunks claimed by guest writes are done too.
    fn run(&self) {
        let mut buf = Vec::with_capacity(COPY_CHUNK as usize);
        let mut holes = HoleFinder::new(&self.source);
        let n = self.map().len();
        for i in 0..n {
            if self.stopped() {
                return;
            }
            let claimed = {
                let mut map = self.map();
                (map.claim(i) == Claim::Mine).then(|| map.bytes_of(i))
            };
            let Some(range) = claimed else { continue };
            // A chunk nobody has written since the pause is still a hole if
            // it was one then.
            if holes.is_hole(&range) {
                self.holes.fetch_add(1, Ordering::Relaxed);
                self.map().complete(i);
                self.changed.notify_all();
                continue;
            }
            self.copy_claimed(i, range, &mut buf);
            self.by_thread.fetch_add(1, Ordering::Relaxed);
        }
        let mut map = self.map();
        while !map.all_done() && !self.stopped() {
            map = self.changed.wait(map).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Copies `range` of `source` to the same offsets of `target` with
/// `copy_file_range`. Ok(false): the kernel cannot here (other filesystems,
/// old kernels), copy through memory instead; nothing was written then.
fn copy_in_kernel(source: &File, target: &File, range: Range<u64>) -> std::io::Result<bool> {
    let mut at = range.start;
    while at < range.end {
        let (Ok(mut off_in), Ok(len)) =
            (libc::loff_t::try_from(at), usize::try_from(range.end - at))
        else {
            return Ok(false);
        };
        let mut off_out = off_in;
        // SAFETY: both fds are open; the offsets are ours and the kernel
        // copies between the files without touching our memory.
        let n = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut off_in,
                target.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        match n {
            // The source ended early (it shrank): a short copy is an error.
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => at += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                );
                return match (unsupported, at == range.start) {
                    (true, true) => Ok(false),
                    _ => Err(e),
                };
            }
        }
    }
    Ok(true)
}

/// Finds holes with `SEEK_DATA`, remembering where the next data starts.
struct HoleFinder<'a> {
    file: &'a File,
    next_data: Option<u64>,
}

impl<'a> HoleFinder<'a> {
    fn new(file: &'a File) -> Self {
        HoleFinder {
            file,
            next_data: None,
        }
    }

    /// Whether `range` lies wholly in a hole (false where unsure).
    fn is_hole(&mut self, range: &Range<u64>) -> bool {
        let stale = self.next_data.is_none_or(|d| d < range.start);
        if stale {
            let Ok(start) = libc::off_t::try_from(range.start) else {
                return false;
            };
            // SAFETY: lseek on an fd we own; it moves only that fd's offset,
            // which nothing else uses (all I/O is positioned).
            let r = unsafe { libc::lseek(self.file.as_raw_fd(), start, libc::SEEK_DATA) };
            self.next_data = match u64::try_from(r) {
                Ok(d) => Some(d),
                // ENXIO: no data after `start`; other errors: assume data.
                Err(_) if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                    Some(u64::MAX)
                }
                Err(_) => Some(range.start),
            };
        }
        self.next_data.is_some_and(|d| d >= range.end)
    }
}

/// Where a device looks before each write: the copy in progress, if any.
#[derive(Default)]
pub struct CopyHook(Mutex<Option<Arc<Tracker>>>);

impl CopyHook {
    /// Called by the device before it writes `len` bytes at `offset`: copies
    /// the old contents of any chunk there that the copy still needs.
    pub fn before_write(&self, offset: u64, len: u64) {
        let tracker = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(t) = tracker {
            t.before_write(offset, len);
        }
    }

    fn set(&self, tracker: Option<Arc<Tracker>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tracker;
    }
}

/// What a copy needs from a device: its disk file and its write hook.
#[derive(Clone)]
pub struct CopySource {
    /// The disk as the device opened it.
    pub disk: Arc<File>,
    /// The hook the device calls before writes.
    pub hook: Arc<CopyHook>,
}

impl CopySource {
    /// Starts a copy of the disk into `target` (an empty file). Call it only
    /// while the device serves no requests (VM paused, disk quiesced).
    pub fn start(&self, target: File) -> Result<DiskCopy, DiskCopyError> {
        let started = Instant::now();
        let size = self.disk.metadata().map_err(DiskCopyError::Source)?.len();
        if reflink(&self.disk, &target) {
            return Ok(DiskCopy::done(target, size, started));
        }
        // A fresh descriptor, without the device's O_DIRECT, at any offset.
        let source = File::open(format!("/proc/self/fd/{}", self.disk.as_raw_fd()))
            .map_err(DiskCopyError::Source)?;
        target.set_len(size).map_err(DiskCopyError::Target)?;
        let tracker = Arc::new(Tracker::new(source, target, size));
        let t = Arc::clone(&tracker);
        let thread = std::thread::Builder::new()
            .name("disk-copy".into())
            .spawn(move || t.run())
            .map_err(|e| DiskCopyError::Thread(e.to_string()))?;
        self.hook.set(Some(Arc::clone(&tracker)));
        Ok(DiskCopy {
            hook: Some(Arc::clone(&self.hook)),
            tracker: Some(tracker),
            thread: Some(thread),
            done_target: None,
            size,
            started,
        })
    }
}

/// `FICLONE` of `source` into `target`; false where the filesystem cannot.
fn reflink(source: &File, target: &File) -> bool {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are
    // open for the duration of the call.
    let r = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if r != 0 {
        log::debug!(
            "FICLONE refused ({}); copying before writes instead",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}

/// Stops a copy from another thread.
#[derive(Clone)]
pub struct CopyCancel(Option<Arc<Tracker>>);

impl CopyCancel {
    /// Cancels the copy: `finish` then returns [`DiskCopyError::Cancelled`].
    pub fn cancel(&self) {
        if let Some(t) = &self.0 {
            t.fail(DiskCopyError::Cancelled);
        }
    }
}

/// A copy under way (or, after a reflink, already complete).
pub struct DiskCopy {
    hook: Option<Arc<CopyHook>>,
    tracker: Option<Arc<Tracker>>,
    thread: Option<JoinHandle<()>>,
    done_target: Option<File>,
    size: u64,
    started: Instant,
}

impl DiskCopy {
    fn done(target: File, size: u64, started: Instant) -> Self {
        DiskCopy {
            hook: None,
            tracker: None,
            thread: None,
            done_target: Some(target),
            size,
            started,
        }
    }

    /// How the copy is being made.
    pub fn method(&self) -> CopyMethod {
        match self.tracker {
            Some(_) => CopyMethod::CopyBeforeWrite,
            None => CopyMethod::Reflink,
        }
    }

    /// A handle that cancels the copy.
    pub fn cancel_handle(&self) -> CopyCancel {
        CopyCancel(self.tracker.clone())
    }

    /// Waits until the copy is complete and durable; the device leaves copy
    /// mode whatever the outcome.
    pub fn finish(mut self) -> Result<CopyReport, DiskCopyError> {
        let panicked = self.end();
        let method = self.method();
        let mut report = CopyReport {
            method,
            bytes: self.size,
            chunks_by_thread: 0,
            chunks_before_write: 0,
            chunks_holes: 0,
            elapsed: Duration::ZERO,
        };
        if let Some(t) = self.tracker.take() {
            let first_error = t.error.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(e) = first_error {
                return Err(e);
            }
            if panicked {
                return Err(DiskCopyError::Thread("the copy thread panicked".into()));
            }
            t.target.sync_all().map_err(DiskCopyError::Sync)?;
            report.chunks_by_thread = t.by_thread.load(Ordering::Relaxed);
            report.chunks_before_write = t.before_write.load(Ordering::Relaxed);
            report.chunks_holes = t.holes.load(Ordering::Relaxed);
        }
        if let Some(f) = self.done_target.take() {
            f.sync_all().map_err(DiskCopyError::Sync)?;
        }
        report.elapsed = self.started.elapsed();
        Ok(report)
    }

    /// Joins the copy thread and takes the hook out of the device. Returns
    /// whether the thread panicked.
    fn end(&mut self) -> bool {
        let panicked = self.thread.take().is_some_and(|h| h.join().is_err());
        if let Some(h) = self.hook.take() {
            h.set(None);
        }
        panicked
    }
}

impl Drop for DiskCopy {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            t.fail(DiskCopyError::Cancelled);
        }
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_a_write_cover_exactly_the_chunks_it_touches() {
        let m = ChunkMap::new(3 * COPY_CHUNK + 512);
        assert_eq!(m.len(), 4);
        assert_eq!(m.chunks_of(0, 1), 0..1);
        assert_eq!(m.chunks_of(COPY_CHUNK - 1, 2), 0..2);
        assert_eq!(m.chunks_of(COPY_CHUNK, COPY_CHUNK), 1..2);
        assert_eq!(m.chunks_of(3 * COPY_CHUNK, 512), 3..4);
        assert_eq!(m.chunks_of(0, 0), 0..0);
        // Past the end, or overflowing: clamped, never a panic.
        assert_eq!(m.chunks_of(10 * COPY_CHUNK, 4096), 0..0);
        assert_eq!(m.chunks_of(u64::MAX - 1, u64::MAX), 0..0);
        assert_eq!(m.chunks_of(3 * COPY_CHUNK, u64::MAX), 3..4);
        assert_eq!(m.bytes_of(3), 3 * COPY_CHUNK..3 * COPY_CHUNK + 512);
    }

    #[test]
    fn a_chunk_is_claimed_once_and_done_once() {
        let mut m = ChunkMap::new(2 * COPY_CHUNK);
        assert_eq!(m.claim(1), Claim::Mine);
        assert_eq!(m.claim(1), Claim::Busy);
        assert!(!m.all_done());
        m.complete(1);
        m.complete(1);
        assert_eq!(m.claim(1), Claim::Done);
        assert_eq!(m.claim(0), Claim::Mine);
        m.complete(0);
        assert!(m.all_done());
        assert_eq!(m.claim(7), Claim::Done, "no such chunk: nothing to copy");
        assert!(ChunkMap::new(0).is_empty() && ChunkMap::new(0).all_done());
    }

    /// A disk file of `chunks` chunks (chunk i filled with byte i + 1,
    /// chunk 2 left a hole) and an empty target, both removed on drop.
    struct Files(std::path::PathBuf, std::path::PathBuf);

    impl Files {
        fn new(name: &str, chunks: u64) -> Self {
            let base =
                std::env::temp_dir().join(format!("microvm-copy-{}-{name}", std::process::id()));
            let f = Files(base.with_extension("disk"), base.with_extension("copy"));
            let disk = File::create(&f.0).unwrap();
            disk.set_len(chunks * COPY_CHUNK).unwrap();
            for i in (0..chunks).filter(|i| *i != 2) {
                disk.write_all_at(&vec![i as u8 + 1; COPY_CHUNK as usize], i * COPY_CHUNK)
                    .unwrap();
            }
            File::create(&f.1)
                .unwrap()
                .set_len(chunks * COPY_CHUNK)
                .unwrap();
            f
        }

        fn tracker(&self) -> Tracker {
            let source = File::open(&self.0).unwrap();
            let target = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.1)
                .unwrap();
            Tracker::new(source, target, source_len(&self.0))
        }

        /// What the guest's write does after `before_write`.
        fn guest_write(&self, t: &Tracker, offset: u64, byte: u8, len: usize) {
            t.before_write(offset, len as u64);
            let disk = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.0)
                .unwrap();
            disk.write_all_at(&vec![byte; len], offset).unwrap();
        }
    }

    fn source_len(p: &std::path::Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_file(&self.1);
        }
    }

    #[test]
    fn a_write_during_the_copy_leaves_the_old_contents_in_the_copy() {
        let f = Files::new("cbw", 5);
        let t = f.tracker();
        // Before the background pass: a write across chunks 3 and 4, and
        // one into the hole (chunk 2).
        f.guest_write(&t, 4 * COPY_CHUNK - 100, 0xee, 200);
        f.guest_write(&t, 2 * COPY_CHUNK + 4096, 0xdd, 512);
        assert_eq!(t.before_write.load(Ordering::Relaxed), 3);
        // A second write to a copied chunk copies nothing.
        f.guest_write(&t, 4 * COPY_CHUNK, 0xcc, 10);
        assert_eq!(t.before_write.load(Ordering::Relaxed), 3);
        t.run();
        assert!(t.map().all_done());
        assert_eq!(t.by_thread.load(Ordering::Relaxed), 2, "chunks 0 and 1");
        let copy = std::fs::read(&f.1).unwrap();
        for i in 0..5u64 {
            let want = if i == 2 { 0 } else { i as u8 + 1 };
            let chunk = &copy[(i * COPY_CHUNK) as usize..((i + 1) * COPY_CHUNK) as usize];
            assert!(chunk.iter().all(|b| *b == want), "chunk {i} of the copy");
        }
        let disk = std::fs::read(&f.0).unwrap();
        assert_eq!(disk[(4 * COPY_CHUNK) as usize], 0xcc);
        assert_eq!(disk[(2 * COPY_CHUNK + 4096) as usize], 0xdd);
    }

    #[test]
    fn holes_are_skipped_and_stay_holes() {
        let f = Files::new("holes", 4);
        let t = f.tracker();
        t.run();
        assert_eq!(t.holes.load(Ordering::Relaxed), 1);
        assert_eq!(t.by_thread.load(Ordering::Relaxed), 3);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&f.1).unwrap().blocks() * 512;
        assert!(
            blocks <= 3 * COPY_CHUNK + 65536,
            "copy allocates {blocks} bytes"
        );
    }

    #[test]
    fn a_failed_copy_stops_and_never_blocks_the_guest() {
        let f = Files::new("fail", 3);
        let source = File::open(&f.0).unwrap();
        // A target open read-only: every copy write fails.
        let target = File::open(&f.1).unwrap();
        let t = Tracker::new(source, target, 3 * COPY_CHUNK);
        f.guest_write(&t, 0, 0xaa, 512);
        assert!(t.stopped());
        f.guest_write(&t, COPY_CHUNK, 0xbb, 512);
        t.run();
        let e = t.error.lock().unwrap().take();
        assert!(
            matches!(e, Some(DiskCopyError::Copy { offset: 0, .. })),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&f.0).unwrap()[COPY_CHUNK as usize], 0xbb);
    }

    #[test]
    fn start_copies_through_a_device_hook_and_cancel_reports_cancelled() {
        let f = Files::new("start", 3);
        let src = CopySource {
            disk: Arc::new(File::open(&f.0).unwrap()),
            hook: Arc::default(),
        };
        let target = std::fs::OpenOptions::new().write(true).open(&f.1).unwrap();
        let copy = src.start(target).unwrap();
        src.hook.before_write(0, 1);
        let report = copy.finish().unwrap();
        assert_eq!(report.bytes, 3 * COPY_CHUNK);
        assert_eq!(
            report.chunks_by_thread + report.chunks_before_write + report.chunks_holes,
            3
        );
        assert_eq!(std::fs::read(&f.1).unwrap(), std::fs::read(&f.0).unwrap());
        assert!(src.hook.0.lock().unwrap().is_none(), "copy mode ended");

        let target = std::fs::OpenOptions::new().write(true).open(&f.1).unwrap();
        let copy = src.start(target).unwrap();
        copy.cancel_handle().cancel();
        assert!(matches!(
            copy.finish(),
            Err(DiskCopyError::Cancelled) | Ok(_)
        ));
        assert!(src.hook.0.lock().unwrap().is_none(), "copy mode ended");
    }
}
