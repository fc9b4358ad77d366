//! `cryo bench save-restore`: save and restore throughput against the
//! machine's own limits, measured in the same run.
//!
//! One run: the raw O_DIRECT sequential write and read bandwidth of the
//! target directory (same size, same parallelism as each channel count),
//! memcpy bandwidth, then for each channel count a fixed-ram save with and
//! without O_DIRECT, an eager restore and a lazy restore of a VM whose RAM
//! holds incompressible data. Every throughput is also given as a ratio to
//! the raw bandwidth; page-cache growth and the VMM's memory beyond guest RAM
//! are sampled during each step.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{BootSource, MemoryBacking, MicroVm, RestoreOptions, SerialOutput, VmConfig};
use serde::Serialize;

use crate::bench_disk::{self, raw_pass, RawPlan, Threads};
use crate::error::CliError;
use crate::image::{self, fixed, RestoreMode};

/// The guest kernel of a bench: `--kernel`, or the test kernel built into
/// this binary, written to a temporary file in the bench directory (so that
/// an installed `cryo` needs no build tree) and removed on drop.
pub struct BenchKernel {
    path: PathBuf,
    temporary: bool,
}

impl BenchKernel {
    /// `given`, or the built-in test kernel written under `dir`.
    pub fn resolve(given: Option<&Path>, dir: &Path) -> Result<BenchKernel, CliError> {
        if let Some(p) = given {
            return Ok(BenchKernel {
                path: p.to_path_buf(),
                temporary: false,
            });
        }
        let path = dir.join(format!(".cryo-bench-kernel-{}.elf", std::process::id()));
        std::fs::write(&path, cryo_test_kernel::KERNEL_IMAGE)
            .map_err(|e| CliError::bad_input(format!("cannot write in {}: {e}", dir.display())))?;
        Ok(BenchKernel {
            path,
            temporary: true,
        })
    }

    /// The kernel file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BenchKernel {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Arguments of `cryo bench save-restore`.
#[derive(clap::Args, Debug)]
pub struct SaveRestoreArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 4096)]
    pub mem_mib: u64,
    /// MiB of guest RAM filled with incompressible data.
    #[arg(long, default_value_t = 3072)]
    pub fill_mib: u64,
    /// Channel counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub channels: Vec<usize>,
    /// Where the files go, the output form and the kernel.
    #[command(flatten)]
    pub common: BenchCommon,
}

/// Options every `cryo bench` verb takes.
#[derive(clap::Args, Debug)]
pub struct BenchCommon {
    /// Directory for the bench's files: images, disks and consoles (put it
    /// on the disk to measure).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Kernel to boot (default: the cryo test kernel built into this binary).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
}

impl BenchCommon {
    /// Creates `--dir` and resolves the kernel to boot.
    pub fn prepare(&self) -> Result<BenchKernel, CliError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| CliError::bad_input(format!("cannot use {}: {e}", self.dir.display())))?;
        BenchKernel::resolve(self.kernel.as_deref(), &self.dir)
    }

    /// `--dir/STEM-PID`: a file name of this run.
    pub fn file(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}-{}", std::process::id()))
    }

    /// Creates [`BenchCommon::file`]`(stem)`, e.g. for a guest's console.
    pub fn create(&self, stem: &str) -> Result<(PathBuf, File), CliError> {
        let path = self.file(stem);
        let file = File::create(&path).map_err(|e| {
            CliError::bad_input(format!("cannot write in {}: {e}", self.dir.display()))
        })?;
        Ok((path, file))
    }
}

/// `cryo bench` verbs.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Save and restore throughput of a filled guest against raw disk and memory bandwidth.
    SaveRestore(SaveRestoreArgs),
    /// A live snapshot of a guest writing hard, against a stopped save of the same VM.
    Snapshot(crate::bench_snapshot::SnapshotArgs),
    /// Live migration over loopback TCP of a guest writing at several rates, against a stopped one.
    Migrate(crate::bench_migrate::MigrateArgs),
    /// What tracking the devices' writes into guest memory costs: host-side
    /// writes and a guest reading its disk, dirty logging off and on.
    DeviceWrites(crate::bench_devwrites::DeviceWritesArgs),
}

/// Runs a bench verb.
pub fn bench(cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::SaveRestore(a) => save_restore(a),
        BenchCommand::Snapshot(a) => crate::bench_snapshot::run(a),
        BenchCommand::Migrate(a) => crate::bench_migrate::run(a),
        BenchCommand::DeviceWrites(a) => crate::bench_devwrites::run(a),
    }
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

const MIB: u64 = 1 << 20;

/// A page-aligned buffer (for O_DIRECT).
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Result<Self, CliError> {
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CliError::failure("cannot map a benchmark buffer"));
        }
        Ok(AlignedBuf {
            ptr: ptr.cast(),
            len,
        })
    }
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by self, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub(crate) fn as_ref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// `len` bytes from `offset` (clamped to the mapping), for one of
    /// several threads filling disjoint parts at once.
    ///
    /// # Safety
    /// No other reference to these bytes may exist while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        let offset = offset.min(self.len);
        let len = len.min(self.len - offset);
        // SAFETY: [offset, offset + len) lies inside the mapping (clamped
        // above); the caller guarantees no other reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    /// Asks for transparent huge pages, as a restore does for guest RAM.
    /// Best effort.
    pub(crate) fn advise_huge_pages(&self) {
        // SAFETY: advice on the mapping this value owns; MADV_HUGEPAGE
        // changes no contents.
        unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_HUGEPAGE) };
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the buffer is plain memory owned by the value; shared use is
// read-only (`as_ref`) or, through `part_mut`, to parts its callers keep
// apart.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

fn fill_random(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_exact_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
}

/// memcpy bandwidth in MB/s (one thread, 256 MiB copied four times).
fn memcpy_bandwidth() -> Result<f64, CliError> {
    let len = 256 << 20;
    let mut a = AlignedBuf::new(len)?;
    let mut b = AlignedBuf::new(len)?;
    fill_random(a.as_mut(), 7);
    b.as_mut().fill(1);
    let start = Instant::now();
    for _ in 0..4 {
        b.as_mut().copy_from_slice(a.as_ref());
    }
    Ok((4 * len) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

fn meminfo_kib(key: &str) -> u64 {
    let mut s = String::new();
    if File::open("/proc/meminfo")
        .and_then(|mut f| f.read_to_string(&mut s))
        .is_err()
    {
        return 0;
    }
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident KiB of this process outside the given guest-memory ranges:
/// the resident pages (`mincore`) of every other mapping in
/// `/proc/self/maps`. A file mapping counts its pages in the page cache,
/// mapped or not, so the figure errs high, never low. (Reading
/// `/proc/self/smaps` instead walks the page tables of guest memory too,
/// with per-page accounting; sampled during a step, it slowed a 1-channel
/// eager restore threefold.)
fn rss_outside_kib(guest: &[(usize, usize)]) -> u64 {
    let mut s = String::new();
    if File::open("/proc/self/maps")
        .and_then(|mut f| f.read_to_string(&mut s))
        .is_err()
    {
        return 0;
    }
    let others: Vec<(usize, usize)> = s
        .lines()
        .filter(|l| !l.ends_with("[vsyscall]"))
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?.0.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|(a, b)| !guest.iter().any(|(s, e)| a < e && b > s))
        .collect();
    resident_kib(&others)
}

/// The host page size in KiB.
fn page_kib() -> u64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64 / 1024
}

/// Resident KiB of the given (page-aligned) ranges, by `mincore`; a range
/// no longer mapped counts as nothing.
fn resident_kib(ranges: &[(usize, usize)]) -> u64 {
    let page = (page_kib() * 1024) as usize;
    let mut vec = vec![0u8; 1 << 16];
    let mut pages = 0u64;
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let len = (end - at).min(vec.len() * page);
            // SAFETY: mincore only writes one byte per page of the range
            // into `vec`, which has room for len / page bytes; it reads no
            // memory, and an unmapped range is an error, not a fault.
            let rc = unsafe { libc::mincore(at as *mut libc::c_void, len, vec.as_mut_ptr()) };
            if rc == 0 {
                pages += vec[..len.div_ceil(page)]
                    .iter()
                    .filter(|b| *b & 1 != 0)
                    .count() as u64;
            }
            at += len;
        }
    }
    pages * page_kib()
}

/// Samples page-cache growth and VMM memory beyond guest RAM while a step runs.
struct Sampler {
    stop: Arc<AtomicBool>,
    cache_peak: Arc<AtomicU64>,
    rss_peak: Arc<AtomicU64>,
    cache_start: u64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(guest: Arc<Mutex<Vec<(usize, usize)>>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let cache_start = meminfo_kib("Cached:");
        let cache_peak = Arc::new(AtomicU64::new(cache_start));
        let rss_peak = Arc::new(AtomicU64::new(0));
        let (s, c, r) = (
            Arc::clone(&stop),
            Arc::clone(&cache_peak),
            Arc::clone(&rss_peak),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                c.fetch_max(meminfo_kib("Cached:"), Ordering::Relaxed);
                let ranges = guest.lock().map(|g| g.clone()).unwrap_or_default();
                r.fetch_max(rss_outside_kib(&ranges), Ordering::Relaxed);
                // mincore walks the guest's page tables under the mmap
                // lock: sample sparingly so that it does not slow the step.
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Sampler {
            stop,
            cache_peak,
            rss_peak,
            cache_start,
            thread: Some(thread),
        }
    }

    /// (page-cache growth MiB, peak VMM memory outside guest RAM MiB)
    fn finish(mut self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let growth = self
            .cache_peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.cache_start);
        (
            growth as f64 / 1024.0,
            self.rss_peak.load(Ordering::Relaxed) as f64 / 1024.0,
        )
    }
}

fn ranges_of(mem: &microvm::GuestMemory) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize))
        .collect()
}

/// Drops `path`'s clean pages from the page cache.
pub(crate) fn drop_file_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: fadvise on a file descriptor we own; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

#[derive(Serialize, Default, Clone)]
struct StepResult {
    seconds: f64,
    mb_per_s: f64,
    ratio_to_raw: f64,
    /// Against the raw read with one read in flight per channel.
    ratio_to_raw_one_per_channel: f64,
    /// Against the raw read into fresh memory (a restore's memory is new).
    ratio_to_raw_fresh: f64,
    page_cache_growth_mib: f64,
    vmm_peak_mib_beyond_guest: f64,
}

/// The raw reference of one channel count (see `bench_disk`).
#[derive(Serialize, Default, Clone)]
struct RawResult {
    /// Writing the data, not durable.
    write_s: f64,
    /// fdatasync of the file and fsync of the directory after it.
    sync_s: f64,
    /// Reading the data back.
    read_s: f64,
    write_mb_s: f64,
    durable_mb_s: f64,
    read_mb_s: f64,
    /// The read into fresh memory, as a restore reads (see `bench_disk`).
    read_fresh_mb_s: f64,
    /// The write with twice the writes in flight (twice the threads):
    /// whether the save's queue depth is the limit.
    write_double_queue_mb_s: f64,
    /// The read with twice the reads in flight.
    read_double_queue_mb_s: f64,
    /// The write with one write in flight per channel (what a channel
    /// without a queue would face; equal to `write_mb_s` when cryo's queue
    /// depth is 1).
    write_one_per_channel_mb_s: f64,
    /// The read with one read in flight per channel.
    read_one_per_channel_mb_s: f64,
}

/// A save, phase by phase as the save timed them, and end to end.
#[derive(Serialize, Default, Clone)]
struct SaveResult {
    data_s: f64,
    metadata_s: f64,
    sync_s: f64,
    publish_s: f64,
    whole_s: f64,
    /// Data phase against the raw non-durable write at cryo's queue depth.
    data_ratio: f64,
    /// Data phase against the raw write with one write in flight per channel.
    data_ratio_one_per_channel: f64,
    /// Whole command against the raw write plus its syncs.
    whole_ratio: f64,
    page_cache_growth_mib: f64,
    vmm_peak_mib_beyond_guest: f64,
}

#[derive(Serialize, Default, Clone)]
struct ChannelResult {
    channels: usize,
    raw: RawResult,
    save_direct: Option<SaveResult>,
    save_buffered: SaveResult,
    eager_restore: StepResult,
    lazy_resume_ms: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    dir: PathBuf,
    mem_mib: u64,
    fill_mib: u64,
    fill: String,
    data_mb: f64,
    memcpy_mb_s: f64,
    results: Vec<ChannelResult>,
}

/// What every step of one run shares.
struct Bench<'a> {
    dir: &'a Path,
    memory: &'a microvm::GuestMemory,
    snapshot: &'a microvm::persist::VmSnapshot,
    plan: RawPlan<'a>,
    data_mb: f64,
    guest_ranges: Arc<Mutex<Vec<(usize, usize)>>>,
}

fn save_restore(a: SaveRestoreArgs) -> Result<(), CliError> {
    if a.fill_mib + 64 > a.mem_mib {
        return Err(CliError::bad_input(format!(
            "--fill-mib {} leaves no room: the guest needs 64 MiB beside it (--mem-mib {})",
            a.fill_mib, a.mem_mib
        )));
    }
    if a.channels.is_empty() || a.channels.iter().any(|c| *c == 0 || *c > 64) {
        return Err(CliError::bad_input("--channels takes counts from 1 to 64"));
    }
    let kernel = a.common.prepare()?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let guest_ranges: Arc<Mutex<Vec<(usize, usize)>>> = Arc::new(Mutex::new(Vec::new()));

    progress("measuring memcpy bandwidth");
    let memcpy = memcpy_bandwidth()?;

    // The VM: the test kernel in fill mode with a tiny share (it halts at
    // once); its RAM is then filled host-side, which is much faster than
    // the guest's first touches under emulated paging.
    let (serial_path, serial) = a.common.create(".cryo-bench-serial")?;
    progress(&format!("booting a {} MiB guest", a.mem_mib));
    let mut vm = MicroVm::new(VmConfig {
        vcpus: 2,
        mem_mib: a.mem_mib,
        backing: MemoryBacking::Anonymous,
        boot: BootSource {
            kernel: kernel.path().to_path_buf(),
            cmdline: "console=ttyS0 cryo.mode=fill cryo.mem=1".into(),
            ..Default::default()
        },
        serial: SerialOutput::File(serial),
        serial_input: false,
        disks: Vec::new(),
        nets: Vec::new(),
    })?;
    vm.start()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::fs::read_to_string(&serial_path).unwrap_or_default();
        if out.matches("FILLED").count() >= 2 {
            break;
        }
        if Instant::now() > deadline {
            return Err(CliError::failure(format!("the guest did not start: {out}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&serial_path);
    vm.pause()?;
    progress(&format!(
        "filling {} MiB of guest RAM host-side with incompressible data",
        a.fill_mib
    ));
    let memory = vm.memory().clone();
    if let Ok(mut g) = guest_ranges.lock() {
        g.extend(ranges_of(&memory));
    }
    let mut left = a.fill_mib * MIB;
    let mut parts: Vec<&mut [u8]> = Vec::new();
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    for (index, region) in memory.iter().enumerate() {
        // SAFETY: the VM is paused, and until the scope below ends these
        // views (split into disjoint parts, one per thread) are the only
        // references to the region's bytes; `filled` is made after they are gone.
        let bytes = unsafe { image::region_bytes_mut(region) };
        let skip = if region.start_addr().0 == 0 {
            64 * MIB as usize
        } else {
            0
        };
        let take = (bytes.len().saturating_sub(skip) as u64).min(left) as usize;
        left -= take as u64;
        if take > 0 {
            spans.push((index, skip, take));
            parts.extend(bytes[skip..skip + take].chunks_mut(64 << 20));
        }
    }
    std::thread::scope(|s| {
        for (i, part) in parts.into_iter().enumerate() {
            s.spawn(move || fill_random(part, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1)));
        }
    });
    // The filled bytes, read-only from here on (the fill's mutable views are gone).
    let regions: Vec<&microvm::GuestRegion> = memory.iter().collect();
    let filled: Vec<&[u8]> = spans
        .iter()
        .map(|(i, skip, take)| &image::region_bytes(regions[*i])[*skip..*skip + *take])
        .collect();
    let snapshot = vm.save_state()?;
    let bench = Bench {
        dir: &a.common.dir,
        memory: &memory,
        snapshot: &snapshot,
        plan: raw_plan(&memory, &spans, &filled)?,
        data_mb: (a.fill_mib * MIB) as f64 / 1e6,
        guest_ranges: Arc::clone(&guest_ranges),
    };
    let mut results = Vec::new();
    for &n in &a.channels {
        results.push(bench.channels(n)?);
    }
    vm.shutdown();

    let report = Report {
        command,
        dir: a.common.dir.clone(),
        mem_mib: a.mem_mib,
        fill_mib: a.fill_mib,
        fill: "host-side: xorshift64 pseudo-random data (incompressible) written into guest RAM above 64 MiB while the guest is halted".into(),
        data_mb: bench.data_mb,
        memcpy_mb_s: memcpy,
        results,
    };
    print_report(a.common.json, &report, print_table);
    Ok(())
}

/// Prints a bench's report: pretty JSON with `json`, else as `table` does.
pub(crate) fn print_report<R: Serialize>(json: bool, report: &R, table: impl FnOnce(&R)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        table(report);
    }
}

/// Where the save puts the filled bytes: each 4 MiB block of them at its
/// page's offset in the fixed-ram layout of `memory`.
fn raw_plan<'a>(
    memory: &microvm::GuestMemory,
    spans: &[(usize, usize, usize)],
    filled: &[&'a [u8]],
) -> Result<RawPlan<'a>, CliError> {
    let layout = fixed_ram::Layout::new(image::PAGE_SIZE as u32, &image::region_specs(memory))
        .map_err(|e| CliError::failure(format!("the image layout: {e}")))?;
    let mut blocks = Vec::new();
    for ((region, skip, _), bytes) in spans.iter().zip(filled) {
        let base = layout.regions()[*region].pages_offset + *skip as u64;
        for (k, block) in bytes.chunks(bench_disk::BLOCK).enumerate() {
            blocks.push((base + (k * bench_disk::BLOCK) as u64, block));
        }
    }
    Ok(RawPlan {
        blocks,
        file_len: layout.device_state_offset(),
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Bench<'_> {
    /// Every step for `n` channels.
    fn channels(&self, n: usize) -> Result<ChannelResult, CliError> {
        let raw = self.raw(n)?;
        let img = self
            .dir
            .join(format!("cryo-bench-{}-{n}.img", std::process::id()));
        let mut r = ChannelResult {
            channels: n,
            save_direct: self.save(&img, n, true, &raw)?,
            save_buffered: self.save(&img, n, false, &raw)?.unwrap_or_default(),
            raw,
            ..Default::default()
        };
        // Restores read what was just written: drop it from the page cache first.
        r.eager_restore = self.eager(&img, n, &r.raw)?;
        r.lazy_resume_ms = self.lazy(&img, n)?;
        let _ = std::fs::remove_file(&img);
        Ok(r)
    }

    /// The raw reference: the better of two passes at cryo's queue depth,
    /// then one with twice the transfers in flight and (when cryo keeps
    /// more than one in flight per channel) one with one per channel.
    fn raw(&self, n: usize) -> Result<RawResult, CliError> {
        let threads = Threads::of_channels(n);
        let one = Threads::one_per_channel(n);
        progress(&format!(
            "raw O_DIRECT write, sync and read of {:.0} MB, {threads:?} (twice), then twice the threads, then {one:?}",
            self.data_mb
        ));
        let t =
            raw_pass(self.dir, &self.plan, threads)?.best(raw_pass(self.dir, &self.plan, threads)?);
        let double = raw_pass(self.dir, &self.plan, threads.doubled())?;
        let single = if one == threads {
            t
        } else {
            raw_pass(self.dir, &self.plan, one)?
        };
        let mb_s = |d: Duration| self.data_mb / secs(d);
        Ok(RawResult {
            write_s: secs(t.write),
            sync_s: secs(t.sync),
            read_s: secs(t.read),
            write_mb_s: mb_s(t.write),
            durable_mb_s: mb_s(t.write + t.sync),
            read_mb_s: mb_s(t.read),
            read_fresh_mb_s: mb_s(t.read_fresh),
            write_double_queue_mb_s: mb_s(double.write),
            read_double_queue_mb_s: mb_s(double.read),
            write_one_per_channel_mb_s: mb_s(single.write),
            read_one_per_channel_mb_s: mb_s(single.read),
        })
    }

    /// A fixed-ram save with or without O_DIRECT; `None` when O_DIRECT is
    /// not possible in the directory.
    fn save(
        &self,
        img: &Path,
        n: usize,
        direct: bool,
        raw: &RawResult,
    ) -> Result<Option<SaveResult>, CliError> {
        let _ = std::fs::remove_file(img);
        let mode = if direct { "O_DIRECT" } else { "buffered" };
        progress(&format!("save, {n} channels, {mode}"));
        let opts = fixed::ChannelOptions {
            channels: n,
            direct_io: if direct {
                multifd::DirectIo::On
            } else {
                multifd::DirectIo::Off
            },
        };
        let sampler = Sampler::start(Arc::clone(&self.guest_ranges));
        let start = Instant::now();
        let res = fixed::write_fixed_file(
            img,
            self.snapshot,
            self.memory,
            &opts,
            None,
            &crate::image::SaveControl::default(),
        );
        let whole = secs(start.elapsed());
        let (cache, rss) = sampler.finish();
        let phases = match res {
            Ok(w) => w.phases,
            Err(e) if direct => {
                progress(&format!("O_DIRECT save not possible here: {e}"));
                return Ok(None);
            }
            Err(e) => return Err(CliError::failure(e.to_string())),
        };
        Ok(Some(SaveResult {
            data_s: secs(phases.data),
            metadata_s: secs(phases.metadata),
            sync_s: secs(phases.sync),
            publish_s: secs(phases.publish),
            whole_s: whole,
            data_ratio: raw.write_s / secs(phases.data),
            data_ratio_one_per_channel: self.data_mb
                / secs(phases.data)
                / raw.write_one_per_channel_mb_s.max(1.0),
            whole_ratio: (raw.write_s + raw.sync_s) / whole,
            page_cache_growth_mib: cache,
            vmm_peak_mib_beyond_guest: rss,
        }))
    }

    fn register(&self, m: &microvm::GuestMemory) {
        if let Ok(mut g) = self.guest_ranges.lock() {
            g.extend(ranges_of(m));
        }
    }

    fn unregister(&self, m: &microvm::GuestMemory) {
        if let Ok(mut g) = self.guest_ranges.lock() {
            let gone = ranges_of(m);
            g.retain(|x| !gone.contains(x));
        }
    }

    /// An eager restore, to the restored VM running, from a cold page cache.
    fn eager(&self, img: &Path, n: usize, raw: &RawResult) -> Result<StepResult, CliError> {
        drop_file_cache(img);
        progress(&format!("eager restore, {n} channels"));
        let opts = fixed::ChannelOptions {
            channels: n,
            direct_io: multifd::DirectIo::Auto,
        };
        let sampler = Sampler::start(Arc::clone(&self.guest_ranges));
        let start = Instant::now();
        let register = |m: &microvm::GuestMemory| self.register(m);
        let mut loaded =
            fixed::load_fixed_with(img, RestoreMode::Eager, false, &opts, &register, None)
                .map_err(|e| CliError::failure(e.to_string()))?;
        let mut restored = MicroVm::restore_in(
            loaded.take_shell()?,
            &loaded.snapshot,
            SerialOutput::Sink,
            false,
            RestoreOptions::default(),
        )?;
        restored.start()?;
        let seconds = secs(start.elapsed());
        let (cache, rss) = sampler.finish();
        restored.shutdown();
        drop(restored);
        self.unregister(&loaded.memory);
        Ok(StepResult {
            seconds,
            mb_per_s: self.data_mb / seconds,
            ratio_to_raw: self.data_mb / seconds / raw.read_mb_s.max(1.0),
            ratio_to_raw_one_per_channel: self.data_mb
                / seconds
                / raw.read_one_per_channel_mb_s.max(1.0),
            ratio_to_raw_fresh: self.data_mb / seconds / raw.read_fresh_mb_s.max(1.0),
            page_cache_growth_mib: cache,
            vmm_peak_mib_beyond_guest: rss,
        })
    }

    /// A lazy restore's time to a running VM, in milliseconds.
    fn lazy(&self, img: &Path, n: usize) -> Result<f64, CliError> {
        drop_file_cache(img);
        progress(&format!("lazy restore, {n} channels"));
        let opts = fixed::ChannelOptions {
            channels: n,
            direct_io: multifd::DirectIo::Auto,
        };
        let start = Instant::now();
        let mut loaded = image::load(
            img,
            RestoreMode::Lazy { prefetch: false },
            false,
            &opts,
            None,
        )
        .map_err(|e| CliError::failure(e.to_string()))?;
        let mut restored = MicroVm::restore_in(
            loaded.take_shell()?,
            &loaded.snapshot,
            SerialOutput::Sink,
            false,
            RestoreOptions::default(),
        )?;
        restored.start()?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        restored.shutdown();
        Ok(ms)
    }
}

fn print_table(r: &Report) {
    println!(
        "cryo bench save-restore: {} MiB guest, {} MiB filled ({})",
        r.mem_mib, r.fill_mib, r.fill
    );
    println!(
        "directory {}; {:.0} MB of data; memcpy {:.0} MB/s; times in seconds",
        r.dir.display(),
        r.data_mb,
        r.memcpy_mb_s
    );
    println!(
        "{:>2} | {:>21} | {:>25} | {:>18} | {:>16} | {:>14} | {:>7} | {:>5} {:>5}",
        "ch",
        "raw write+sync (2xQD)",
        "save data+meta+sync+pub",
        "data x, whole x",
        "buffered whole x",
        "eager MB/s (x)",
        "lazy ms",
        "cache",
        "VMM"
    );
    for c in &r.results {
        let raw = &c.raw;
        let saves = [c.save_direct.as_ref(), Some(&c.save_buffered)];
        let peak_vmm = saves
            .iter()
            .flatten()
            .map(|s| s.vmm_peak_mib_beyond_guest)
            .fold(c.eager_restore.vmm_peak_mib_beyond_guest, f64::max);
        let (phases, ratios, cache) = match &c.save_direct {
            Some(s) => (
                format!(
                    "{:.2}+{:.2}+{:.2}+{:.2}={:.2}",
                    s.data_s, s.metadata_s, s.sync_s, s.publish_s, s.whole_s
                ),
                format!("{:.2}x, {:.2}x", s.data_ratio, s.whole_ratio),
                s.page_cache_growth_mib,
            ),
            None => ("n/a".into(), "n/a".into(), f64::NAN),
        };
        println!(
            "{:>2} | {:>21} | {:>25} | {:>18} | {:>16} | {:>14} | {:>7.1} | {:>5.1} {:>5.1}",
            c.channels,
            format!(
                "{:.2}+{:.2} ({:.0})",
                raw.write_s, raw.sync_s, raw.write_double_queue_mb_s
            ),
            phases,
            ratios,
            format!(
                "{:.2} ({:.2}x)",
                c.save_buffered.whole_s, c.save_buffered.whole_ratio
            ),
            format!(
                "{:.0} ({:.2}x)",
                c.eager_restore.mb_per_s, c.eager_restore.ratio_to_raw
            ),
            c.lazy_resume_ms,
            cache,
            peak_vmm,
        );
        println!(
            "   | raw MB/s: write {:.0}, durable {:.0}, read {:.0} (2xQD {:.0}), read into fresh memory {:.0} (eager {:.2}x of it); one per channel: write {:.0}, read {:.0}",
            raw.write_mb_s,
            raw.durable_mb_s,
            raw.read_mb_s,
            raw.read_double_queue_mb_s,
            raw.read_fresh_mb_s,
            c.eager_restore.ratio_to_raw_fresh,
            raw.write_one_per_channel_mb_s,
            raw.read_one_per_channel_mb_s
        );
        let (data_one, eager_one) = (
            c.save_direct
                .as_ref()
                .map_or(f64::NAN, |s| s.data_ratio_one_per_channel),
            c.eager_restore.ratio_to_raw_one_per_channel,
        );
        println!(
            "   | against one per channel: data {data_one:.2}x, eager {eager_one:.2}x (cryo: {} writes, {} reads in flight per channel)",
            multifd::SAVE_QUEUE_DEPTH,
            multifd::LOAD_QUEUE_DEPTH
        );
    }
    println!("raw = the save's writes and the restore's reads without cryo (same bytes, offsets, block size, writes and reads in flight as cryo; 2xQD: MB/s with twice as many in flight); data x = raw write / save data phase; whole x = raw write+sync / whole save; eager x = eager restore MB/s / raw read MB/s (into a reused buffer; \"read into fresh memory\": into new memory, as a restore must); cache = page-cache growth MiB during the O_DIRECT save; VMM = peak MiB resident outside guest RAM");
}
