//! Arming (register + write-protect) and running (walkers + fault thread).

use page_runs::FirstError;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::blocks::Blocks;
use crate::pages::{assemble, PageBuf, PageStore};
use crate::report::{LatencyStats, PreArmStats, SnapshotReport};
use crate::sys::{self, Uffd, UffdMsg};
use crate::{BlockSink, MemRange, SnapshotError};
use page_runs::populated::{self, Pagemap};

const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
/// Claimed by a walker, and a writer waits on it: the walker un-protects it.
const WAITED: u8 = 3;
const DONE: u8 = 2;
/// Held by the fault thread while it copies and un-protects a run of its
/// pages (back to Pending after), or copies it whole (then Done).
const FAULTING: u8 = 4;

/// How long the fault thread and idle walkers wait before re-checking for stop.
const POLL_MS: libc::c_int = 5;
const IDLE_WAIT: Duration = Duration::from_millis(2);
/// Fault copies of pages may hold up to this many bytes until their blocks
/// are walked; beyond it, a fault copies its whole block and writes it.
const PAGE_POOL_BYTES: usize = 32 << 20;
/// Page buffers allocated and touched before the run starts, so that a
/// fault does not pay for first-touch page faults in its buffer.
const PAGE_PREALLOC_BYTES: usize = 16 << 20;
/// Blocks whose pagemap entries a walker reads at once (finding never-populated ones).
const WINDOW_BLOCKS: usize = 64;

/// Creates the userfaultfd, mapping failures to the right error.
pub(crate) fn create_uffd() -> Result<Uffd, SnapshotError> {
    Uffd::create().map_err(|e| {
        let perm = |err: &std::io::Error| {
            matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        };
        let detail = format!("userfaultfd(2): {}; /dev/userfaultfd: {}", e.syscall, e.dev);
        if perm(&e.syscall) || perm(&e.dev) {
            SnapshotError::PermissionDenied(detail)
        } else if e.syscall.raw_os_error() == Some(libc::ENOSYS) {
            SnapshotError::Unsupported {
                feature: "userfaultfd",
                since: "4.3",
                kernel: sys::kernel_release(),
                detail,
            }
        } else {
            SnapshotError::io("creating a userfaultfd", std::io::Error::other(detail))
        }
    })
}

/// Options for [`arm_with`].
#[derive(Clone, Copy, Debug)]
pub struct ArmOptions {
    /// Use `UFFD_FEATURE_WP_UNPOPULATED` when the kernel offers it (default true).
    /// When false or not offered, every page is pre-touched (read-faulted) before
    /// protecting, so that never-touched memory is protected too (slower arm).
    pub use_wp_unpopulated: bool,
    /// Record never-populated blocks of private anonymous memory as zeros
    /// without reading them (default true; needs WP_UNPOPULATED, and
    /// `CAP_SYS_ADMIN` to read the markers in `/proc/self/pagemap`).
    pub skip_unpopulated: bool,
    /// What a write fault on a block not yet copied copies and un-protects:
    /// the aligned run of this many bytes that holds the faulting page (a
    /// power-of-two multiple of the page size, at most the block size;
    /// default one page). The rest of the block stays protected for the
    /// walkers. The pre-arm fault thread un-protects the same runs.
    pub fault_copy_bytes: usize,
    /// Page copies made by faults are held until their block is walked, up
    /// to this many bytes (default 32 MiB); a fault that finds the pool
    /// full copies its whole block and writes it to the sink itself.
    pub fault_pool_bytes: usize,
}

/// What a fault on a block not yet copied does (from [`ArmOptions`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultCopy {
    /// Bytes copied and un-protected: the aligned run holding the page.
    pub(crate) run: usize,
    /// Bytes of page copies held at most.
    pub(crate) pool: usize,
}

impl Default for ArmOptions {
    fn default() -> Self {
        ArmOptions {
            use_wp_unpopulated: true,
            skip_unpopulated: true,
            fault_copy_bytes: sys::page_size(),
            fault_pool_bytes: PAGE_POOL_BYTES,
        }
    }
}

/// A stop request for a running snapshot, usable from any thread.
#[derive(Clone, Debug)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the snapshot to stop: walkers stop, all protection is removed and
    /// `run` returns [`SnapshotError::Cancelled`] (unless every block was already done).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether `cancel` was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Owns the userfaultfd and the registered ranges; removing protection is its job.
#[derive(Debug)]
pub(crate) struct Protection {
    /// Shared with the pre-arm fault thread while it runs.
    uffd: Option<Arc<Uffd>>,
    registered: Vec<(usize, usize)>,
}

impl Protection {
    /// Un-protects every registered range (waking all waiters), unregisters it and
    /// closes the uffd (which on its own would also drop all protection).
    pub(crate) fn release(&mut self) -> Result<(), SnapshotError> {
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        let mut first_err = None;
        for &(start, len) in &self.registered {
            if let Err(e) = uffd.writeprotect(start, len, false) {
                first_err.get_or_insert(SnapshotError::io("UFFDIO_WRITEPROTECT (remove)", e));
            }
            if let Err(e) = uffd.unregister(start, len) {
                first_err.get_or_insert(SnapshotError::io("UFFDIO_UNREGISTER", e));
            }
        }
        self.registered.clear();
        drop(uffd);
        first_err.map_or(Ok(()), Err)
    }

    pub(crate) fn uffd(&self) -> Result<&Uffd, SnapshotError> {
        self.uffd
            .as_deref()
            .ok_or_else(|| SnapshotError::InvalidArgument("snapshot already released".into()))
    }

    /// The uffd, for a thread that serves faults.
    pub(crate) fn shared_uffd(&self) -> Result<Arc<Uffd>, SnapshotError> {
        self.uffd
            .clone()
            .ok_or_else(|| SnapshotError::InvalidArgument("snapshot already released".into()))
    }

    /// Un-protects every range (wakes everyone) without unregistering.
    fn unprotect_all(&self) -> Result<(), SnapshotError> {
        let uffd = self.uffd()?;
        for &(start, len) in &self.registered {
            uffd.writeprotect(start, len, false)
                .map_err(|e| SnapshotError::io("UFFDIO_WRITEPROTECT (remove)", e))?;
        }
        Ok(())
    }
}

impl Drop for Protection {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Write-protected ranges, ready to [`run`](Armed::run). Dropping it removes all protection.
#[derive(Debug)]
pub struct Armed {
    pub(crate) prot: Protection,
    pub(crate) ranges: Vec<MemRange>,
    pub(crate) block_size: usize,
    pub(crate) arm_time: Duration,
    pub(crate) wp_unpopulated: bool,
    pub(crate) features: u64,
    /// Per range: whether never-populated blocks may be skipped.
    pub(crate) skip: Vec<bool>,
    /// What a fault copies and holds.
    pub(crate) fault: FaultCopy,
    pub(crate) cancel: Arc<AtomicBool>,
    /// What protecting ahead of the pause did ([`Prepared::pre_arm`]).
    pub(crate) pre_arm: Option<PreArmStats>,
}

/// Arms a snapshot of `ranges` with default options. Call it while the writers
/// are paused: the snapshot is the memory content at this moment (T0).
pub fn arm(ranges: &[MemRange], block_size: usize) -> Result<Armed, SnapshotError> {
    arm_with(ranges, block_size, ArmOptions::default())
}

fn validate(
    ranges: &[MemRange],
    block_size: usize,
    opts: &ArmOptions,
) -> Result<(), SnapshotError> {
    let page = sys::page_size();
    if ranges.is_empty() {
        return Err(SnapshotError::InvalidArgument("no memory ranges".into()));
    }
    if !block_size.is_power_of_two() || !block_size.is_multiple_of(page) {
        return Err(SnapshotError::InvalidArgument(format!(
            "block size {block_size} is not a power of two multiple of the page size {page}"
        )));
    }
    let fc = opts.fault_copy_bytes;
    if !fc.is_power_of_two() || !fc.is_multiple_of(page) || fc > block_size {
        return Err(SnapshotError::InvalidArgument(format!(
            "fault copy size {fc} is not a power of two multiple of the page size {page} \
             up to the block size {block_size}"
        )));
    }
    for (i, r) in ranges.iter().enumerate() {
        if r.is_empty() || r.addr() % page != 0 || r.len() % page != 0 {
            return Err(SnapshotError::InvalidArgument(format!(
                "range {i} ({:#x}, {} bytes) is empty or not page-aligned",
                r.addr(),
                r.len()
            )));
        }
        if r.addr().checked_add(r.len()).is_none() {
            return Err(SnapshotError::InvalidArgument(format!(
                "range {i} wraps around"
            )));
        }
    }
    let mut sorted: Vec<(usize, usize, usize)> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| (r.addr(), r.len(), i))
        .collect();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(SnapshotError::InvalidArgument(format!(
                "ranges {} and {} overlap",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(())
}

/// Read-faults every page of `r` so that never-touched memory gets a (zero) page
/// that write-protection can mark. Used when WP_UNPOPULATED is not used.
fn pre_touch(r: &MemRange) {
    // SAFETY: MADV_POPULATE_READ only faults pages in for reading; the range is
    // mapped (MemRange contract).
    let ret = unsafe { libc::madvise(r.ptr().cast(), r.len(), libc::MADV_POPULATE_READ) };
    if ret == 0 {
        return;
    }
    // Before Linux 5.14: touch every page by hand.
    let page = sys::page_size();
    let mut off = 0;
    while off < r.len() {
        // SAFETY: `off < len`, the range is mapped and readable (MemRange contract);
        // a volatile read of one byte has no other effect than faulting the page in.
        unsafe { std::ptr::read_volatile(r.ptr().add(off)) };
        off += page;
    }
}

/// Like [`arm`], with options.
///
/// Errors: [`SnapshotError::InvalidArgument`] for unaligned, empty or
/// overlapping ranges or a bad block size; [`SnapshotError::Unsupported`] or
/// [`SnapshotError::PermissionDenied`] when the kernel or the process cannot use
/// userfaultfd write-protection; [`SnapshotError::UnsupportedMemory`] when a
/// range's memory type cannot be write-protected (e.g. a private file mapping).
/// On error nothing stays registered or protected.
pub fn arm_with(
    ranges: &[MemRange],
    block_size: usize,
    opts: ArmOptions,
) -> Result<Armed, SnapshotError> {
    prepare_with(ranges, block_size, opts)?.arm()
}

/// A userfaultfd registered in write-protect mode over the ranges, protecting
/// nothing yet. Registering costs time that need not fall inside the
/// writers' pause: prepare while they run, then [`Prepared::arm`] while they
/// are paused.
pub struct Prepared {
    pub(crate) prot: Protection,
    pub(crate) ranges: Vec<MemRange>,
    pub(crate) block_size: usize,
    pub(crate) wp_unpopulated: bool,
    pub(crate) features: u64,
    /// Per range: whether never-populated blocks may be skipped.
    pub(crate) skip: Vec<bool>,
    /// What a fault copies and holds.
    pub(crate) fault: FaultCopy,
}

/// [`prepare_with`] with the default options.
pub fn prepare(ranges: &[MemRange], block_size: usize) -> Result<Prepared, SnapshotError> {
    prepare_with(ranges, block_size, ArmOptions::default())
}

/// Creates the userfaultfd, negotiates its features and registers every
/// range (without the pre-touch path's faults counting against a pause:
/// never-touched memory is read-faulted here when WP_UNPOPULATED is off).
pub fn prepare_with(
    ranges: &[MemRange],
    block_size: usize,
    opts: ArmOptions,
) -> Result<Prepared, SnapshotError> {
    validate(ranges, block_size, &opts)?;
    let support = crate::check_support()?;
    let wp_unpopulated = opts.use_wp_unpopulated && support.wp_unpopulated;
    let mut features = sys::FEATURE_PAGEFAULT_FLAG_WP;
    if wp_unpopulated {
        features |= sys::FEATURE_WP_UNPOPULATED;
    }
    if support.wp_shmem_hugetlbfs {
        features |= sys::FEATURE_WP_HUGETLBFS_SHMEM;
    }
    let uffd = create_uffd()?;
    let api = uffd
        .api(features)
        .map_err(|e| SnapshotError::io(format!("UFFDIO_API with features {features:#x}"), e))?;
    let mut prot = Protection {
        uffd: Some(Arc::new(uffd)),
        registered: Vec::new(),
    };
    if !wp_unpopulated {
        for r in ranges {
            pre_touch(r);
        }
    }
    for (i, r) in ranges.iter().enumerate() {
        let uffd = prot.uffd()?;
        let mapping =
            || sys::mapping_of(r.addr()).unwrap_or_else(|| "no mapping found".to_string());
        match uffd.register_wp(r.addr(), r.len()) {
            Ok(ioctls) if ioctls & sys::IOCTL_BIT_WRITEPROTECT != 0 => {
                prot.registered.push((r.addr(), r.len()));
            }
            Ok(ioctls) => {
                prot.registered.push((r.addr(), r.len()));
                return Err(SnapshotError::UnsupportedMemory {
                    region: i,
                    reason: format!(
                        "the kernel registered it but offers no UFFDIO_WRITEPROTECT on it \
                         (ioctls {ioctls:#x}); mapping: {}",
                        mapping()
                    ),
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(SnapshotError::UnsupportedMemory {
                    region: i,
                    reason: format!(
                        "UFFDIO_REGISTER in write-protect mode failed with EINVAL: this memory \
                         type cannot be write-protected (only private anonymous memory, Linux 5.7+, \
                         and shmem or hugetlbfs, Linux 5.19+, can be; file mappings cannot); \
                         mapping: {}",
                        mapping()
                    ),
                });
            }
            Err(e) => {
                return Err(SnapshotError::io(
                    format!(
                        "UFFDIO_REGISTER of range {i} ({:#x}, {} bytes)",
                        r.addr(),
                        r.len()
                    ),
                    e,
                ))
            }
        }
    }
    let skip = skippable(ranges, opts.skip_unpopulated && wp_unpopulated);
    Ok(Prepared {
        prot,
        ranges: ranges.to_vec(),
        block_size,
        wp_unpopulated,
        features: api.features,
        skip,
        fault: FaultCopy {
            run: opts.fault_copy_bytes,
            pool: opts.fault_pool_bytes,
        },
    })
}

/// Per range: whether its never-populated blocks may be recorded as zeros
/// without reading them (only private anonymous memory, see `populated`).
fn skippable(ranges: &[MemRange], wanted: bool) -> Vec<bool> {
    let maps = match wanted {
        true => std::fs::read_to_string("/proc/self/maps").unwrap_or_default(),
        false => String::new(),
    };
    ranges
        .iter()
        .map(|r| wanted && populated::private_anonymous(&maps, r.addr(), r.len()))
        .collect()
}

impl Prepared {
    /// Write-protects every range (call with the writers paused): from this
    /// instant, the snapshot is the memory as it is now. The ranges are
    /// protected in pieces by one thread per CPU, so that the pause stays short.
    pub fn arm(self) -> Result<Armed, SnapshotError> {
        let start = Instant::now();
        // On error `self` drops, removing every protection applied.
        protect_all(self.prot.uffd()?, &self.ranges, self.block_size)?;
        Ok(Armed {
            prot: self.prot,
            ranges: self.ranges,
            block_size: self.block_size,
            arm_time: start.elapsed(),
            wp_unpopulated: self.wp_unpopulated,
            features: self.features,
            skip: self.skip,
            fault: self.fault,
            cancel: Arc::new(AtomicBool::new(false)),
            pre_arm: None,
        })
    }
}

/// Write-protects every range, in pieces, from one thread per CPU (at most 16).
pub(crate) fn protect_all(
    uffd: &Uffd,
    ranges: &[MemRange],
    block_size: usize,
) -> Result<(), SnapshotError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let total: usize = ranges.iter().map(|r| r.len()).sum();
    // Pieces of about total/threads bytes, block aligned, never across ranges.
    let piece = (total / threads).div_ceil(block_size).max(1) * block_size;
    let mut pieces = Vec::new();
    for r in ranges {
        let mut off = 0;
        while off < r.len() {
            let len = piece.min(r.len() - off);
            pieces.push((r.addr() + off, len));
            off += len;
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .chunks(pieces.len().div_ceil(threads).max(1))
            .map(|group| s.spawn(move || protect(uffd, group)))
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(SnapshotError::io(
                    "UFFDIO_WRITEPROTECT (protect)",
                    std::io::Error::other("protecting thread panicked"),
                ))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// Write-protects each `(address, length)` span.
pub(crate) fn protect(uffd: &Uffd, spans: &[(usize, usize)]) -> Result<(), SnapshotError> {
    for &(addr, len) in spans {
        uffd.writeprotect(addr, len, true)
            .map_err(|e| SnapshotError::io("UFFDIO_WRITEPROTECT (protect)", e))?;
    }
    Ok(())
}

/// Copies block memory at `src` (`len` bytes) into `buf` at a page-aligned
/// offset, which it returns (so that a sink can write it with O_DIRECT),
/// taking the pages in `copies` from there instead of memory.
///
/// # Safety
/// As [`assemble`]: `src` valid for reads of `len` bytes, its pages without
/// a copy not written meanwhile, and no overlap with `buf`.
unsafe fn assemble_aligned(
    src: *const u8,
    len: usize,
    copies: &[(usize, PageBuf)],
    buf: &mut Vec<u8>,
) -> usize {
    let page = sys::page_size();
    if buf.len() < len + page {
        // Zeroed once; later blocks reuse it without clearing.
        *buf = vec![0; len + page];
    }
    let off = buf.as_ptr().align_offset(page).min(page);
    // SAFETY: the caller vouches for `src`; `buf[off..off + len]` is in `buf`.
    unsafe { assemble(src, len, page, copies, &mut buf[off..off + len]) };
    off
}

/// State shared by the walkers and the fault thread during `run`.
struct Shared<'a> {
    uffd: &'a Uffd,
    blocks: Blocks,
    states: Vec<AtomicU8>,
    done: AtomicU64,
    cursor: AtomicU64,
    /// Cancel requested by the owner.
    cancel: &'a AtomicBool,
    /// Internal stop, and the first error: an error happened, or a thread
    /// panicked (stop without an error).
    abort: FirstError<SnapshotError>,
    /// Set by `run` once the walkers are gone and protection is removed.
    fault_stop: AtomicBool,
    /// Idle walkers wait here until every block is done.
    idle: Mutex<()>,
    cv: Condvar,
    /// Fault copies of pages, until their block is walked.
    store: PageStore,
    /// Bytes a fault copies and un-protects.
    fault_copy: usize,
    blocks_by_walkers: AtomicU64,
    blocks_by_faults: AtomicU64,
    pages_by_faults: AtomicU64,
    blocks_with_fault_pages: AtomicU64,
    /// Where never-populated blocks are found (`None`: nothing is skipped).
    pagemap: Option<Pagemap>,
    /// Per range: whether its never-populated blocks may be skipped.
    skip: &'a [bool],
    blocks_unpopulated: AtomicU64,
}

/// A walker's view of which blocks of a window were never populated.
#[derive(Default)]
struct Window {
    first: u64,
    unpopulated: Vec<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets `abort` if the owning thread unwinds, so the others stop instead of
/// waiting for a block that will never be done.
struct AbortOnPanic<'a>(&'a FirstError<SnapshotError>);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.stop();
        }
    }
}

#[derive(Default)]
struct FaultStats {
    faults: u64,
    on_claimed: u64,
    on_done: u64,
    on_copied: u64,
    latencies: Vec<Duration>,
}

impl Shared<'_> {
    fn stopping(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.abort.stopped()
    }

    fn all_done(&self) -> bool {
        self.done.load(Ordering::Acquire) == self.blocks.total()
    }

    fn fail(&self, err: SnapshotError) {
        self.abort.fail(err);
        self.cv.notify_all();
    }

    /// A walker's claim of block `g`: true if it is now the walker's. While
    /// the fault thread holds the block (copying a run of it) the walker
    /// waits for it, because the block may still be Pending after that.
    fn claim_for_walk(&self, g: u64) -> bool {
        let state = &self.states[g as usize];
        loop {
            match state.compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(FAULTING) if !self.stopping() => thread::yield_now(),
                Err(_) => return false,
            }
        }
    }

    /// The fault thread's hold on Pending block `g`.
    fn claim_for_fault(&self, g: u64) -> bool {
        self.states[g as usize]
            .compare_exchange(PENDING, FAULTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends the fault thread's hold: the block is Pending again, with the
    /// copied pages recorded, for a walker to complete.
    fn release_fault(&self, g: u64) {
        self.states[g as usize].store(PENDING, Ordering::Release);
    }

    /// Marks a walked block Done; true when a writer waits on it (the
    /// caller must un-protect it).
    fn finish_walked(&self, g: u64) -> bool {
        let waited = self.states[g as usize]
            .compare_exchange(CLAIMED, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
        self.mark_done(g);
        waited
    }

    /// A fault on a block it could not claim: marks it WAITED if a walker
    /// still copies it (the walker un-protects it); true if the caller must
    /// un-protect it: it is Done already (still protected), or left held by
    /// the fault thread when a stop came (un-protected then; again is
    /// harmless).
    fn fault_on_taken(&self, g: u64) -> bool {
        let state = &self.states[g as usize];
        match state.compare_exchange(CLAIMED, WAITED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => false,
            Err(now) => now == DONE || now == FAULTING,
        }
    }

    fn mark_done(&self, g: u64) {
        self.states[g as usize].store(DONE, Ordering::Release);
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.blocks.total() {
            self.cv.notify_all();
        }
    }

    fn unprotect(&self, addr: usize, len: usize) -> Result<(), SnapshotError> {
        self.uffd
            .writeprotect(addr, len, false)
            .map_err(|e| SnapshotError::io("UFFDIO_WRITEPROTECT (un-protect)", e))
    }

    /// Whether block `g`, claimed by the caller, was never populated (so
    /// it is all zeros at T0). It was Pending until the claim, so protected
    /// and unchanged since T0, and the window was read after T0: a block
    /// unpopulated then was unpopulated at T0. The window is re-read when
    /// `g` lies outside it, for up to [`WINDOW_BLOCKS`] blocks from `g`.
    ///
    /// Only walkers ask: by the time a write fault reaches the fault thread,
    /// the kernel has already given the faulting page a fresh zeroed page
    /// (still protected), so the block no longer looks unpopulated.
    fn unpopulated(&self, g: u64, win: &mut Window) -> bool {
        let Some(pagemap) = &self.pagemap else {
            return false;
        };
        let (r, _, addr, _) = self.blocks.locate(g);
        if !self.skip[r] {
            return false;
        }
        if g < win.first || g - win.first >= win.unpopulated.len() as u64 {
            let range = &self.blocks.ranges()[r];
            let size = self.blocks.size();
            let len = (WINDOW_BLOCKS * size).min(range.addr() + range.len() - addr);
            pagemap.unpopulated_blocks(addr, len, size, sys::page_size(), &mut win.unpopulated);
            win.first = g;
        }
        win.unpopulated[(g - win.first) as usize]
    }

    /// Records claimed block `g` as zeros without reading it.
    fn write_zero(&self, sink: &dyn BlockSink, g: u64) -> Result<(), SnapshotError> {
        let (r, b, _, len) = self.blocks.locate(g);
        self.blocks_unpopulated.fetch_add(1, Ordering::Relaxed);
        sink.write_zero_block(r, b, len)
            .map_err(|source| SnapshotError::Sink {
                range: r,
                block: b,
                source,
            })
    }

    fn write(&self, sink: &dyn BlockSink, g: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let (r, b, _, _) = self.blocks.locate(g);
        sink.write_block(r, b, data)
            .map_err(|source| SnapshotError::Sink {
                range: r,
                block: b,
                source,
            })
    }

    /// The next block for a walker: blocks with fault copies first (that
    /// frees their pages, and a block once copied is un-protected whole on
    /// its next fault), then the walk in address order.
    fn next_block(&self) -> Option<u64> {
        if let Some(g) = self.store.next_hot() {
            return Some(g);
        }
        if self.cursor.load(Ordering::Relaxed) >= self.blocks.total() {
            return None;
        }
        let g = self.cursor.fetch_add(1, Ordering::Relaxed);
        (g < self.blocks.total()).then_some(g)
    }

    fn walker(&self, sink: &dyn BlockSink) {
        let _guard = AbortOnPanic(&self.abort);
        let mut window = Window::default();
        let mut buf = Vec::new();
        loop {
            if self.stopping() {
                return;
            }
            let Some(g) = self.next_block() else {
                // Nothing left to walk; the fault thread may still complete
                // a block it copies whole. Wait until every block is done.
                let idle = lock(&self.idle);
                if self.all_done() {
                    return;
                }
                let _ = self.cv.wait_timeout(idle, IDLE_WAIT);
                continue;
            };
            if !self.claim_for_walk(g) {
                continue; // taken by another walker, or done
            }
            if let Err(e) = self.walk(sink, g, &mut window, &mut buf) {
                self.fail(e);
                return;
            }
        }
    }

    /// Copies claimed block `g` to the sink: its pages that faults copied
    /// from their copies, the others straight from the still-protected
    /// memory. The block stays protected (un-protecting invalidates the
    /// guest's mappings of it, and most blocks are not written during the
    /// snapshot) unless a writer waits on it; a later write faults and the
    /// fault thread un-protects the whole block then.
    fn walk(
        &self,
        sink: &dyn BlockSink,
        g: u64,
        window: &mut Window,
        buf: &mut Vec<u8>,
    ) -> Result<(), SnapshotError> {
        let (_, _, addr, len) = self.blocks.locate(g);
        let copies = self.store.take_block(g);
        // A block with fault copies has a populated page: no need to read
        // pagemap (for a block taken out of the walk's order, a whole window).
        let written = if copies.is_empty() && self.unpopulated(g, window) {
            self.write_zero(sink, g)
        } else if copies.is_empty() {
            // SAFETY: the block lies inside a MemRange (mapped and readable for
            // the whole snapshot). No fault copied any of it, so all of it is
            // still write-protected, and it is claimed by this thread: no
            // writer can change it until the un-protect below.
            let data = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
            self.write(sink, g, data)
        } else {
            self.blocks_with_fault_pages.fetch_add(1, Ordering::Relaxed);
            // SAFETY: as above for the pages without a copy; the pages with
            // one (un-protected, perhaps written since) are not read.
            let off = unsafe { assemble_aligned(addr as *const u8, len, &copies, buf) };
            self.write(sink, g, &buf[off..off + len])
        };
        self.store.recycle(copies.into_iter().map(|(_, b)| b));
        // Un-protect even when the sink failed: a writer may be waiting.
        let unprotected = match self.finish_walked(g) {
            true => self.unprotect(addr, len),
            false => Ok(()),
        };
        written.and(unprotected)?;
        self.blocks_by_walkers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn fault_loop(&self, sink: &dyn BlockSink, stats: &mut FaultStats) {
        let _guard = AbortOnPanic(&self.abort);
        let mut msgs = [UffdMsg::default(); 64];
        let mut block_buf: Vec<u8> = Vec::new();
        loop {
            // Runs until told: blocks left protected by the walkers may
            // still fault until `run` has un-protected everything.
            if self.fault_stop.load(Ordering::SeqCst) {
                return;
            }
            match self.uffd.poll(POLL_MS) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return self.fail(SnapshotError::io("poll on the userfaultfd", e)),
            }
            let n = match self.uffd.read_msgs(&mut msgs) {
                Ok(n) => n,
                Err(e) => return self.fail(SnapshotError::io("reading the userfaultfd", e)),
            };
            let t_read = Instant::now();
            for m in &msgs[..n] {
                if let Err(e) = self.serve(sink, m, t_read, stats, &mut block_buf) {
                    return self.fail(e);
                }
            }
        }
    }

    /// The faulting address of a write-protect fault event in our ranges,
    /// and its block.
    fn fault_of(&self, m: &UffdMsg) -> Result<(usize, u64), SnapshotError> {
        if m.event != sys::EVENT_PAGEFAULT {
            return Err(SnapshotError::UnexpectedEvent(format!(
                "event {:#x}",
                m.event
            )));
        }
        if m.flags & sys::PAGEFAULT_FLAG_WP == 0 {
            return Err(SnapshotError::UnexpectedEvent(format!(
                "page fault without the WP flag (flags {:#x}) at {:#x}",
                m.flags, m.address
            )));
        }
        let addr = usize::try_from(m.address).unwrap_or(usize::MAX);
        match self.blocks.block_of(addr) {
            Some(g) => Ok((addr, g)),
            None => Err(SnapshotError::UnexpectedEvent(format!(
                "write-protect fault at {addr:#x}, outside every range"
            ))),
        }
    }

    fn serve(
        &self,
        sink: &dyn BlockSink,
        m: &UffdMsg,
        t_read: Instant,
        stats: &mut FaultStats,
        block_buf: &mut Vec<u8>,
    ) -> Result<(), SnapshotError> {
        let (addr, g) = self.fault_of(m)?;
        stats.faults += 1;
        let (_, _, start, len) = self.blocks.locate(g);
        if !self.claim_for_fault(g) {
            if self.fault_on_taken(g) {
                // Copied already (walkers leave blocks protected), or a race
                // with an un-protect: un-protecting wakes the writer either way.
                stats.on_done += 1;
                self.unprotect(start, len)?;
            } else {
                // The claimer's un-protect wakes the writer.
                stats.on_claimed += 1;
            }
            return Ok(());
        }
        if self.stopping() {
            // Cancelled or failed: no copy is wanted, just let the writer go.
            return self.unprotect(start, len);
        }
        let (run, run_len) = self.blocks.run_at(g, addr, self.fault_copy);
        let page = sys::page_size();
        let first = (run - start) / page;
        if self.store.has(g, first) {
            // A second event for a run copied already (two writers faulted
            // on it): it is un-protected, and must not be copied again.
            stats.on_copied += 1;
            self.unprotect(run, run_len)?;
            self.release_fault(g);
            return Ok(());
        }
        let Some(mut bufs) = self.store.take_buffers(run_len / page) else {
            return self.fault_copies_block(sink, g, t_read, stats, block_buf);
        };
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: the page lies in the block (a MemRange, mapped and
            // readable); it is still write-protected and the block is held by
            // this thread, so nobody writes it during the copy; `b` is ours.
            unsafe {
                std::ptr::copy_nonoverlapping((run + i * page) as *const u8, b.as_mut_ptr(), page)
            };
        }
        // Recorded before the un-protect: the block's walker takes these
        // pages instead of memory, whatever the writer does after.
        self.store.insert(g, first, bufs);
        self.unprotect(run, run_len)?;
        self.release_fault(g);
        stats.latencies.push(t_read.elapsed());
        self.pages_by_faults
            .fetch_add((run_len / page) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The page pool is exhausted: the fault thread copies held block `g`
    /// whole (with the pages copied earlier), un-protects it, then writes it
    /// to the sink itself. The writer waits only for the copy.
    fn fault_copies_block(
        &self,
        sink: &dyn BlockSink,
        g: u64,
        t_read: Instant,
        stats: &mut FaultStats,
        buf: &mut Vec<u8>,
    ) -> Result<(), SnapshotError> {
        let (_, _, start, len) = self.blocks.locate(g);
        let copies = self.store.take_block(g);
        // SAFETY: the block lies inside a MemRange; the pages without a copy
        // are still write-protected and the block is held by this thread.
        let off = unsafe { assemble_aligned(start as *const u8, len, &copies, buf) };
        self.store.recycle(copies.into_iter().map(|(_, b)| b));
        // Un-protect (and wake the writer) before the sink sees the copy.
        self.unprotect(start, len)?;
        stats.latencies.push(t_read.elapsed());
        self.blocks_by_faults.fetch_add(1, Ordering::Relaxed);
        self.write(sink, g, &buf[off..off + len])?;
        self.mark_done(g);
        Ok(())
    }
}

impl Armed {
    /// A handle that cancels [`run`](Armed::run) from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.cancel.clone())
    }

    /// How long `arm` took: protecting everything, or, after
    /// [`Prepared::pre_arm`], stopping its fault thread and re-protecting the
    /// blocks written since (the part the writers' pause must cover).
    pub fn arm_time(&self) -> Duration {
        self.arm_time
    }

    /// What protecting ahead of the pause did, if [`Prepared::pre_arm`] was used.
    pub fn pre_arm_stats(&self) -> Option<PreArmStats> {
        self.pre_arm
    }

    /// Whether never-touched memory was protected with `UFFD_FEATURE_WP_UNPOPULATED`
    /// (false: every page was pre-touched instead).
    pub fn used_wp_unpopulated(&self) -> bool {
        self.wp_unpopulated
    }

    /// The feature bits the kernel reported when this snapshot's uffd was set up.
    pub fn api_features(&self) -> u64 {
        self.features
    }

    /// The block size given to `arm`.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Copies every block exactly once through `sink` with `walkers` threads
    /// while a fault thread serves writers that hit protected blocks. All
    /// protection is removed and the uffd closed before it returns, also on
    /// error and on cancel ([`SnapshotError::Cancelled`]).
    pub fn run(
        mut self,
        sink: &dyn BlockSink,
        walkers: usize,
    ) -> Result<SnapshotReport, SnapshotError> {
        let start = Instant::now();
        if sink.block_size() != self.block_size {
            self.prot.release()?;
            return Err(SnapshotError::InvalidArgument(format!(
                "the sink's block size {} differs from the armed block size {}",
                sink.block_size(),
                self.block_size
            )));
        }
        if walkers == 0 {
            self.prot.release()?;
            return Err(SnapshotError::InvalidArgument(
                "at least one walker is needed".into(),
            ));
        }
        let blocks = Blocks::new(&self.ranges, self.block_size);
        let total = blocks.total();
        let page = sys::page_size();
        let store = PageStore::new(page, self.fault.pool / page, PAGE_PREALLOC_BYTES / page);
        let uffd = self.prot.uffd()?;
        let shared = Shared {
            uffd,
            blocks,
            states: (0..total).map(|_| AtomicU8::new(PENDING)).collect(),
            done: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            cancel: &self.cancel,
            abort: FirstError::new(),
            fault_stop: AtomicBool::new(false),
            idle: Mutex::new(()),
            cv: Condvar::new(),
            store,
            fault_copy: self.fault.run,
            blocks_by_walkers: AtomicU64::new(0),
            blocks_by_faults: AtomicU64::new(0),
            pages_by_faults: AtomicU64::new(0),
            blocks_with_fault_pages: AtomicU64::new(0),
            pagemap: self.skip.contains(&true).then(Pagemap::open).flatten(),
            skip: &self.skip,
            blocks_unpopulated: AtomicU64::new(0),
        };
        let mut stats = FaultStats::default();
        let mut panic_payload = None;
        let mut unprotect_err = None;
        thread::scope(|s| {
            let sh = &shared;
            let stats_ref = &mut stats;
            let fault = thread::Builder::new()
                .name("bg-snap-fault".into())
                .spawn_scoped(s, move || sh.fault_loop(sink, stats_ref));
            let fault = match fault {
                Ok(h) => Some(h),
                Err(e) => {
                    sh.fail(SnapshotError::io("spawning the fault thread", e));
                    None
                }
            };
            let mut handles = Vec::with_capacity(walkers);
            for i in 0..walkers {
                if sh.stopping() {
                    break;
                }
                match thread::Builder::new()
                    .name(format!("bg-snap-walk{i}"))
                    .spawn_scoped(s, move || sh.walker(sink))
                {
                    Ok(h) => handles.push(h),
                    Err(e) => sh.fail(SnapshotError::io("spawning a walker thread", e)),
                }
            }
            for h in handles {
                if let Err(p) = h.join() {
                    panic_payload.get_or_insert(p);
                }
            }
            // Walkers are gone: un-protect everything (walked blocks stay
            // protected until now) while the fault thread still serves.
            if !sh.all_done() {
                sh.abort.stop();
            }
            if let Err(e) = self.prot.unprotect_all() {
                unprotect_err = Some(e);
            }
            sh.fault_stop.store(true, Ordering::SeqCst);
            if let Some(h) = fault {
                if let Err(p) = h.join() {
                    panic_payload.get_or_insert(p);
                }
            }
        });
        let complete = shared.all_done();
        let error = shared.abort.take();
        let report = SnapshotReport {
            blocks_by_walkers: shared.blocks_by_walkers.load(Ordering::Relaxed),
            blocks_by_faults: shared.blocks_by_faults.load(Ordering::Relaxed),
            bytes: self.ranges.iter().map(|r| r.len() as u64).sum(),
            faults: stats.faults,
            faults_on_claimed: stats.on_claimed,
            faults_on_done: stats.on_done,
            pages_by_faults: shared.pages_by_faults.load(Ordering::Relaxed),
            blocks_with_fault_pages: shared.blocks_with_fault_pages.load(Ordering::Relaxed),
            faults_on_copied: stats.on_copied,
            fault_pages_peak: shared.store.peak() as u64,
            fault_copy_bytes: self.fault.run as u64,
            blocks_unpopulated: shared.blocks_unpopulated.load(Ordering::Relaxed),
            fault_latency: LatencyStats::from_samples(&mut stats.latencies),
            run_time: Duration::ZERO,
            arm_time: self.arm_time,
            wp_unpopulated: self.wp_unpopulated,
            pre_arm: self.pre_arm,
        };
        drop(shared);
        let released = self.prot.release();
        if let Some(p) = panic_payload {
            std::panic::resume_unwind(p);
        }
        if let Some(e) = error {
            return Err(e);
        }
        if !complete {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(SnapshotError::Cancelled);
            }
            if let Some(e) = unprotect_err {
                return Err(e);
            }
            return Err(SnapshotError::UnexpectedEvent(
                "the walkers stopped before every block was copied".into(),
            ));
        }
        released?;
        Ok(SnapshotReport {
            run_time: start.elapsed(),
            ..report
        })
    }

    /// Drops the snapshot without copying anything: removes all protection
    /// (waking any waiting writer), unregisters and closes the uffd.
    pub fn disarm(mut self) -> Result<(), SnapshotError> {
        self.prot.release()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembled_blocks_are_page_aligned_for_o_direct() {
        let page = sys::page_size();
        let src: Vec<u8> = (0..2 * page).map(|i| (i % 251) as u8).collect();
        let copy: PageBuf = vec![0xee; page].into_boxed_slice();
        let copies = [(1, copy)];
        for mut buf in [Vec::new(), vec![1u8; 3], vec![0xa5u8; 3 * page]] {
            // SAFETY: `src` is ours, readable for its length, and not written.
            let off = unsafe { assemble_aligned(src.as_ptr(), src.len(), &copies, &mut buf) };
            assert_eq!(buf[off..].as_ptr() as usize % page, 0);
            assert_eq!(&buf[off..off + page], &src[..page]);
            assert!(buf[off + page..off + 2 * page].iter().all(|&b| b == 0xee));
        }
    }
}
