//! `cryo bench device-writes`: what tracking the devices' writes into guest
//! memory costs, against the machine's own limits measured in the same run.
//!
//! - Host side: 4 KiB writes into guest memory through vm-memory (the path
//!   every device write takes) without any bitmap (`GuestMemoryMmap<()>`,
//!   as before writes were tracked), with cryo's `WriteTracker` and no
//!   observer, and with the observer a live copy attaches (marking
//!   `dirty_log::VmmDirty`), against `memcpy` of the same bytes.
//! - Guest side: the test kernel's disk reader (`cryo.blk`, one polled
//!   4 KiB virtio-blk read at a time) with dirty logging off, and on as a
//!   live copy has it (KVM's log, the device observer, a fetch-and-clear
//!   every 100 ms), against `pread` of the same 4 KiB blocks from the same
//!   file on one host thread.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use microvm::memory::{anonymous_memory, RamRange};
use microvm::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use microvm::{observe_writes, BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig};
use serde::Serialize;

use crate::bench_snapshot::wait_for;
use crate::error::CliError;
use crate::image::precopy::{fetch, start_log, stop_log, DeviceWrites};

/// Arguments of `cryo bench device-writes`.
#[derive(clap::Args, Debug)]
pub struct DeviceWritesArgs {
    /// Slots of the guest's disk reader (4 KiB each).
    #[arg(long, default_value_t = 256)]
    pub slots: u64,
    /// Blocks (4 KiB) of the disk it reads.
    #[arg(long, default_value_t = 4096)]
    pub blocks: u64,
    /// Page rewrites per second of the guest's memory workload (`cryo.rate`;
    /// its vCPU also runs the reader).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 1)]
    pub seconds: u64,
    /// Rounds: each measures every variant once, in turn, so that the load
    /// of a shared machine spreads over all of them; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Where the files go, the output form and the kernel.
    #[command(flatten)]
    pub common: crate::bench::BenchCommon,
}

/// The figures of one run.
#[derive(Debug, Default, Serialize)]
struct Figures {
    memcpy_4k_gb_s: f64,
    no_bitmap_4k_gb_s: f64,
    untracked_4k_gb_s: f64,
    tracked_4k_gb_s: f64,
    pread_4k_per_s: f64,
    reader_off_per_s: f64,
    reader_kvm_log_per_s: f64,
    reader_on_per_s: f64,
}

const PAGE: usize = 4096;
const HOST_MIB: u64 = 64;

fn fail(what: &str) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::failure(format!("{what}: {e}"))
}

/// GB/s of 4 KiB writes through `write` over 64 MiB, repeated for `dur`
/// after one untimed pass (which takes the first-touch page faults).
fn gb_s(dur: Duration, mut write: impl FnMut(usize)) -> f64 {
    let pages = (HOST_MIB << 20) as usize / PAGE;
    (0..pages).for_each(|p| write(p * PAGE));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for p in 0..pages {
            write(p * PAGE);
        }
        n += pages as u64;
    }
    n as f64 * PAGE as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The host-side figures: memcpy, untracked and tracked vm-memory writes,
/// in turn for `rounds` rounds.
fn host_side(f: &mut Figures, dur: Duration, rounds: usize) -> Result<(), CliError> {
    let ram = RamRange {
        start: 0,
        len: HOST_MIB << 20,
    };
    let mem = anonymous_memory(&[ram]).map_err(|e| CliError::failure(e.to_string()))?;
    let marks = Arc::new(DeviceWrites(dirty_log::VmmDirty::new(&[(
        ram.start, ram.len,
    )])));
    let src = vec![0x5au8; PAGE];
    let mut plain = vec![0u8; (HOST_MIB << 20) as usize];
    // vm-memory without any bitmap (what cryo used before it tracked writes).
    let bare = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram.len as usize)])
        .map_err(|e| CliError::failure(e.to_string()))?;
    let mut v: [Vec<f64>; 4] = Default::default();
    let mut write = |o: usize| {
        let _ = mem.write_slice(&src, GuestAddress(o as u64));
    };
    for _ in 0..rounds {
        v[0].push(gb_s(dur, |o| {
            plain[o..o + PAGE].copy_from_slice(&src);
            std::hint::black_box(&plain);
        }));
        v[1].push(gb_s(dur, |o| {
            let _ = bare.write_slice(&src, GuestAddress(o as u64));
        }));
        v[2].push(gb_s(dur, &mut write));
        observe_writes(&mem, Some(marks.clone()));
        v[3].push(gb_s(dur, &mut write));
        observe_writes(&mem, None);
    }
    let [copy, no_bitmap, untracked, tracked] = v;
    f.memcpy_4k_gb_s = median(copy);
    f.no_bitmap_4k_gb_s = median(no_bitmap);
    f.untracked_4k_gb_s = median(untracked);
    f.tracked_4k_gb_s = median(tracked);
    Ok(())
}

/// 4 KiB `pread`s per second over `disk`'s blocks, one thread, for `dur`.
fn pread_rate(disk: &Path, blocks: u64, dur: Duration) -> Result<f64, CliError> {
    let file = File::open(disk).map_err(fail("open the disk"))?;
    let mut buf = vec![0u8; PAGE];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        file.read_exact_at(&mut buf, (n % blocks) * PAGE as u64)
            .map_err(fail("read the disk"))?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// (guest TSC, reads) of each `BLK reads=` line, with the TSC of vCPU 0's
/// heartbeat just before it.
fn reader_samples(serial: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let num = |l: &str, k: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
    };
    let mut tsc = None;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with("HB cpu=0 ") {
            tsc = num(l, "tsc");
        } else if let (Some(t), true) = (tsc.take(), l.starts_with("BLK reads=")) {
            if let Some(r) = num(l, "reads") {
                out.push((t, r));
            }
        }
    }
    out
}

/// Reads per second of the guest's reader over the next `dur` (longer, up
/// to 30 s, until it reported twice), while `during` runs every 100 ms.
fn reader_rate(
    serial: &Path,
    tsc_hz: f64,
    dur: Duration,
    mut during: impl FnMut() -> Result<(), CliError>,
) -> Result<f64, CliError> {
    let skip = reader_samples(serial).len();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        during()?;
        if start.elapsed() < dur {
            continue;
        }
        let s = reader_samples(serial);
        let w = s.get(skip..).unwrap_or_default();
        match (w.first(), w.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                return Ok((b.1 - a.1) as f64 * tsc_hz / (b.0 - a.0) as f64)
            }
            _ if start.elapsed() > Duration::from_secs(30) => {
                return Err(CliError::failure("the guest's disk reader did not report"))
            }
            _ => {}
        }
    }
}

/// Boots the reader guest on `disk`, its console into `serial`.
fn boot(
    a: &DeviceWritesArgs,
    kernel: &Path,
    disk: &Path,
    serial: &Path,
) -> Result<Guest, CliError> {
    let file = File::create(serial).map_err(fail("create the console file"))?;
    let mut vm = MicroVm::new(VmConfig {
        vcpus: 1,
        mem_mib: 64,
        backing: MemoryBacking::Anonymous,
        boot: BootSource {
            kernel: kernel.to_path_buf(),
            cmdline: format!(
                "console=ttyS0 cryo.mem=4 cryo.hb_ms=100 cryo.rate={} cryo.blk={}",
                a.rate, a.slots
            ),
            ..Default::default()
        },
        serial: SerialOutput::File(file),
        serial_input: false,
        disks: vec![microvm::devices::virtio::block::DiskConfig {
            path: disk.to_path_buf(),
            read_only: true,
            direct: false,
        }],
        nets: Vec::new(),
    })?;
    let controller = vm.controller()?;
    let stop = vm.stop_handle();
    let runner = Some(std::thread::spawn(move || vm.run(Vec::new())));
    Ok(Guest {
        controller,
        stop,
        runner,
    })
}

/// The reader guest, stopped on drop.
struct Guest {
    controller: microvm::VmController,
    stop: microvm::StopHandle,
    runner: Option<std::thread::JoinHandle<Result<microvm::VmExitReason, microvm::Error>>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.stop(microvm::VmExitReason::Stopped);
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
    }
}

/// The reader's rate while dirty logging runs as a live copy has it (a
/// fetch-and-clear every 100 ms); `devices`: with the device observer too,
/// else KVM's log alone.
fn logged_rate(
    g: &Guest,
    serial: &Path,
    tsc_hz: f64,
    dur: Duration,
    devices: bool,
) -> Result<f64, CliError> {
    let mut log = Some(start_log(&g.controller).map_err(CliError::from)?);
    if !devices {
        g.controller.call(|vm| observe_writes(vm.memory(), None))?;
    }
    let rate = reader_rate(serial, tsc_hz, dur, || {
        fetch(&g.controller, &mut log)
            .map(drop)
            .map_err(CliError::from)
    });
    if let Some(l) = log.take() {
        g.controller
            .call(move |vm| stop_log(vm, l))?
            .map_err(|e| CliError::failure(format!("dirty logging: {e}")))?;
    }
    rate
}

/// The guest-side figures: the reader with logging off, with KVM's log
/// alone, and with the device observer too, in turn for `rounds` rounds.
fn guest_side(a: &DeviceWritesArgs, f: &mut Figures, disk: &Path) -> Result<(), CliError> {
    let serial = a.common.file(".cryo-bench-dw");
    let kernel = a.common.prepare()?;
    let g = boot(a, kernel.path(), disk, &serial)?;
    let result = (|| {
        wait_for(&serial, "BLK reads=", 3, Duration::from_secs(60))?;
        let tsc_hz = f64::from(g.controller.call(|vm| vm.machine().tsc_khz)?.max(1)) * 1e3;
        let dur = Duration::from_secs(a.seconds.max(1));
        let (mut off, mut kvm, mut on) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            off.push(reader_rate(&serial, tsc_hz, dur, || Ok(()))?);
            kvm.push(logged_rate(&g, &serial, tsc_hz, dur, false)?);
            on.push(logged_rate(&g, &serial, tsc_hz, dur, true)?);
        }
        eprintln!(
            "bench: reader reads/s off {off:.0?}, KVM log {kvm:.0?}, KVM log + devices {on:.0?}"
        );
        f.reader_off_per_s = median(off);
        f.reader_kvm_log_per_s = median(kvm);
        f.reader_on_per_s = median(on);
        let text = std::fs::read_to_string(&serial).map_err(fail("read the console"))?;
        match text
            .lines()
            .find(|l| l.starts_with("MISMATCH") || l.starts_with("ERROR"))
        {
            Some(l) => Err(CliError::failure(format!("the guest reported: {l}"))),
            None => Ok(()),
        }
    })();
    drop(g);
    let _ = std::fs::remove_file(&serial);
    result
}

/// Runs the device-writes benchmark.
pub fn run(a: DeviceWritesArgs) -> Result<(), CliError> {
    if a.slots == 0 || a.slots > 960 || a.blocks == 0 || a.rounds == 0 {
        return Err(CliError::bad_input(
            "--slots must be 1 to 960, --blocks and --rounds at least 1",
        ));
    }
    let disk = a
        .common
        .dir
        .join(format!(".cryo-bench-dw-{}.raw", std::process::id()));
    cryo_test_kernel::write_reader_disk(&disk, a.blocks).map_err(fail("write the disk"))?;
    let mut f = Figures::default();
    let dur = Duration::from_secs(a.seconds.max(1));
    let result = host_side(&mut f, dur / 4, a.rounds.max(1))
        .and_then(|()| pread_rate(&disk, a.blocks, dur).map(|r| f.pread_4k_per_s = r))
        .and_then(|()| guest_side(&a, &mut f, &disk));
    let _ = std::fs::remove_file(&disk);
    result?;
    report(&a, &f)
}

fn report(a: &DeviceWritesArgs, f: &Figures) -> Result<(), CliError> {
    if a.common.json {
        let text = serde_json::to_string_pretty(f).map_err(|e| CliError::failure(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let r = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    println!("4 KiB writes into guest memory (host side, GB/s; ratio to memcpy, to no bitmap):");
    for (name, v) in [
        ("memcpy", f.memcpy_4k_gb_s),
        ("vm-memory, no bitmap", f.no_bitmap_4k_gb_s),
        ("vm-memory, untracked", f.untracked_4k_gb_s),
        ("vm-memory, tracked", f.tracked_4k_gb_s),
    ] {
        let (to_copy, to_bare) = (r(v, f.memcpy_4k_gb_s), r(v, f.no_bitmap_4k_gb_s));
        println!("  {name:<22} {v:8.2}  {to_copy:.2}  {to_bare:.2}");
    }
    println!("guest disk reader (4 KiB virtio-blk reads/s; ratio to host pread, to off):");
    for (name, v) in [
        ("host pread, 1 thread", f.pread_4k_per_s),
        ("logging off", f.reader_off_per_s),
        ("KVM log only", f.reader_kvm_log_per_s),
        ("KVM log + devices", f.reader_on_per_s),
    ] {
        let (to_raw, to_off) = (r(v, f.pread_4k_per_s), r(v, f.reader_off_per_s));
        println!("  {name:<22} {v:8.0}  {to_raw:.4}  {to_off:.2}");
    }
    Ok(())
}
