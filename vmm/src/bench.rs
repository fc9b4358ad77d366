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

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{BootSource, MemoryBacking, MicroVm, RestoreOptions, SerialOutput, VmConfig};
use serde::Serialize;

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
    /// Directory for the image files (on the disk to measure).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Kernel to boot (default: the cryo test kernel built into this binary).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
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
}

/// Runs a bench verb.
pub fn bench(cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::SaveRestore(a) => save_restore(a),
        BenchCommand::Snapshot(a) => crate::bench_snapshot::run(a),
        BenchCommand::Migrate(a) => crate::bench_migrate::run(a),
    }
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

const MIB: u64 = 1 << 20;
const RAW_BLOCK: usize = 4 << 20;

/// A page-aligned buffer (for O_DIRECT).
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<Self, CliError> {
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
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by self, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the buffer is plain memory owned by the value; shared use is read-only.
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

/// Raw O_DIRECT sequential bandwidth with `streams` writers (then readers),
/// each on its own contiguous part of one file as large as `source`. The
/// writers write `source` itself (the guest's filled RAM: the same bytes a
/// save writes, so that a storage layer that compresses or deduplicates
/// cannot flatter one side), 4 MiB at a time, straight from memory.
fn raw_bandwidth(dir: &Path, source: &[&[u8]], streams: usize) -> Result<(f64, f64), CliError> {
    let bytes: u64 = source.iter().map(|s| s.len() as u64).sum();
    let path = dir.join(format!(".cryo-bench-raw-{}", std::process::id()));
    let fail =
        |e: std::io::Error| CliError::failure(format!("raw disk test on {}: {e}", path.display()));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| {
            CliError::bad_input(format!(
                "{} does not support O_DIRECT ({e}): the raw bandwidth cannot be measured there",
                dir.display()
            ))
        })?;
    let per_stream = (bytes / streams as u64) / RAW_BLOCK as u64 * RAW_BLOCK as u64;
    // Block k of the file comes from the k-th 4 MiB of the source.
    let blocks: Vec<&[u8]> = source
        .iter()
        .flat_map(|s| s.chunks_exact(RAW_BLOCK))
        .collect();
    let blocks = &blocks;
    let run = |write: bool| -> Result<f64, CliError> {
        let start = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..streams)
                .map(|i| {
                    let file = &file;
                    s.spawn(move || -> std::io::Result<()> {
                        let mut local = AlignedBuf::new(RAW_BLOCK)
                            .map_err(|_| std::io::Error::other("mmap"))?;
                        let mut off = i as u64 * per_stream;
                        let end = off + per_stream;
                        while off < end {
                            if write {
                                let block = blocks
                                    .get((off / RAW_BLOCK as u64) as usize)
                                    .ok_or_else(|| std::io::Error::other("source too small"))?;
                                file.write_all_at(block, off)?;
                            } else {
                                file.read_exact_at(local.as_mut(), off)?;
                            }
                            off += RAW_BLOCK as u64;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| std::io::Error::other("raw I/O thread panicked"))??;
            }
            Ok::<(), std::io::Error>(())
        })
        .map_err(fail)?;
        if write {
            file.sync_all().map_err(fail)?;
        }
        Ok((per_stream * streams as u64) as f64 / start.elapsed().as_secs_f64() / 1e6)
    };
    // The disk is shared and noisy: the limit is the better of two runs.
    let result = (|| {
        let w = run(true)?.max(run(true)?);
        let r = run(false)?.max(run(false)?);
        Ok((w, r))
    })();
    let _ = std::fs::remove_file(&path);
    result
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

/// Resident KiB of this process outside the given guest-memory ranges.
fn rss_outside_kib(guest: &[(usize, usize)]) -> u64 {
    let mut s = String::new();
    if File::open("/proc/self/smaps")
        .and_then(|mut f| f.read_to_string(&mut s))
        .is_err()
    {
        return 0;
    }
    let mut total = 0;
    let mut skip = false;
    for line in s.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    skip = guest.iter().any(|(s, e)| a < *e && b > *s);
                    continue;
                }
            }
        }
        if !skip {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
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
                // Reading smaps walks the page tables of all guest memory
                // under the mmap lock, which O_DIRECT I/O also takes: sample
                // sparingly so that the measurement does not slow the save.
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

fn drop_file_cache(path: &Path) {
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
    page_cache_growth_mib: f64,
    vmm_peak_mib_beyond_guest: f64,
}

#[derive(Serialize, Default, Clone)]
struct ChannelResult {
    channels: usize,
    raw_write_mb_s: f64,
    raw_read_mb_s: f64,
    save_direct: Option<StepResult>,
    save_buffered: StepResult,
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
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| CliError::bad_input(format!("cannot use {}: {e}", a.dir.display())))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let guest_ranges: Arc<Mutex<Vec<(usize, usize)>>> = Arc::new(Mutex::new(Vec::new()));

    progress("measuring memcpy bandwidth");
    let memcpy = memcpy_bandwidth()?;

    // The VM: the test kernel in fill mode with a tiny share (it halts at
    // once); its RAM is then filled host-side, which is much faster than
    // the guest's first touches under emulated paging.
    let kernel = BenchKernel::resolve(a.kernel.as_deref(), &a.dir)?;
    let serial_path = a
        .dir
        .join(format!(".cryo-bench-serial-{}", std::process::id()));
    let serial = File::create(&serial_path)
        .map_err(|e| CliError::bad_input(format!("cannot write in {}: {e}", a.dir.display())))?;
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
    let data_mb = (a.fill_mib * MIB) as f64 / 1e6;

    let mut results = Vec::new();
    for &n in &a.channels {
        let mut r = ChannelResult {
            channels: n,
            ..Default::default()
        };
        progress(&format!(
            "raw O_DIRECT write/read of {} MiB with {n} streams",
            a.fill_mib
        ));
        let (w, rd) = raw_bandwidth(&a.dir, &filled, n)?;
        r.raw_write_mb_s = w;
        r.raw_read_mb_s = rd;
        let img = a
            .dir
            .join(format!("cryo-bench-{}-{n}.img", std::process::id()));
        for direct in [true, false] {
            let _ = std::fs::remove_file(&img);
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
            let sampler = Sampler::start(Arc::clone(&guest_ranges));
            let start = Instant::now();
            let res = fixed::write_fixed_file(
                &img,
                &snapshot,
                &memory,
                &opts,
                None,
                &crate::image::SaveControl::default(),
            );
            let secs = start.elapsed().as_secs_f64();
            let (cache, rss) = sampler.finish();
            match res {
                Ok(_) => {
                    let step = StepResult {
                        seconds: secs,
                        mb_per_s: data_mb / secs,
                        ratio_to_raw: data_mb / secs / w,
                        page_cache_growth_mib: cache,
                        vmm_peak_mib_beyond_guest: rss,
                    };
                    if direct {
                        r.save_direct = Some(step);
                    } else {
                        r.save_buffered = step;
                    }
                }
                Err(e) if direct => progress(&format!("O_DIRECT save not possible here: {e}")),
                Err(e) => return Err(CliError::failure(e.to_string())),
            }
        }
        // Restores read what was just written: drop it from the page cache first.
        drop_file_cache(&img);
        progress(&format!("eager restore, {n} channels"));
        let opts = fixed::ChannelOptions {
            channels: n,
            direct_io: multifd::DirectIo::Auto,
        };
        let sampler = Sampler::start(Arc::clone(&guest_ranges));
        let start = Instant::now();
        let register = |m: &microvm::GuestMemory| {
            if let Ok(mut g) = guest_ranges.lock() {
                g.extend(ranges_of(m));
            }
        };
        let loaded =
            fixed::load_fixed_with(&img, RestoreMode::Eager, false, &opts, &register, None)
                .map_err(|e| CliError::failure(e.to_string()))?;
        let mut restored = MicroVm::restore(
            &loaded.snapshot,
            loaded.memory.clone(),
            SerialOutput::Sink,
            false,
            RestoreOptions::default(),
        )?;
        restored.start()?;
        let secs = start.elapsed().as_secs_f64();
        let (cache, rss) = sampler.finish();
        r.eager_restore = StepResult {
            seconds: secs,
            mb_per_s: data_mb / secs,
            ratio_to_raw: data_mb / secs / rd.max(1.0),
            page_cache_growth_mib: cache,
            vmm_peak_mib_beyond_guest: rss,
        };
        restored.shutdown();
        drop(restored);
        if let Ok(mut g) = guest_ranges.lock() {
            let gone = ranges_of(&loaded.memory);
            g.retain(|x| !gone.contains(x));
        }
        drop(loaded);

        drop_file_cache(&img);
        progress(&format!("lazy restore, {n} channels"));
        let start = Instant::now();
        let loaded = image::load(
            &img,
            RestoreMode::Lazy { prefetch: false },
            false,
            &opts,
            None,
        )
        .map_err(|e| CliError::failure(e.to_string()))?;
        let mut restored = MicroVm::restore(
            &loaded.snapshot,
            loaded.memory.clone(),
            SerialOutput::Sink,
            false,
            RestoreOptions::default(),
        )?;
        restored.start()?;
        r.lazy_resume_ms = start.elapsed().as_secs_f64() * 1000.0;
        restored.shutdown();
        drop(restored);
        drop(loaded);
        let _ = std::fs::remove_file(&img);
        results.push(r);
    }
    vm.shutdown();

    let report = Report {
        command,
        dir: a.dir.clone(),
        mem_mib: a.mem_mib,
        fill_mib: a.fill_mib,
        fill: "host-side: xorshift64 pseudo-random data (incompressible) written into guest RAM above 64 MiB while the guest is halted".into(),
        data_mb,
        memcpy_mb_s: memcpy,
        results,
    };
    print_report(a.json, &report, print_table);
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

fn print_table(r: &Report) {
    println!(
        "cryo bench save-restore: {} MiB guest, {} MiB filled ({})",
        r.mem_mib, r.fill_mib, r.fill
    );
    println!(
        "directory {}; memcpy {:.0} MB/s",
        r.dir.display(),
        r.memcpy_mb_s
    );
    println!(
        "{:>3} | {:>9} {:>9} | {:>22} | {:>22} | {:>22} | {:>8} | {:>9} {:>9}",
        "ch",
        "raw W MB/s",
        "raw R MB/s",
        "save O_DIRECT MB/s (x)",
        "save buffered MB/s (x)",
        "eager restore MB/s (x)",
        "lazy ms",
        "cache MiB",
        "VMM MiB"
    );
    for c in &r.results {
        let d = c
            .save_direct
            .as_ref()
            .map(|s| format!("{:.0} ({:.2}x)", s.mb_per_s, s.ratio_to_raw))
            .unwrap_or_else(|| "n/a".into());
        let peak_vmm = c
            .save_direct
            .as_ref()
            .map(|s| s.vmm_peak_mib_beyond_guest)
            .unwrap_or(0.0)
            .max(c.save_buffered.vmm_peak_mib_beyond_guest)
            .max(c.eager_restore.vmm_peak_mib_beyond_guest);
        println!(
            "{:>3} | {:>10.0} {:>10.0} | {:>22} | {:>22} | {:>22} | {:>8.1} | {:>9.1} {:>9.1}",
            c.channels,
            c.raw_write_mb_s,
            c.raw_read_mb_s,
            d,
            format!(
                "{:.0} ({:.2}x)",
                c.save_buffered.mb_per_s, c.save_buffered.ratio_to_raw
            ),
            format!(
                "{:.0} ({:.2}x)",
                c.eager_restore.mb_per_s, c.eager_restore.ratio_to_raw
            ),
            c.lazy_resume_ms,
            c.save_direct
                .as_ref()
                .map(|s| s.page_cache_growth_mib)
                .unwrap_or(f64::NAN),
            peak_vmm,
        );
    }
    println!("(x) = ratio to the raw O_DIRECT bandwidth of the same parallelism; cache = page-cache growth during the O_DIRECT save; VMM = peak resident memory outside guest RAM");
}
