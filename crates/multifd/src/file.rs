//! File channels: N threads moving pages between guest memory and a
//! fixed-ram file, each with its own file descriptor.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pace::{any_dirty, check_page_set, is_dirty, per_channel, Pace};
use crate::sys;
use crate::unpopulated::Unpopulated;
use crate::{CallerError, MemRegion, MultifdError, PageSet};
use page_runs::{crc32c_append_zeros, is_zero, push_page, push_page_joining, FirstError, PageRun};

/// The most channels a file transfer may use.
pub const MAX_FILE_CHANNELS: usize = 256;

/// Bytes of guest RAM one channel takes from the shared cursor at a time
/// (whole chunks of one region; runs of non-zero pages are written with one
/// system call across the chunks of a unit).
const UNIT_BYTES: u64 = 4 << 20;
/// A live dirty pass joins dirty pages of one chunk up to this many pages
/// apart into one write: an extra 64 KiB costs about what one more write
/// costs on the disks we measured (a few tens of µs), and scattered 4 KiB
/// writes are what bound a dirty round otherwise.
const JOIN_GAP_PAGES: u64 = 16;

/// Writes each saving channel keeps in flight: its pipeline has one thread
/// preparing the next unit (zero scan, CRC32C) and this many writing, each
/// with one `pwrite` in flight, so that the disk is not idle while a writer
/// hands its chunks back or waits for a CPU. Measured with one channel on a
/// loaded 2-CPU machine, two writers shortened the data phase against one
/// (docs/benchmarks.md). A live pass keeps one: each write in flight there
/// holds a copy of its unit. Benchmarks use it to drive the raw reference
/// at the same depth.
pub const SAVE_QUEUE_DEPTH: usize = 2;

/// Reads each loading channel keeps in flight: one thread faults memory in
/// for the next units while this many read and check the units before
/// them, one `pread` in flight each, so that one reads while another checks
/// its CRCs. With one channel, two readers restored 2-5x faster than one on
/// a loaded machine, and four were no faster than two (docs/benchmarks.md).
pub const LOAD_QUEUE_DEPTH: usize = 2;

/// Alignment checked before an `O_DIRECT` transfer (the smallest logical
/// block size of any block device).
const DIRECT_ALIGN: u64 = 512;

/// Where each page lives in the file, and the bookkeeping of written chunks.
///
/// Implemented by the fixed-ram image format; the channels call it from
/// several threads at once.
pub trait FileLayout: Sync {
    /// The page size: a power of two, at least 512.
    fn page_size(&self) -> u64;
    /// The chunk size: the work unit and checksum granularity (1 MiB), a
    /// multiple of the page size.
    fn chunk_size(&self) -> u64;
    /// How many chunks region `region` has.
    fn chunks(&self, region: usize) -> u64;
    /// Chunk `chunk` of `region`: (byte offset within the region, length).
    /// Both are multiples of the page size.
    fn chunk_range(&self, region: usize, chunk: u64) -> (u64, u64);
    /// The file offset of page `page` of `region`. The pages of a region are
    /// contiguous in the file.
    fn page_file_offset(&self, region: usize, page: u64) -> u64;
    /// Called once per chunk after its pages are written: which pages are
    /// present (non-zero; bitmap words for the chunk's pages, LSB first) and
    /// the CRC32C of the chunk's bytes as read back (zero pages as zeros).
    fn chunk_saved(
        &self,
        region: usize,
        chunk: u64,
        present: &[u64],
        crc: u32,
    ) -> Result<(), CallerError>;
    /// Whether page `page` of `region` is present in the file (restore side).
    fn page_present(&self, region: usize, page: u64) -> bool;
    /// Checks a chunk after it was read into memory (restore side):
    /// an error if its checksum does not match.
    fn chunk_loaded(&self, region: usize, chunk: u64, data: &[u8]) -> Result<(), CallerError>;
}

/// Whether file channels use `O_DIRECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectIo {
    /// Buffered I/O through the page cache.
    Off,
    /// `O_DIRECT`; an error ([`MultifdError::DirectIoUnsupported`]) if the
    /// filesystem refuses it.
    On,
    /// `O_DIRECT` if the filesystem supports it, else buffered I/O with a warning.
    Auto,
}

/// Options for [`save_to_file`] and [`load_from_file`].
#[derive(Clone, Debug)]
pub struct FileChannelOptions {
    /// Number of channels (threads, each with its own file descriptor), 1 to
    /// [`MAX_FILE_CHANNELS`].
    pub channels: usize,
    /// Whether to bypass the page cache.
    pub direct_io: DirectIo,
    /// Loading: fault each run's target pages in (`MADV_POPULATE_WRITE`)
    /// before reading into them. Cheaper for fresh anonymous memory (one
    /// call instead of a fault per page); useless for memory that is already
    /// populated. Saving ignores it.
    pub prefault: bool,
}

/// What a transfer did.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransferStats {
    /// Bytes written to or read from the file (page data only), or sent or
    /// received on the sockets (everything on the wire).
    pub bytes: u64,
    /// Pages that were present (non-zero) and so moved.
    pub present_pages: u64,
    /// Pages that were zero (not written, not read, not sent).
    pub zero_pages: u64,
    /// Wall-clock time of the whole transfer.
    pub elapsed: Duration,
    /// Whether the file was accessed with `O_DIRECT`.
    pub direct_io: bool,
    /// Number of channels used.
    pub channels: usize,
}

impl TransferStats {
    /// Throughput in MB/s (10^6 bytes per second) of [`bytes`](Self::bytes).
    pub fn mb_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e6
        } else {
            0.0
        }
    }
}

/// Writes the present (non-zero) pages of `regions` into the existing file
/// at `path`, at the offsets `layout` gives, with `opts.channels` threads.
///
/// The file must already exist with its final size (the image writer creates
/// it); zero pages are not written (the file is fresh and sparse). Each
/// chunk's present bitmap and CRC32C go to [`FileLayout::chunk_saved`] once
/// its pages are written. The file is not synced: the caller does that when
/// it commits the image. The first error stops all channels and is returned.
pub fn save_to_file(
    path: &Path,
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
) -> Result<TransferStats, MultifdError> {
    save_with(path, regions, layout, opts, &FilePass::ALL, false)
}

/// Never set: the stop flag of a transfer nothing stops.
static NEVER: AtomicBool = AtomicBool::new(false);

/// One pass of a live save into a fixed-ram file: which chunks it writes,
/// how fast, and when it stops.
#[derive(Clone, Copy, Debug)]
pub struct FilePass<'a> {
    /// `AllNonZero`: every chunk (the first pass over a fresh file);
    /// `Dirty(maps)`: every chunk holding a page whose bit is set: its dirty
    /// non-zero pages are written, and its bitmap and CRC, computed over the
    /// whole chunk, are recorded again through [`FileLayout::chunk_saved`]
    /// (which must clear the pages that became zero). Its other pages are
    /// not written: the caller guarantees the file holds them as the memory
    /// does (a live save's dirty log: a page not dirty since its last write).
    pub pages: PageSet<'a>,
    /// Bandwidth limit of the channels together, bytes per second (None: none).
    pub max_bytes_per_s: Option<u64>,
    /// Set from another thread to stop the pass at its next unit of work:
    /// the pass then ends with [`MultifdError::Aborted`].
    pub stop: &'a AtomicBool,
    /// Run the pass's threads in the scheduler's background
    /// (`SCHED_BATCH` at nice [`crate::TRANSFER_NICE`]), as a live
    /// migration's sending rounds do: for a live save's rounds while the
    /// guest runs, so that its vCPUs keep their CPUs. Not for the last
    /// round, which the paused guest waits for.
    pub background: bool,
}

impl FilePass<'static> {
    /// Every chunk, no limit, never stopped: a stopped save or a load.
    const ALL: FilePass<'static> = FilePass {
        pages: PageSet::AllNonZero,
        max_bytes_per_s: None,
        stop: &NEVER,
        background: false,
    };
}

/// [`save_to_file`] for one pass of a live save: the memory may change while
/// the pass reads it (a running guest). Each unit is first copied into a
/// page-aligned buffer, and the zero scan, the CRCs and the writes use the
/// copy; a page the guest wrote after the copy may disagree with its
/// chunk's CRC until the caller's next pass rewrites it (its dirty log finds
/// it), the last one with the memory no longer changing. A dirty pass
/// writes dirty pages close together in a chunk (at most 16 pages apart)
/// with one write that covers the pages between them too, from the copy.
pub fn save_pass_to_file(
    path: &Path,
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
    pass: &FilePass<'_>,
) -> Result<TransferStats, MultifdError> {
    save_with(path, regions, layout, opts, pass, true)
}

/// A save pass; `copy`: the memory may change, work from a copy.
fn save_with(
    path: &Path,
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
    pass: &FilePass<'_>,
    copy: bool,
) -> Result<TransferStats, MultifdError> {
    check_page_set(pass.pages, regions, layout.page_size())?;
    let dir = Direction::Save { copy };
    transfer(path, regions, layout, opts, dir, pass)
}

/// Reads the present pages of the file at `path` (per
/// [`FileLayout::page_present`]) straight into `regions`, with
/// `opts.channels` threads, and checks each chunk with
/// [`FileLayout::chunk_loaded`].
///
/// Absent pages are left alone: the target memory must be fresh and zeroed
/// (e.g. new anonymous memory). The first error stops all channels and is
/// returned; the memory is then only partly loaded and must not be used.
pub fn load_from_file(
    path: &Path,
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
) -> Result<TransferStats, MultifdError> {
    let populate = opts.prefault;
    let dir = Direction::Load { populate };
    transfer(path, regions, layout, opts, dir, &FilePass::ALL)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `copy`: the memory may change (a live pass): work from a copy.
    Save {
        copy: bool,
    },
    Load {
        populate: bool,
    },
}

impl Direction {
    fn verb(self) -> &'static str {
        match self {
            Direction::Save { .. } => "save",
            Direction::Load { .. } => "load",
        }
    }
}

/// The work list: units of up to `per_unit` consecutive chunks of one region.
struct Work {
    /// Index of the first unit of each region, plus the total at the end.
    unit_start: Vec<u64>,
    per_unit: u64,
}

impl Work {
    fn new(layout: &dyn FileLayout, regions: usize, per_unit: u64) -> Result<Work, MultifdError> {
        let mut unit_start = Vec::with_capacity(regions + 1);
        let mut total = 0u64;
        for r in 0..regions {
            unit_start.push(total);
            total = total
                .checked_add(layout.chunks(r).div_ceil(per_unit))
                .ok_or_else(|| MultifdError::Layout("the chunk count overflows".into()))?;
        }
        unit_start.push(total);
        Ok(Work {
            unit_start,
            per_unit,
        })
    }

    fn total(&self) -> u64 {
        self.unit_start.last().copied().unwrap_or(0)
    }

    /// Unit `idx` as (region, first chunk, chunk count).
    fn unit(&self, layout: &dyn FileLayout, idx: u64) -> (usize, u64, u64) {
        // The last region whose first unit is <= idx (empty regions share it).
        let r = self.unit_start.partition_point(|&s| s <= idx) - 1;
        let first = (idx - self.unit_start[r]) * self.per_unit;
        let n = self.per_unit.min(layout.chunks(r) - first);
        (r, first, n)
    }
}

/// Shared state of one transfer.
struct Shared<'a> {
    regions: &'a [MemRegion],
    layout: &'a dyn FileLayout,
    work: Work,
    cursor: AtomicU64,
    first_error: FirstError<MultifdError>,
    page_size: u64,
    direct: bool,
    dir: Direction,
    /// Which chunks a save writes, its pace per channel, its stop flag,
    /// whether its threads yield to the guest's ([`FilePass`]).
    pages: PageSet<'a>,
    rate: Option<u64>,
    stop: &'a AtomicBool,
    background: bool,
    /// Never-populated memory, taken for zeros unread: a stopped save's, or
    /// a live save's first pass's (None: read every page).
    unpopulated: Option<Unpopulated>,
}

impl Shared<'_> {
    fn fail(&self, e: MultifdError) {
        self.first_error.fail(e);
    }

    fn stopped(&self) -> bool {
        self.first_error.stopped()
    }
}

#[derive(Default)]
struct ChannelStats {
    bytes: u64,
    present: u64,
    zero: u64,
}

fn check_args(
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
) -> Result<u64, MultifdError> {
    if opts.channels == 0 || opts.channels > MAX_FILE_CHANNELS {
        return Err(MultifdError::InvalidArgument(format!(
            "{} channels: the channel count must be 1 to {MAX_FILE_CHANNELS}",
            opts.channels
        )));
    }
    let ps = layout.page_size();
    if !ps.is_power_of_two() || !(512..=1 << 30).contains(&ps) {
        return Err(MultifdError::Layout(format!(
            "page size {ps}: must be a power of two from 512 to 1 GiB"
        )));
    }
    let cs = layout.chunk_size();
    if cs == 0 || !cs.is_multiple_of(ps) {
        return Err(MultifdError::Layout(format!(
            "chunk size {cs} is not a non-zero multiple of the page size {ps}"
        )));
    }
    for (i, r) in regions.iter().enumerate() {
        r.check(i, ps)?;
    }
    Ok(ps)
}

/// Opens `path` for writing (`write`) or reading and decides, by `mode`,
/// whether `O_DIRECT` is used: the one place that makes the auto/on/off
/// decision. Returns the file and whether it is `O_DIRECT`. `On` on a
/// filesystem that refuses `O_DIRECT` is
/// [`MultifdError::DirectIoUnsupported`]; `Auto` falls back to buffered I/O
/// with a warning.
pub fn open_with_direct_io(
    path: &Path,
    mode: DirectIo,
    write: bool,
) -> Result<(File, bool), MultifdError> {
    let what = if write { "writing" } else { "reading" };
    let plain = |e| MultifdError::io(format!("opening {} for {what}", path.display()), e);
    if mode == DirectIo::Off {
        return Ok((sys::open(path, write, false).map_err(plain)?, false));
    }
    match sys::open(path, write, true) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let fs_type = sys::fs_type_name(path);
            if mode == DirectIo::On {
                return Err(MultifdError::DirectIoUnsupported {
                    path: path.to_path_buf(),
                    fs_type,
                });
            }
            log::warn!(
                "{}: the filesystem ({fs_type}) does not support O_DIRECT; using buffered I/O",
                path.display()
            );
            Ok((sys::open(path, write, false).map_err(plain)?, false))
        }
        Err(e) => Err(plain(e)),
    }
}

fn transfer(
    path: &Path,
    regions: &[MemRegion],
    layout: &dyn FileLayout,
    opts: &FileChannelOptions,
    dir: Direction,
    pass: &FilePass<'_>,
) -> Result<TransferStats, MultifdError> {
    let start = Instant::now();
    let page_size = check_args(regions, layout, opts)?;
    let write = matches!(dir, Direction::Save { .. });
    let (probe, direct) = open_with_direct_io(path, opts.direct_io, write)?;
    let mut files = vec![probe];
    for c in 1..opts.channels {
        let f = sys::open(path, write, direct).map_err(|e| {
            MultifdError::io(
                format!(
                    "channel {c}: opening {} for {}",
                    path.display(),
                    if write { "writing" } else { "reading" }
                ),
                e,
            )
        })?;
        files.push(f);
    }
    let per_unit = (UNIT_BYTES / layout.chunk_size()).max(1);
    let shared = Shared {
        regions,
        layout,
        work: Work::new(layout, regions.len(), per_unit)?,
        cursor: AtomicU64::new(0),
        first_error: FirstError::new(),
        page_size,
        direct,
        dir,
        pages: pass.pages,
        rate: per_channel(pass.max_bytes_per_s, opts.channels),
        stop: pass.stop,
        background: pass.background,
        unpopulated: match (dir, pass.pages) {
            // Stopped: memory that is not populated now stays so.
            (Direction::Save { copy: false }, _) => Unpopulated::find(regions, page_size),
            // A live save's first pass: its dirty log, on before the pass,
            // has a later pass write any page the guest populates after it
            // was skipped.
            (Direction::Save { copy: true }, PageSet::AllNonZero) => {
                Unpopulated::find(regions, page_size)
            }
            _ => None,
        },
    };
    let results: Vec<ChannelStats> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(c, f)| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("multifd-{}-{c}", dir.verb()))
                    .spawn_scoped(s, move || channel(shared, c, f))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    shared.fail(MultifdError::Aborted("a channel thread panicked".into()));
                    ChannelStats::default()
                }),
                Err(e) => {
                    shared.fail(MultifdError::io("starting a channel thread", e));
                    ChannelStats::default()
                }
            })
            .collect()
    });
    if let Some(e) = shared.first_error.into_inner() {
        return Err(e);
    }
    let mut stats = TransferStats {
        elapsed: start.elapsed(),
        direct_io: direct,
        channels: opts.channels,
        ..TransferStats::default()
    };
    for r in &results {
        stats.bytes += r.bytes;
        stats.present_pages += r.present;
        stats.zero_pages += r.zero;
    }
    log::info!(
        "multifd: {} {} bytes ({} present pages, {} zero pages) {} {} in {:.1} ms ({:.0} MB/s, {} channels, direct I/O {})",
        if write { "saved" } else { "loaded" },
        stats.bytes,
        stats.present_pages,
        stats.zero_pages,
        if write { "to" } else { "from" },
        path.display(),
        stats.elapsed.as_secs_f64() * 1e3,
        stats.mb_per_s(),
        stats.channels,
        if direct { "on" } else { "off" },
    );
    Ok(stats)
}

/// One channel: takes units from the cursor until none is left or another
/// channel failed.
fn channel(sh: &Shared<'_>, c: usize, file: &File) -> ChannelStats {
    if sh.background {
        // The threads it starts inherit this.
        crate::sys::background_thread();
    }
    let ch = Chan {
        sh,
        c,
        file,
        pool: Mutex::new(Vec::new()),
    };
    let per_thread = match sh.dir {
        // Saving: the prep thread scans and checksums the next unit while
        // the writers write the units before it. A live pass keeps one
        // write in flight: each more would hold another copy of a unit.
        Direction::Save { copy } => {
            let depth = if copy { 1 } else { SAVE_QUEUE_DEPTH };
            let rate = per_channel(sh.rate, depth);
            pipeline(
                sh,
                c,
                depth,
                |r, first, n| ch.prep_unit(r, first, n, copy),
                || (ChannelStats::default(), Pace::new(rate)),
                |(st, pace), p| {
                    let before = st.bytes;
                    ch.write_prepped(p, st)?;
                    pace.wrote(st.bytes - before, sh.stop);
                    Ok(())
                },
            )
            .into_iter()
            .map(|(st, _)| st)
            .collect()
        }
        // Loading: the prep thread finds the present runs and faults their
        // memory in for the next unit while the readers read and check the
        // units before it.
        Direction::Load { populate } => pipeline(
            sh,
            c,
            LOAD_QUEUE_DEPTH,
            |r, first, n| ch.prep_load(r, first, n, populate),
            ChannelStats::default,
            |st, p| ch.read_prepped(p, st),
        ),
    };
    per_thread
        .into_iter()
        .fold(ChannelStats::default(), |a, b| ChannelStats {
            bytes: a.bytes + b.bytes,
            present: a.present + b.present,
            zero: a.zero + b.zero,
        })
}

/// Runs one channel as a prep thread and `depth` I/O threads, so that the
/// disk has up to `depth` transfers of the channel in flight while the
/// channel computes: `prep` takes units from the shared cursor and queues
/// its results (at most `depth` ahead); each I/O thread, with its own state
/// from `init`, takes the next result and runs `io` on it (one of them is
/// the calling thread). Returns each I/O thread's state. The first error
/// from any side stops every channel.
fn pipeline<T: Send, S: Send>(
    sh: &Shared<'_>,
    c: usize,
    depth: usize,
    prep: impl Fn(usize, u64, u64) -> Result<T, MultifdError> + Sync,
    init: impl Fn() -> S + Sync,
    io: impl Fn(&mut S, T) -> Result<(), MultifdError> + Sync,
) -> Vec<S> {
    let depth = depth.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<T>(depth);
    let rx = Mutex::new(Some(rx));
    // Takes the next prepped unit; None once the prep thread is done.
    let take = || rx.lock().ok()?.as_ref()?.recv().ok();
    let io_loop = || {
        let mut state = init();
        while let Some(p) = take() {
            if sh.stopped() {
                break;
            }
            if let Err(e) = io(&mut state, p) {
                sh.fail(e);
                break;
            }
        }
        state
    };
    std::thread::scope(|s| {
        let prep_thread = std::thread::Builder::new()
            .name(format!("multifd-prep-{c}"))
            .spawn_scoped(s, || prep_loop(sh, c, &prep, tx));
        if let Err(e) = prep_thread {
            sh.fail(MultifdError::io("starting a channel thread", e));
            return Vec::new();
        }
        let states = io_threads(s, sh, c, depth, &io_loop);
        // The I/O threads are gone: a prep thread waiting to queue a unit
        // (after an error) must not wait for them.
        if let Ok(mut rx) = rx.lock() {
            rx.take();
        }
        states
    })
}

/// The prep side of [`pipeline`]: prepares units from the shared cursor
/// and queues them until none is left, the I/O side is gone, or a channel
/// failed.
fn prep_loop<T>(
    sh: &Shared<'_>,
    c: usize,
    prep: &impl Fn(usize, u64, u64) -> Result<T, MultifdError>,
    tx: std::sync::mpsc::SyncSender<T>,
) {
    while let Some((r, first, n)) = next_unit(sh, c) {
        match prep(r, first, n) {
            Ok(p) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Err(e) => return sh.fail(e),
        }
    }
}

/// The next unit from the shared cursor as (region, first chunk, chunk
/// count); None when all are taken, a channel failed, or the pass is stopped.
fn next_unit(sh: &Shared<'_>, c: usize) -> Option<(usize, u64, u64)> {
    if sh.stopped() {
        return None;
    }
    if sh.stop.load(Ordering::Acquire) {
        sh.fail(MultifdError::Aborted(format!("channel {c}: stopped")));
        return None;
    }
    let idx = sh.cursor.fetch_add(1, Ordering::Relaxed);
    (idx < sh.work.total()).then(|| sh.work.unit(sh.layout, idx))
}

/// Runs `io_loop` on `depth` threads, the calling one and `depth - 1` new
/// ones in `scope`, and returns what each returned.
fn io_threads<'scope, S: Send + 'scope, F: Fn() -> S + Sync>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    sh: &Shared<'_>,
    c: usize,
    depth: usize,
    io_loop: &'scope F,
) -> Vec<S> {
    let mut helpers = Vec::new();
    for k in 1..depth {
        let spawned = std::thread::Builder::new()
            .name(format!("multifd-io-{c}-{k}"))
            .spawn_scoped(scope, io_loop);
        match spawned {
            Ok(h) => helpers.push(h),
            Err(e) => sh.fail(MultifdError::io("starting a channel thread", e)),
        }
    }
    let mut states = vec![io_loop()];
    for h in helpers {
        match h.join() {
            Ok(st) => states.push(st),
            Err(_) => sh.fail(MultifdError::Aborted("a channel thread panicked".into())),
        }
    }
    states
}

/// A unit whose present runs are known (and their memory faulted in), ready to be read.
struct LoadPrepped {
    r: usize,
    first: u64,
    n: u64,
    runs: Vec<Run>,
    present: u64,
    zero: u64,
}

/// A unit scanned and checksummed, ready to be written.
struct Prepped {
    r: usize,
    runs: Vec<Run>,
    pending: Vec<Pending>,
    present: u64,
    zero: u64,
    /// A live pass's copy of the unit, which the runs are written from.
    copy: Option<UnitCopy>,
}

/// One page-aligned block of a unit copy (O_DIRECT needs aligned buffers).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; 4096]);

/// A live pass's copy of a unit's selected chunks, made before the scan so
/// that the scan, the CRCs and the writes see the same bytes and nothing
/// holds a reference to memory the guest may be writing.
struct UnitCopy {
    blocks: Vec<Block>,
    /// The region page at the start of the copy.
    first_page: u64,
}

impl UnitCopy {
    /// Where page `page` of the region is in the copy.
    fn ptr(&self, page: u64, page_size: u64) -> *const u8 {
        let off = ((page - self.first_page) * page_size) as usize;
        // SAFETY: callers ask only for pages of the copied unit, which lie
        // inside `blocks` (sized for the whole unit).
        unsafe { self.blocks.as_ptr().cast::<u8>().add(off) }
    }

    /// [`UnitCopy::ptr`] for filling the copy.
    fn ptr_mut(&mut self, page: u64, page_size: u64) -> *mut u8 {
        let off = ((page - self.first_page) * page_size) as usize;
        // SAFETY: as for `ptr`.
        unsafe { self.blocks.as_mut_ptr().cast::<u8>().add(off) }
    }
}

/// A chunk whose pages are being written: its bitmap and CRC.
struct Pending {
    chunk: u64,
    words: Vec<u64>,
    crc: u32,
}

/// A run of pages of one region: `start..end` (page indices).
type Run = PageRun;

struct Chan<'a, 'b> {
    sh: &'a Shared<'b>,
    c: usize,
    file: &'a File,
    /// Unit-copy buffers the writing thread handed back, for reuse.
    pool: Mutex<Vec<Vec<Block>>>,
}

impl Chan<'_, '_> {
    /// Chunk `chunk` of `r` as (first page, page count), checked against the region.
    fn chunk_pages(&self, r: usize, chunk: u64) -> Result<(u64, u64), MultifdError> {
        let ps = self.sh.page_size;
        let (off, len) = self.sh.layout.chunk_range(r, chunk);
        let region = &self.sh.regions[r];
        if off % ps != 0
            || len % ps != 0
            || len == 0
            || off.checked_add(len).is_none_or(|end| end > region.len())
        {
            return Err(MultifdError::Layout(format!(
                "channel {}: region {r} chunk {chunk}: range {off:#x}+{len:#x} is not page aligned or not inside the region ({:#x} bytes)",
                self.c,
                region.len()
            )));
        }
        Ok((off / ps, len / ps))
    }

    /// The file offset of `run`, checked for contiguity and (direct I/O) alignment.
    fn run_offset(&self, r: usize, run: Run) -> Result<u64, MultifdError> {
        let ps = self.sh.page_size;
        let layout = self.sh.layout;
        let off = layout.page_file_offset(r, run.start);
        let n = run.end - run.start;
        let last = layout.page_file_offset(r, run.end - 1);
        if off.checked_add((n - 1) * ps) != Some(last) {
            return Err(MultifdError::Layout(format!(
                "channel {}: region {r}: pages {}..{} are not contiguous in the file (page {} at {off:#x}, page {} at {last:#x})",
                self.c,
                run.start,
                run.end,
                run.start,
                run.end - 1
            )));
        }
        if self.sh.direct && !off.is_multiple_of(DIRECT_ALIGN) {
            return Err(MultifdError::Layout(format!(
                "channel {}: region {r}: page {} is at file offset {off:#x}, not aligned to {DIRECT_ALIGN} bytes as O_DIRECT needs",
                self.c, run.start
            )));
        }
        Ok(off)
    }

    fn page_ptr(&self, r: usize, page: u64) -> *mut u8 {
        let region = &self.sh.regions[r];
        // SAFETY: page < region pages (checked by chunk_pages), so the offset
        // is inside the region, which fits in the address space (MemRegion::check).
        unsafe { region.as_ptr().add((page * self.sh.page_size) as usize) }
    }

    fn write_run(
        &self,
        r: usize,
        run: Run,
        copy: Option<&UnitCopy>,
        st: &mut ChannelStats,
    ) -> Result<(), MultifdError> {
        let off = self.run_offset(r, run)?;
        let len = (run.end - run.start) * self.sh.page_size;
        let ptr = match copy {
            Some(c) => c.ptr(run.start, self.sh.page_size),
            None => self.page_ptr(r, run.start),
        };
        // SAFETY: the run lies inside region r (its pages come from checked
        // chunks), which the MemRegion contract keeps readable, or inside
        // the unit's copy.
        unsafe { sys::pwrite_all(self.file, ptr, len as usize, off) }.map_err(|e| {
            MultifdError::io(
                format!(
                    "channel {}: writing region {r} pages {}..{} ({len} bytes) at file offset {off:#x}",
                    self.c, run.start, run.end
                ),
                e,
            )
        })?;
        st.bytes += len;
        Ok(())
    }

    /// The CPU half of saving a unit: finds the present pages and computes
    /// each chunk's bitmap and CRC, and the runs of pages to write.
    fn prep_unit(&self, r: usize, first: u64, n: u64, copy: bool) -> Result<Prepped, MultifdError> {
        let ps = self.sh.page_size;
        let mut out = Prepped {
            r,
            runs: Vec::new(),
            pending: Vec::with_capacity(n as usize),
            present: 0,
            zero: 0,
            copy: None,
        };
        // Before any copy: copying a never-populated page would populate it.
        let unpopulated = self.unpopulated_pages(r, first, n)?;
        if copy {
            out.copy = Some(self.copy_unit(r, first, n, &unpopulated)?);
        }
        let src = |page: u64| match &out.copy {
            Some(c) => c.ptr(page, ps),
            None => self.page_ptr(r, page).cast_const(),
        };
        let (unit_first_page, _) = self.chunk_pages(r, first)?;
        for chunk in first..first + n {
            let (p0, np) = self.chunk_pages(r, chunk)?;
            if !self.selected(r, p0, np) {
                continue;
            }
            let mut words = vec![0u64; np.div_ceil(64) as usize];
            let mut crc = 0u32;
            // CRC32C over whole runs of non-zero pages: one call per run
            // rather than per page (the hardware path's setup and combine
            // steps cost more than the 4 KiB it would process).
            let mut crc_run: Option<u64> = None;
            // Zero bytes not yet in the CRC: a run of zero pages goes in at
            // once, without reading zeros ([`crc32c_append_zeros`]).
            let mut zero_run = 0u64;
            for i in 0..np {
                let page = p0 + i;
                // Never populated: zeros, and left unread (reading would
                // fault the page in).
                let never_populated = unpopulated
                    .get((page - unit_first_page) as usize)
                    .copied()
                    .unwrap_or(false);
                let zero = never_populated
                    // SAFETY: the page is inside region r (checked chunk),
                    // which the MemRegion contract keeps readable and
                    // unchanged while a stopped save runs, or inside the
                    // unit's copy (live pass).
                    || is_zero(unsafe { std::slice::from_raw_parts(src(page), ps as usize) });
                if zero {
                    if let Some(from) = crc_run.take() {
                        crc = self.crc_pages(src(from), crc, from, page);
                    }
                    zero_run += ps;
                    out.zero += u64::from(self.page_selected(r, page));
                } else {
                    if zero_run > 0 {
                        crc = crc32c_append_zeros(crc, std::mem::take(&mut zero_run));
                    }
                    crc_run.get_or_insert(page);
                    words[(i / 64) as usize] |= 1 << (i % 64);
                    // A dirty pass writes only the dirty pages; the chunk's
                    // other pages are in the file as they are in memory.
                    // From a copy, it also writes the pages between dirty
                    // ones close together in the chunk (the copy holds the
                    // bytes the CRC covers): one write instead of many.
                    if self.page_selected(r, page) {
                        out.present += 1;
                        match (&out.copy, self.sh.pages) {
                            (Some(_), PageSet::Dirty(_)) => {
                                push_page_joining(&mut out.runs, page, JOIN_GAP_PAGES, p0)
                            }
                            _ => push_page(&mut out.runs, page),
                        }
                    }
                }
            }
            if let Some(from) = crc_run.take() {
                crc = self.crc_pages(src(from), crc, from, p0 + np);
            }
            crc = crc32c_append_zeros(crc, zero_run);
            out.pending.push(Pending { chunk, words, crc });
        }
        Ok(out)
    }

    /// Per page of the unit (chunks `first..first + n` of region `r`),
    /// whether it was never populated and so reads as zeros; empty when the
    /// pass scans every page.
    fn unpopulated_pages(&self, r: usize, first: u64, n: u64) -> Result<Vec<bool>, MultifdError> {
        let mut out = Vec::new();
        let Some(u) = self.sh.unpopulated.as_ref() else {
            return Ok(out);
        };
        let (start, _) = self.chunk_pages(r, first)?;
        let (last, last_pages) = self.chunk_pages(r, first + n - 1)?;
        let ps = self.sh.page_size as usize;
        let len = (last + last_pages - start) as usize * ps;
        let addr = self.page_ptr(r, start) as usize;
        u.pages(r, addr, len, ps, &mut out);
        Ok(out)
    }

    /// The I/O half: writes the runs, then records each chunk as saved.
    fn write_prepped(&self, p: Prepped, st: &mut ChannelStats) -> Result<(), MultifdError> {
        let r = p.r;
        for run in &p.runs {
            self.write_run(r, *run, p.copy.as_ref(), st)?;
        }
        if let (Some(c), Ok(mut pool)) = (p.copy, self.pool.lock()) {
            pool.push(c.blocks);
        }
        st.present += p.present;
        st.zero += p.zero;
        for pend in p.pending {
            self.sh
                .layout
                .chunk_saved(r, pend.chunk, &pend.words, pend.crc)
                .map_err(|source| MultifdError::Caller {
                    context: format!(
                        "channel {}: region {r} chunk {}: recording the saved chunk",
                        self.c, pend.chunk
                    ),
                    source,
                })?;
        }
        Ok(())
    }

    /// Extends `crc` over pages `[from, to)`, which start at `ptr`, in one call.
    fn crc_pages(&self, ptr: *const u8, crc: u32, from: u64, to: u64) -> u32 {
        let len = ((to - from) * self.sh.page_size) as usize;
        // SAFETY: pages [from, to) are pages of the chunk being saved, in
        // region r (readable, not written meanwhile: a stopped save) or in
        // the unit's copy (a live pass); both are contiguous.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        crc32c::crc32c_append(crc, bytes)
    }

    /// Whether the pass writes page `page` of region `r` (when non-zero).
    fn page_selected(&self, r: usize, page: u64) -> bool {
        match self.sh.pages {
            PageSet::AllNonZero => true,
            PageSet::Dirty(maps) => is_dirty(maps[r], page),
        }
    }

    /// Whether the pass records the chunk of `np` pages from `p0`.
    fn selected(&self, r: usize, p0: u64, np: u64) -> bool {
        match self.sh.pages {
            PageSet::AllNonZero => true,
            PageSet::Dirty(maps) => any_dirty(maps[r], p0, np),
        }
    }

    /// Copies the selected chunks of a unit of region `r` into a buffer
    /// (one from the pool when there is one).
    /// Pages flagged in `unpopulated` (per page from the unit's first) are
    /// left out: the caller takes them for zeros without reading the copy.
    fn copy_unit(
        &self,
        r: usize,
        first: u64,
        n: u64,
        unpopulated: &[bool],
    ) -> Result<UnitCopy, MultifdError> {
        let ps = self.sh.page_size;
        let (start, _) = self.chunk_pages(r, first)?;
        let (p0, np) = self.chunk_pages(r, first + n - 1)?;
        let bytes = (p0 + np - start) * ps;
        let mut blocks = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        blocks.resize(bytes.div_ceil(4096) as usize, Block([0; 4096]));
        let mut copy = UnitCopy {
            blocks,
            first_page: start,
        };
        let skipped = |page: u64| unpopulated.get((page - start) as usize) == Some(&true);
        for chunk in first..first + n {
            let (p0, np) = self.chunk_pages(r, chunk)?;
            if !self.selected(r, p0, np) {
                continue;
            }
            // Runs of pages that are not skipped, one copy each.
            let mut from = p0;
            while from < p0 + np {
                if skipped(from) {
                    from += 1;
                    continue;
                }
                let mut to = from + 1;
                while to < p0 + np && !skipped(to) {
                    to += 1;
                }
                // SAFETY: pages [from, to) lie inside the chunk, inside
                // region r (checked), which the MemRegion contract keeps
                // mapped; the guest may write them meanwhile: a raw copy then
                // mixes old and new bytes (any byte is a valid u8) and the
                // caller's next pass rewrites the chunk. The destination lies
                // inside the copy, sized for the unit, and is not borrowed
                // elsewhere.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.page_ptr(r, from),
                        copy.ptr_mut(from, ps),
                        ((to - from) * ps) as usize,
                    )
                };
                from = to;
            }
        }
        Ok(copy)
    }

    fn read_run(
        &self,
        r: usize,
        run: Run,
        populate: bool,
        st: &mut ChannelStats,
    ) -> Result<(), MultifdError> {
        let off = self.run_offset(r, run)?;
        let len = ((run.end - run.start) * self.sh.page_size) as usize;
        let ptr = self.page_ptr(r, run.start);
        if populate {
            sys::populate_write(ptr, len);
        }
        // SAFETY: the run lies inside region r, which the MemRegion contract
        // keeps writable and unused by others during a load; channels work on
        // disjoint chunks.
        unsafe { sys::pread_all(self.file, ptr, len, off) }.map_err(|e| {
            MultifdError::io(
                format!(
                    "channel {}: reading region {r} pages {}..{} ({len} bytes) at file offset {off:#x}",
                    self.c, run.start, run.end
                ),
                e,
            )
        })?;
        st.bytes += len as u64;
        Ok(())
    }

    /// The first half of loading a unit: finds the runs of present pages and
    /// (when asked) faults their target memory in ahead of the reads.
    fn prep_load(
        &self,
        r: usize,
        first: u64,
        n: u64,
        populate: bool,
    ) -> Result<LoadPrepped, MultifdError> {
        let layout = self.sh.layout;
        let mut out = LoadPrepped {
            r,
            first,
            n,
            runs: Vec::new(),
            present: 0,
            zero: 0,
        };
        for chunk in first..first + n {
            let (p0, np) = self.chunk_pages(r, chunk)?;
            for page in p0..p0 + np {
                if layout.page_present(r, page) {
                    out.present += 1;
                    push_page(&mut out.runs, page);
                } else {
                    out.zero += 1;
                }
            }
        }
        if populate {
            for run in &out.runs {
                let len = ((run.end - run.start) * self.sh.page_size) as usize;
                sys::populate_write(self.page_ptr(r, run.start), len);
            }
        }
        Ok(out)
    }

    /// The second half: reads the runs straight into guest memory, then
    /// checks every chunk of the unit.
    fn read_prepped(&self, p: LoadPrepped, st: &mut ChannelStats) -> Result<(), MultifdError> {
        let r = p.r;
        for run in &p.runs {
            self.read_run(r, *run, false, st)?;
        }
        st.present += p.present;
        st.zero += p.zero;
        for chunk in p.first..p.first + p.n {
            let (p0, np) = self.chunk_pages(r, chunk)?;
            let ptr = self.page_ptr(r, p0);
            // SAFETY: the chunk is inside region r (checked) and this channel
            // is the only one touching it.
            let data =
                unsafe { std::slice::from_raw_parts(ptr, (np * self.sh.page_size) as usize) };
            self.sh
                .layout
                .chunk_loaded(r, chunk, data)
                .map_err(|source| MultifdError::ChunkRejected {
                    context: format!(
                        "channel {}: region {r} chunk {chunk} (region bytes {:#x}..{:#x})",
                        self.c,
                        p0 * self.sh.page_size,
                        (p0 + np) * self.sh.page_size
                    ),
                    source,
                })?;
        }
        Ok(())
    }
}
