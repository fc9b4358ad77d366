//! `cryo bench snapshot`: a live snapshot of a guest that writes hard, against
//! a stopped save of the same VM in the same run.
//!
//! The guest is the test kernel in verify mode with no write-rate limit: each
//! vCPU rewrites random pages of its share and re-verifies pages all the
//! time, printing a heartbeat (with its running write count and TSC) every
//! 100 ms. The guest's write rate is computed from consecutive heartbeats,
//! sorted into before / during / after the snapshot by their TSC, which on
//! these hosts is the host's TSC (the guest's TSC has no offset).
//!
//! The floor, in the same run: all of RAM write-protected and each run of
//! `--fault-kib` (the unit the snapshot's faults un-protect, one page by
//! default) un-protected on its first fault, nothing copied (bg-snapshot's
//! pre-arm alone), for as long as the snapshot took. That is what KVM's
//! re-faulting alone costs the guest on this host at that granularity; the
//! snapshot's rate is reported against it.

use std::path::Path;
use std::time::{Duration, Instant};

use microvm::{BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig, VmController};
use serde::Serialize;

use crate::error::CliError;
use crate::image::{self, fixed, live};

/// Arguments of `cryo bench snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 4096)]
    pub mem_mib: u64,
    /// MiB of guest RAM the guest fills and keeps writing (split over 2 vCPUs).
    #[arg(long, default_value_t = 3072)]
    pub fill_mib: u64,
    /// Walker / channel threads.
    #[arg(long)]
    pub channels: Option<usize>,
    /// Block size in KiB (unit of copy and write protection): a power of two from 4.
    #[arg(long, default_value_t = (live::BLOCK_SIZE >> 10) as u64)]
    pub block_kib: u64,
    /// KiB a guest write to a block not yet copied copies and un-protects
    /// (the aligned run holding the page), and the floor's un-protect unit:
    /// a power of two from 4 up to --block-kib.
    #[arg(long, default_value_t = 4)]
    pub fault_kib: u64,
    /// Read never-populated memory too instead of recording it as holes
    /// unread (the walk before skipping existed, for comparison).
    #[arg(long)]
    pub walk_unpopulated: bool,
    /// Advise guest RAM for transparent huge pages (`MADV_HUGEPAGE`) before
    /// the guest fills it (an experiment: cryo does not do this by default).
    #[arg(long)]
    pub thp: bool,
    /// O_DIRECT for both the snapshot and the save: auto, on, off.
    #[arg(long, value_enum, default_value = "auto")]
    pub direct_io: crate::api::DirectIoArg,
    /// vCPUs of the guest (each writes its share of --fill-mib).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Where the files go, the output form and the kernel.
    #[command(flatten)]
    pub common: crate::bench::BenchCommon,
}

#[derive(Serialize)]
struct Report {
    command: String,
    mem_mib: u64,
    fill_mib: u64,
    pause_ms: f64,
    pause_stop_ms: f64,
    pause_state_ms: f64,
    pause_reprotect_ms: f64,
    pause_resume_ms: f64,
    blocks_reprotected_paused: u64,
    pre_arm_ms: f64,
    pre_arm_faults: u64,
    pre_arm_rounds: u32,
    blocks_reprotected_running: u64,
    block_kib: u64,
    fault_kib: u64,
    walkers: usize,
    skip_unpopulated: bool,
    thp: bool,
    /// The host's 1-minute load average when the snapshot started.
    load_average: f64,
    snapshot_s: f64,
    stopped_save_s: f64,
    snapshot_over_stopped_save: f64,
    stopped_save_paused_s: f64,
    rate_before_pages_s: f64,
    rate_during_pages_s: f64,
    rate_after_pages_s: f64,
    during_over_before: f64,
    rate_pre_arm_pages_s: f64,
    rate_floor_pages_s: f64,
    rate_before_floor_pages_s: f64,
    floor_faults: u64,
    during_over_floor: f64,
    blocks_by_walkers: u64,
    blocks_by_faults: u64,
    pages_by_faults: u64,
    blocks_with_fault_pages: u64,
    fault_pages_peak: u64,
    blocks_unpopulated: u64,
    faults: u64,
    fault_latency_median_us: f64,
    fault_latency_p99_us: f64,
    fault_latency_max_us: f64,
    wp_unpopulated: bool,
}

pub(crate) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The value of field `k` (`k=<n>`) of a heartbeat line.
fn hb_field(l: &str, k: &str) -> Option<u64> {
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

/// (cpu, tsc, writes) of every whole heartbeat line.
pub(crate) fn heartbeats(serial: &Path) -> Vec<(u64, u64, u64)> {
    heartbeats_in(&std::fs::read_to_string(serial).unwrap_or_default())
}

/// [`heartbeats`] of console text.
pub(crate) fn heartbeats_in(text: &str) -> Vec<(u64, u64, u64)> {
    text.lines()
        .filter(|l| l.starts_with("HB ") && l.contains("errors="))
        .filter_map(|l| {
            Some((
                hb_field(l, "cpu")?,
                hb_field(l, "tsc")?,
                hb_field(l, "writes")?,
            ))
        })
        .collect()
}

/// (cpu, tsc, writes) of every heartbeat whose TSC stamp was printed whole,
/// also a line cut short (a VM paused in the middle of printing it: the
/// rest of the line goes on on the destination); its writes are 0 when cut
/// before them. A stamp says the guest ran at that TSC.
pub(crate) fn heartbeat_stamps(serial: &Path) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("HB "))
        .filter_map(|l| {
            // The stamp is whole when a space follows it.
            let after = &l[l.find(" tsc=")? + 5..];
            after.find(' ')?;
            Some((
                hb_field(l, "cpu")?,
                hb_field(l, "tsc")?,
                hb_field(l, "writes").unwrap_or(0),
            ))
        })
        .collect()
}

/// Pages written per second by all vCPUs between TSC `from` and `to`.
pub(crate) fn rate(beats: &[(u64, u64, u64)], from: u64, to: u64, tsc_hz: f64) -> f64 {
    let mut total = 0.0;
    for cpu in 0..64 {
        let b: Vec<&(u64, u64, u64)> = beats
            .iter()
            .filter(|(c, t, _)| *c == cpu && *t >= from && *t <= to)
            .collect();
        if let (Some(first), Some(last)) = (b.first(), b.last()) {
            if last.1 > first.1 {
                total += (last.2 - first.2) as f64 / ((last.1 - first.1) as f64 / tsc_hz);
            }
        }
    }
    total
}

pub(crate) fn wait_for(
    serial: &Path,
    what: &str,
    count: usize,
    timeout: Duration,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains("MISMATCH") {
            return Err(CliError::failure("the guest reported a MISMATCH"));
        }
        if text.matches(what).count() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::failure(format!(
                "the guest did not print {what} in time"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The floor: all of RAM write-protected, each run of `walk.fault_copy_bytes`
/// un-protected on its first fault, nothing copied, for `dur`. Returns the
/// TSC at its start and end and the faults it served.
fn floor(
    controller: &VmController,
    dur: Duration,
    walk: live::Walk,
) -> Result<(u64, u64, u64), CliError> {
    let fail = |e: bg_snapshot::SnapshotError| CliError::failure(e.to_string());
    let memory = controller.call(|vm| vm.memory().clone())?;
    let start = Instant::now();
    let t0 = rdtsc();
    let opts = bg_snapshot::ArmOptions {
        fault_copy_bytes: walk.fault_copy_bytes,
        ..Default::default()
    };
    let pre = bg_snapshot::prepare_with(&live::guest_ranges(&memory), walk.block_size, opts)
        .and_then(|p| p.pre_arm())
        .map_err(fail)?;
    std::thread::sleep(dur.saturating_sub(start.elapsed()));
    let stats = pre.disarm().map_err(fail)?;
    Ok((t0, rdtsc(), stats.faults))
}

/// `MADV_HUGEPAGE` over guest RAM (before the guest touches it).
fn advise_huge_pages(vm: &MicroVm) {
    for r in live::guest_ranges(vm.memory()) {
        // SAFETY: madvise(MADV_HUGEPAGE) changes only how later faults are
        // served; the range is guest RAM, mapped for the VM's life.
        let ret = unsafe { libc::madvise(r.ptr().cast(), r.len(), libc::MADV_HUGEPAGE) };
        if ret != 0 {
            eprintln!("bench: MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        }
    }
}

/// The host's 1-minute load average (0 where `/proc/loadavg` is unreadable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (at most 60 s) until the guest's write rate over the last second is
/// back to 0.8x `rate_before`.
fn wait_recovered(serial: &Path, rate_before: f64, tsc_hz: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let now = rdtsc();
        let last = rate(
            &heartbeats(serial),
            now.saturating_sub(tsc_hz as u64),
            now,
            tsc_hz,
        );
        if last >= 0.8 * rate_before {
            return;
        }
    }
    eprintln!("bench: the guest's rate did not recover within 60 s");
}

/// Runs the snapshot benchmark.
pub fn run(a: SnapshotArgs) -> Result<(), CliError> {
    if a.vcpus == 0 || a.vcpus > 64 {
        return Err(CliError::bad_input("--vcpus takes 1 to 64"));
    }
    let block_size = a
        .block_kib
        .checked_mul(1024)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(0);
    if !block_size.is_power_of_two() || block_size < 4096 || a.block_kib > (1 << 20) {
        return Err(CliError::bad_input(
            "--block-kib takes a power of two from 4 to 1048576",
        ));
    }
    let fault_copy_bytes = usize::try_from(a.fault_kib.saturating_mul(1024)).unwrap_or(0);
    if !fault_copy_bytes.is_power_of_two() || a.fault_kib < 4 || a.fault_kib > a.block_kib {
        return Err(CliError::bad_input(
            "--fault-kib takes a power of two from 4 up to --block-kib",
        ));
    }
    if a.fill_mib + 64 > a.mem_mib {
        return Err(CliError::bad_input(
            "--fill-mib must leave 64 MiB of --mem-mib free",
        ));
    }
    let kernel = a.common.prepare()?;
    let (serial_path, serial) = a.common.create(".cryo-bench-snap-serial")?;
    eprintln!(
        "bench: booting a {} MiB guest that fills and keeps writing {} MiB",
        a.mem_mib, a.fill_mib
    );
    let mut vm = MicroVm::new(VmConfig {
        vcpus: a.vcpus,
        mem_mib: a.mem_mib,
        backing: MemoryBacking::Anonymous,
        boot: BootSource {
            kernel: kernel.path().to_path_buf(),
            cmdline: format!(
                "console=ttyS0 cryo.mem={} cryo.rate=0 cryo.hb_ms=100",
                a.fill_mib / u64::from(a.vcpus.max(1))
            ),
            ..Default::default()
        },
        serial: SerialOutput::File(serial),
        serial_input: false,
        disks: Vec::new(),
        nets: Vec::new(),
    })?;
    if a.thp {
        advise_huge_pages(&vm);
    }
    let controller = vm.controller()?;
    let stop = vm.stop_handle();
    let runner = std::thread::spawn(move || vm.run(Vec::new()));
    let result = (|| -> Result<Report, CliError> {
        // The fill is over once every vCPU has completed a verification sweep.
        wait_for(
            &serial_path,
            "SWEEP",
            usize::from(a.vcpus),
            Duration::from_secs(600),
        )?;
        let tsc_khz = controller.call(|vm| vm.machine().tsc_khz)?;
        let tsc_hz = f64::from(tsc_khz.max(1)) * 1000.0;
        std::thread::sleep(Duration::from_secs(2));
        let img = a
            .common
            .dir
            .join(format!("cryo-bench-snap-{}.img", std::process::id()));
        let channels = fixed::ChannelOptions {
            channels: a.channels.unwrap_or_else(fixed::io_threads),
            direct_io: a.direct_io.into(),
        };
        let walk = live::Walk {
            block_size,
            skip_unpopulated: !a.walk_unpopulated,
            fault_copy_bytes,
        };
        let load_average = load_average();
        eprintln!("bench: live snapshot");
        let t0 = rdtsc();
        let start = Instant::now();
        let cancel = live::CancelSlot::default();
        let stats = live::snapshot_vm(&controller, &img, &channels, &[], walk, &cancel, None)
            .map_err(|e| CliError::failure(e.to_string()))?;
        let snapshot_s = start.elapsed().as_secs_f64();
        let t1 = rdtsc();
        std::thread::sleep(Duration::from_secs(2));
        let t2 = rdtsc();
        let _ = std::fs::remove_file(&img);
        // Each protection change leaves the guest re-faulting for a while:
        // let it get back to its rate before the floor.
        let before_tsc = t0.saturating_sub((2.0 * tsc_hz) as u64);
        let before_rate = rate(&heartbeats(&serial_path), before_tsc, t0, tsc_hz);
        wait_recovered(&serial_path, before_rate, tsc_hz);
        eprintln!("bench: floor (protect all, un-protect on first fault, no copy)");
        let (f0, f1, floor_faults) = floor(&controller, Duration::from_secs_f64(snapshot_s), walk)?;
        std::thread::sleep(Duration::from_secs(3));
        eprintln!("bench: stopped save of the same VM");
        let start = Instant::now();
        let target = image::SaveTarget::File(img.clone());
        let opts = image::SaveOptions {
            format: image::SaveFormat::FixedRam,
            keep_running: true,
            channels,
            compression: None,
            progress: None,
            control: image::SaveControl::for_vm(&controller),
            disk_targets: Vec::new(),
        };
        let saved = image::save_vm(&controller, &target, &opts)
            .map_err(|e| CliError::failure(e.to_string()))?;
        let save_s = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&img);
        let beats = heartbeats(&serial_path);
        let before_from = t0.saturating_sub((2.0 * tsc_hz) as u64);
        let before = rate(&beats, before_from, t0, tsc_hz);
        let during = rate(&beats, t0, t1, tsc_hz);
        let after = rate(&beats, t1, t2, tsc_hz);
        let floor_rate = rate(&beats, f0, f1, tsc_hz);
        // From the snapshot's start to the pause (heartbeats are 100 ms apart).
        let to_pause = (stats.pre_arm_ms / 1000.0 * tsc_hz) as u64;
        let pre_arm_rate = rate(&beats, t0, t0 + to_pause, tsc_hz);
        let before_floor = rate(&beats, f0.saturating_sub((2.0 * tsc_hz) as u64), f0, tsc_hz);
        Ok(Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            mem_mib: a.mem_mib,
            fill_mib: a.fill_mib,
            pause_ms: stats.paused_ms,
            pause_stop_ms: stats.pause_stop_ms,
            pause_state_ms: stats.pause_state_ms,
            pause_reprotect_ms: stats.arm_ms,
            pause_resume_ms: stats.pause_resume_ms,
            blocks_reprotected_paused: stats.blocks_reprotected_paused,
            pre_arm_ms: stats.pre_arm_ms,
            pre_arm_faults: stats.pre_arm_faults,
            pre_arm_rounds: stats.pre_arm_rounds,
            blocks_reprotected_running: stats.blocks_reprotected_running,
            block_kib: a.block_kib,
            fault_kib: a.fault_kib,
            walkers: channels.channels,
            skip_unpopulated: walk.skip_unpopulated,
            thp: a.thp,
            load_average,
            snapshot_s,
            stopped_save_s: save_s,
            snapshot_over_stopped_save: snapshot_s / save_s,
            stopped_save_paused_s: saved.paused_ms / 1000.0,
            rate_before_pages_s: before,
            rate_during_pages_s: during,
            rate_after_pages_s: after,
            during_over_before: if before > 0.0 { during / before } else { 0.0 },
            rate_pre_arm_pages_s: pre_arm_rate,
            rate_floor_pages_s: floor_rate,
            rate_before_floor_pages_s: before_floor,
            floor_faults,
            during_over_floor: if floor_rate > 0.0 {
                during / floor_rate
            } else {
                0.0
            },
            blocks_by_walkers: stats.blocks_by_walkers,
            blocks_by_faults: stats.blocks_by_faults,
            pages_by_faults: stats.pages_by_faults,
            blocks_with_fault_pages: stats.blocks_with_fault_pages,
            fault_pages_peak: stats.fault_pages_peak,
            blocks_unpopulated: stats.blocks_unpopulated,
            faults: stats.faults,
            fault_latency_median_us: stats.fault_latency_median_us,
            fault_latency_p99_us: stats.fault_latency_p99_us,
            fault_latency_max_us: stats.fault_latency_max_us,
            wp_unpopulated: stats.wp_unpopulated,
        })
    })();
    stop.stop(microvm::VmExitReason::Stopped);
    let _ = runner.join();
    let _ = std::fs::remove_file(&serial_path);
    let r = result?;
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        println!(
            "cryo bench snapshot: {} MiB guest, {} vCPUs writing {} MiB as fast as they can",
            r.mem_mib, a.vcpus, r.fill_mib
        );
        println!(
            "  vCPU pause:        {:.1} ms = stop vCPUs {:.1} + device state {:.1} + re-protect {:.1} ({} blocks) + resume {:.1}",
            r.pause_ms, r.pause_stop_ms, r.pause_state_ms, r.pause_reprotect_ms, r.blocks_reprotected_paused, r.pause_resume_ms
        );
        println!(
            "  before the pause:  protect all {:.1} ms, {} guest writes let through, {} blocks re-protected in {} rounds; guest rate meanwhile {:.0} pages/s",
            r.pre_arm_ms, r.pre_arm_faults, r.blocks_reprotected_running, r.pre_arm_rounds, r.rate_pre_arm_pages_s
        );
        println!(
            "  live snapshot:     {:.2} s; stopped save of the same VM: {:.2} s (ratio {:.2})",
            r.snapshot_s, r.stopped_save_s, r.snapshot_over_stopped_save
        );
        println!(
            "  guest write rate:  before {:.0} pages/s, during {:.0} ({:.2} of before), after {:.0}",
            r.rate_before_pages_s, r.rate_during_pages_s, r.during_over_before, r.rate_after_pages_s
        );
        println!(
            "  floor (no copy):   {:.0} pages/s over the same time, {} KiB un-protected per fault ({} faults; before it {:.0}); snapshot / floor {:.2}",
            r.rate_floor_pages_s, r.fault_kib, r.floor_faults, r.rate_before_floor_pages_s, r.during_over_floor
        );
        println!(
            "  blocks:            {} KiB, {} walkers{}, never-populated blocks {} ({}); load average {:.2}",
            r.block_kib,
            r.walkers,
            if r.thp { ", THP advised" } else { "" },
            if r.skip_unpopulated { "skipped" } else { "read" },
            r.blocks_unpopulated,
            r.load_average
        );
        println!(
            "  blocks copied:     {} by walkers ({} with pages copied by faults), {} whole by faults ({} faults; latency median {:.0} us, p99 {:.0} us, max {:.0} us)",
            r.blocks_by_walkers, r.blocks_with_fault_pages, r.blocks_by_faults, r.faults, r.fault_latency_median_us, r.fault_latency_p99_us, r.fault_latency_max_us
        );
        println!(
            "  pages copied:      {} by faults ({} KiB each time), at most {} held at once",
            r.pages_by_faults, r.fault_kib, r.fault_pages_peak
        );
    }
    Ok(())
}
