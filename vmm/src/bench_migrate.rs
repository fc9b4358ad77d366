//! `cryo bench migrate`: live migration over loopback TCP of a guest that
//! writes at several rates, beside a stopped migration (`save --to tcp:`) of
//! the same guest over the same link, against the loopback bandwidth
//! measured in the same run.
//!
//! The guest is the test kernel: each vCPU fills its share of `--hot-mib`
//! with incompressible data, then rewrites random pages of it at the given
//! rate, printing a heartbeat (its TSC and running write count) every
//! `--hb-ms`. The destination is a `cryo restore --listen` child process
//! whose console goes to a file. On these hosts the guest TSC is the host
//! TSC (no offset), so the source's and the destination's heartbeats lie on
//! one time line: the gap between the last heartbeat on the source and the
//! first on the destination, less one interval (the one the guest kept before: a starved guest beats less often than asked), is the downtime the guest
//! saw.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use microvm::{BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig, VmController};
use serde::Serialize;

use crate::bench_migtrace::{steps_during, thread_time, Sampler, ThreadTime};
use crate::bench_snapshot::{heartbeat_stamps, heartbeats, rate as write_rate, rdtsc, wait_for};
use crate::error::CliError;
use crate::image::precopy::{self, Step, StepKind};
use crate::image::{self};

/// Arguments of `cryo bench migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 4096)]
    pub mem_mib: u64,
    /// MiB of guest RAM the guest fills and keeps rewriting (split over the vCPUs).
    #[arg(long, default_value_t = 3072)]
    pub hot_mib: u64,
    /// Write rates to measure, page rewrites per second per vCPU, comma
    /// separated; 0 = as fast as the guest can.
    #[arg(long, value_delimiter = ',', default_value = "1,5000,0")]
    pub rates: Vec<u32>,
    /// Data channels of both migrations.
    #[arg(long, default_value_t = 2)]
    pub channels: usize,
    /// Downtime limit of the live migration, ms.
    #[arg(long, default_value_t = 50)]
    pub max_downtime_ms: u64,
    /// Link limit of the flat-out rate's live migration, MB/s; 0: half the
    /// rate the guest writes at just before it, so that the guest out-writes
    /// the link and auto-converge has to engage (a guest on a busy host may
    /// write slower than loopback carries), but at least what sends the hot
    /// set in 60 s (a starved guest's half rate would make the first pass
    /// outlast the bench).
    #[arg(long, default_value_t = 0)]
    pub flat_out_link_mb_s: u64,
    /// Give a live migration up after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_s: u64,
    /// The guest's heartbeat interval, ms (short, so that a gap shows).
    #[arg(long, default_value_t = 10)]
    pub hb_ms: u64,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Keep the guests' consoles and the destinations' logs in --dir (for
    /// tracing a gap), instead of removing them.
    #[arg(long)]
    pub keep_files: bool,
    /// Do not migrate each rate's guest with QEMU too. By default QEMU
    /// (`qemu-system-x86_64`, multifd and auto-converge, the same channels,
    /// downtime limit and link limit) migrates the same test kernel right
    /// after cryo, and a missing QEMU is reported in the table.
    #[arg(long)]
    pub no_qemu: bool,
    /// Fault the destinations' memory in before each migration starts,
    /// outside its total time: cryo's with `restore --listen
    /// --prealloc-mib`, QEMU's with `-mem-prealloc` on both ends (QEMU's
    /// first pass then also reads never-touched guest pages without
    /// faulting them in; cryo skips those unread anyway). Without it (both
    /// VMMs' default), receiving faults the memory in page by page, which
    /// costs seconds per GiB on hosts where fresh memory is slow.
    #[arg(long)]
    pub prealloc: bool,
    /// Who goes first for the host's CPUs during cryo's live migrations
    /// (`cryo migrate --priority`): guest (cryo's default) or transfer
    /// (QEMU's way: its migration threads run at the vCPUs' priority).
    #[arg(long, value_enum, default_value = "guest", value_name = "WHO")]
    pub priority: crate::cli::PriorityChoice,
    /// Where the files go, the output form and the kernel.
    #[command(flatten)]
    pub common: crate::bench::BenchCommon,
}

/// One write rate's figures.
#[derive(Serialize, Default)]
struct RateReport {
    rate_pages_s_per_vcpu: u32,
    live_ok: bool,
    live_error: Option<String>,
    /// The guest-visible downtime: the largest gap, over the vCPUs, from a
    /// vCPU's last heartbeat on the source to its first on the destination
    /// (TSC stamps, one host TSC), nothing subtracted.
    live_switch_gap_ms: f64,
    /// The vCPU whose switch gap that is.
    live_switch_cpu: u64,
    /// Where the switch gap went.
    live_switch: SwitchParts,
    /// The largest gap between two heartbeats of one vCPU on the source
    /// from a second before the migration to its pause (nothing subtracted).
    live_precopy_stall_ms: f64,
    /// When that gap opened, seconds after the migration started.
    live_precopy_stall_at_s: f64,
    /// The vCPU that saw it.
    live_precopy_stall_cpu: u64,
    /// The pre-copy steps under way during it.
    live_precopy_stall_during: String,
    /// What each vCPU's thread did during it (empty: no samples).
    live_precopy_stall_sched: Vec<ThreadTime>,
    /// The switch gap less the heartbeat interval the guest kept before.
    live_guest_downtime_ms: f64,
    live_largest_gap_ms: f64,
    /// When the largest gap opened, seconds after the migration started
    /// (negative: before it).
    live_largest_gap_at_s: f64,
    /// The heartbeat interval the guest kept before the live migration
    /// (median), which the gaps above are given less of.
    beat_interval_ms: f64,
    baseline_largest_gap_ms: f64,
    live_paused_ms: f64,
    live_total_s: f64,
    live_rounds: u32,
    live_bytes_over_ram: f64,
    live_throttle_percent: u32,
    /// The link limit of the live migration, MB/s (0: none).
    live_max_bandwidth_mb_s: f64,
    live_gb_s_over_loopback: f64,
    write_rate_before_pages_s: f64,
    write_rate_during_pages_s: f64,
    during_over_before: f64,
    stopped_guest_downtime_ms: f64,
    stopped_paused_ms: f64,
    stopped_total_s: f64,
    stopped_gb_s_over_loopback: f64,
    /// QEMU's live migration of the same guest, right after cryo's (None:
    /// `--no-qemu`).
    qemu: Option<crate::bench_qemu::QemuFigures>,
    /// cryo's live total time over QEMU's (0: not both ran).
    total_over_qemu: f64,
    /// cryo's live bytes sent over QEMU's (0: not both ran).
    bytes_over_qemu: f64,
}

impl RateReport {
    /// A report with no figures yet (all zero), failed with `error` unless
    /// filled in.
    fn failed(rate: u32, error: String) -> RateReport {
        RateReport {
            rate_pages_s_per_vcpu: rate,
            live_error: (!error.is_empty()).then_some(error),
            ..Default::default()
        }
    }
}

/// The parts of the switch gap, ms, in order: the guest still ran on the
/// source after its last heartbeat, cryo paused it and captured its state,
/// fetched the dirty log, sent the last round and the device state and got
/// the ACK; then the destination built and resumed the VM and the guest
/// printed its first heartbeat there.
#[derive(Serialize, Default, Debug)]
struct SwitchParts {
    /// From the vCPU's last heartbeat on the source to the pause request.
    ran_after_last_beat_ms: f64,
    /// The pre-copy steps under way in that stretch.
    ran_after_last_beat_during: String,
    /// What each vCPU's thread did in that stretch (empty: no samples).
    ran_after_last_beat_sched: Vec<ThreadTime>,
    /// Pausing the vCPUs and capturing the VM's state.
    pause_ms: f64,
    /// The dirty log fetched with the VM paused.
    last_fetch_ms: f64,
    /// The last round.
    last_round_ms: f64,
    /// Pages in it.
    last_round_pages: u64,
    /// The device state and END sent, the destination's checks, its ACK.
    finish_ms: f64,
    /// From the ACK to the vCPU's first heartbeat on the destination.
    ack_to_first_beat_ms: f64,
    /// Of that, the destination building and starting the VM after the
    /// transfer (its log's "guest resumed after" less "memory ready after").
    dest_resume_ms: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    mem_mib: u64,
    hot_mib: u64,
    channels: usize,
    max_downtime_ms: u64,
    hb_ms: u64,
    /// Who went first for the CPUs during cryo's live migrations.
    priority: precopy::CpuPriority,
    loopback_gb_s: f64,
    rates: Vec<RateReport>,
}

/// Runs the migration benchmark.
pub fn run(a: MigrateArgs) -> Result<(), CliError> {
    check_args(&a)?;
    let kernel = a.common.prepare()?;
    eprintln!("bench: loopback TCP bandwidth, {} streams", a.channels);
    let loopback = loopback_bandwidth(a.channels, 1 << 30)?;
    let mut rates = Vec::new();
    for &r in &a.rates {
        // A rate that fails is reported as such; the others still run.
        let mut report = one_rate(&a, kernel.path(), r, loopback)
            .unwrap_or_else(|e| RateReport::failed(r, e.to_string()));
        if !a.no_qemu {
            beside_qemu(&a, kernel.path(), &mut report);
        }
        eprintln!(
            "bench: rate {r}: {}",
            serde_json::to_string(&report).unwrap_or_default()
        );
        rates.push(report);
    }
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        mem_mib: a.mem_mib,
        hot_mib: a.hot_mib,
        channels: a.channels,
        max_downtime_ms: a.max_downtime_ms,
        hb_ms: a.hb_ms,
        priority: a.priority.into(),
        loopback_gb_s: loopback / 1e9,
        rates,
    };
    crate::bench::print_report(a.common.json, &report, print_table);
    Ok(())
}

fn check_args(a: &MigrateArgs) -> Result<(), CliError> {
    if a.vcpus == 0 || a.vcpus > 64 {
        return Err(CliError::bad_input("--vcpus takes 1 to 64"));
    }
    if a.channels == 0 || a.channels > 64 {
        return Err(CliError::bad_input("--channels takes 1 to 64"));
    }
    if a.hot_mib + 64 > a.mem_mib {
        return Err(CliError::bad_input(
            "--hot-mib must leave 64 MiB of --mem-mib free",
        ));
    }
    if a.hb_ms == 0 || a.rates.is_empty() {
        return Err(CliError::bad_input(
            "--hb-ms and --rates must not be empty or 0",
        ));
    }
    Ok(())
}

/// Bytes per second that `streams` loopback TCP connections carry together,
/// each sending `bytes_each` in 4 MiB writes.
fn loopback_bandwidth(streams: usize, bytes_each: u64) -> Result<f64, CliError> {
    let io = |what: &'static str| {
        move |e: std::io::Error| CliError::failure(format!("measuring loopback TCP: {what}: {e}"))
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen"))?;
    let addr = listener.local_addr().map_err(io("address"))?;
    let senders = (0..streams)
        .map(|_| TcpStream::connect(addr))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("connect"))?;
    let receivers = (0..streams)
        .map(|_| listener.accept().map(|(c, _)| c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("accept"))?;
    let start = Instant::now();
    let received: u64 = std::thread::scope(|s| {
        let rx: Vec<_> = receivers
            .into_iter()
            .map(|c| s.spawn(|| drain(c)))
            .collect();
        for c in senders {
            s.spawn(move || send(c, bytes_each));
        }
        rx.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    if received < streams as u64 * bytes_each {
        return Err(CliError::failure(
            "measuring loopback TCP: a stream broke off",
        ));
    }
    Ok(received as f64 / secs.max(1e-9))
}

/// Sends `bytes` over `conn` (then closes it).
fn send(mut conn: TcpStream, bytes: u64) {
    let buf: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut left = bytes;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if conn.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// Reads `conn` to its end; the bytes read.
fn drain(mut conn: TcpStream) -> u64 {
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0;
    while let Ok(k) = conn.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// Migrates the guest of `r`'s rate with QEMU too (the link held as cryo's
/// was) and sets the ratios of cryo's figures to QEMU's.
fn beside_qemu(a: &MigrateArgs, kernel: &Path, r: &mut RateReport) {
    eprintln!(
        "bench: the same guest in QEMU ({})",
        crate::bench_qemu::QEMU
    );
    let q = crate::bench_qemu::migrate(&crate::bench_qemu::QemuShape {
        dir: &a.common.dir,
        kernel,
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        cmdline: guest_cmdline(a, r.rate_pages_s_per_vcpu),
        channels: a.channels,
        max_downtime_ms: a.max_downtime_ms,
        max_bandwidth: (r.live_max_bandwidth_mb_s > 0.0)
            .then_some((r.live_max_bandwidth_mb_s * 1e6) as u64),
        timeout: Duration::from_secs(a.timeout_s),
        prealloc: a.prealloc,
    });
    if q.ok && r.live_ok {
        r.total_over_qemu = r.live_total_s / q.total_s.max(1e-9);
        r.bytes_over_qemu = r.live_bytes_over_ram / q.bytes_over_ram.max(1e-9);
    }
    r.qemu = Some(q);
}

/// The test kernel's command line for a guest writing at `rate`.
fn guest_cmdline(a: &MigrateArgs, rate: u32) -> String {
    let per_cpu = a.hot_mib / u64::from(a.vcpus);
    format!(
        "console=ttyS0 cryo.mem={per_cpu} cryo.rate={rate} cryo.hb_ms={}",
        a.hb_ms
    )
}

/// The source VM, running in this process, its console in a file.
struct Source {
    controller: VmController,
    stop: microvm::StopHandle,
    runner: Option<std::thread::JoinHandle<Result<microvm::VmExitReason, microvm::Error>>>,
    serial: PathBuf,
    tsc_hz: f64,
    keep: bool,
    rate: u32,
}

impl Source {
    fn boot(a: &MigrateArgs, kernel: &Path, rate: u32) -> Result<Source, CliError> {
        let (serial, file) = a.common.create(&format!(".cryo-bench-mig-src-{rate}"))?;
        let mut vm = MicroVm::new(VmConfig {
            vcpus: a.vcpus,
            mem_mib: a.mem_mib,
            backing: MemoryBacking::Anonymous,
            boot: BootSource {
                kernel: kernel.to_path_buf(),
                cmdline: guest_cmdline(a, rate),
                ..Default::default()
            },
            serial: SerialOutput::File(file),
            serial_input: false,
            disks: Vec::new(),
            nets: Vec::new(),
        })?;
        let controller = vm.controller()?;
        let stop = vm.stop_handle();
        let runner = Some(std::thread::spawn(move || vm.run(Vec::new())));
        let tsc_khz = controller.call(|vm| vm.machine().tsc_khz)?;
        Ok(Source {
            controller,
            stop,
            runner,
            serial,
            keep: a.keep_files,
            rate,
            tsc_hz: f64::from(tsc_khz.max(1)) * 1000.0,
        })
    }

    fn ms(&self, ticks: u64) -> f64 {
        ticks as f64 / self.tsc_hz * 1e3
    }

    /// Ms from tsc `from` to tsc `to` (negative when `to` is earlier).
    fn ms_between(&self, from: u64, to: u64) -> f64 {
        (to as f64 - from as f64) / self.tsc_hz * 1e3
    }

    fn ticks(&self, d: Duration) -> u64 {
        (d.as_secs_f64() * self.tsc_hz) as u64
    }

    /// The heartbeat interval the guest kept in the 2 s before `t0`, ms:
    /// the one asked for, or longer when the guest is starved of CPU. A gap
    /// less this interval is time the guest lost.
    fn beat_interval_ms(&self, a: &MigrateArgs, beats: &[(u64, u64, u64)], t0: u64) -> f64 {
        let from = t0.saturating_sub(self.ticks(Duration::from_secs(2)));
        self.ms(median_interval(beats, from, t0))
            .max(a.hb_ms as f64)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.stop(microvm::VmExitReason::Stopped);
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
        if !self.keep {
            let _ = std::fs::remove_file(&self.serial);
        }
    }
}

/// A `cryo restore --listen tcp:127.0.0.1:PORT` child process, its console
/// in a file; killed on drop.
struct Destination {
    child: Child,
    endpoint: multifd::Endpoint,
    serial: PathBuf,
    log: PathBuf,
    keep: bool,
}

impl Destination {
    fn spawn(a: &MigrateArgs, tag: &str) -> Result<Destination, CliError> {
        let dir = &a.common.dir;
        let fail = |what: &str, e: std::io::Error| CliError::failure(format!("{what}: {e}"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| fail("finding a free port", e))?
            .port();
        let base = dir.join(format!(".cryo-bench-mig-{tag}-{}", std::process::id()));
        let (serial, log) = (base.with_extension("console"), base.with_extension("log"));
        let out = File::create(&serial).map_err(|e| fail("console file", e))?;
        let err = File::create(&log).map_err(|e| fail("log file", e))?;
        let exe = std::env::current_exe().map_err(|e| fail("finding the cryo binary", e))?;
        let listen = format!("tcp:127.0.0.1:{port}");
        // Its log traces the destination's part of the switch.
        let mut cmd = Command::new(exe);
        cmd.args(["restore", "--listen", &listen]);
        if a.prealloc {
            cmd.args(["--prealloc-mib", &a.mem_mib.to_string()]);
        }
        let child = cmd
            .env("RUST_LOG", "info,microvm::vm=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| fail("starting cryo restore --listen", e))?;
        let endpoint =
            multifd::parse_endpoint(&listen).map_err(|e| CliError::failure(e.to_string()))?;
        let d = Destination {
            child,
            endpoint,
            serial,
            log,
            keep: a.keep_files,
        };
        // Faulting memory in ahead may take minutes where it is slow.
        wait_for(
            &d.log,
            "waiting for a migration",
            1,
            Duration::from_secs(if a.prealloc { 900 } else { 60 }),
        )?;
        Ok(d)
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_file(&self.serial);
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Per vCPU, the heartbeats (tsc) in `[from, to]`, sorted.
fn beats_by_cpu(beats: &[(u64, u64, u64)], from: u64, to: u64) -> Vec<Vec<u64>> {
    let mut by: Vec<Vec<u64>> = Vec::new();
    for &(cpu, tsc, _) in beats.iter().filter(|b| b.1 >= from && b.1 <= to) {
        let i = usize::try_from(cpu).unwrap_or(0).min(63);
        if by.len() <= i {
            by.resize(i + 1, Vec::new());
        }
        by[i].push(tsc);
    }
    for b in &mut by {
        b.sort_unstable();
    }
    by
}

/// The largest gap between consecutive heartbeats of one vCPU, in ticks.
fn largest_gap(beats: &[(u64, u64, u64)], from: u64, to: u64) -> u64 {
    largest_gap_at(beats, from, to).gap
}

/// A gap between two heartbeats of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Gap {
    /// Its length, ticks.
    gap: u64,
    /// The tsc of the heartbeat that opened it.
    at: u64,
    /// The vCPU.
    cpu: usize,
}

/// [`largest_gap`], when it opened and on which vCPU (all 0: none).
fn largest_gap_at(beats: &[(u64, u64, u64)], from: u64, to: u64) -> Gap {
    beats_by_cpu(beats, from, to)
        .iter()
        .enumerate()
        .flat_map(|(cpu, b)| {
            b.windows(2).map(move |w| Gap {
                gap: w[1] - w[0],
                at: w[0],
                cpu,
            })
        })
        .max_by_key(|g| g.gap)
        .unwrap_or_default()
}

/// The median interval between consecutive heartbeats of one vCPU in
/// `[from, to]`, in ticks (0: fewer than two beats). A guest starved of CPU
/// beats less often than it asks to; this is the interval it really kept.
fn median_interval(beats: &[(u64, u64, u64)], from: u64, to: u64) -> u64 {
    let mut all: Vec<u64> = beats_by_cpu(beats, from, to)
        .iter()
        .flat_map(|b| b.windows(2).map(|w| w[1] - w[0]))
        .collect();
    all.sort_unstable();
    all.get(all.len() / 2).copied().unwrap_or(0)
}

/// The largest gap, over the vCPUs, across the pause at tsc `pause`: from
/// a vCPU's last heartbeat stamp before it to its first after it. `beats`
/// holds the source's and the destination's stamps together: a vCPU paused
/// while it waited for the guest's console lock took its stamp on the
/// source and prints it on the destination.
fn switch_gap(beats: &[(u64, u64, u64)], pause: u64) -> Gap {
    beats_by_cpu(beats, 0, u64::MAX)
        .iter()
        .enumerate()
        .filter_map(|(cpu, b)| {
            let at = *b.iter().rev().find(|t| **t <= pause)?;
            let gap = b.iter().find(|t| **t > pause)? - at;
            Some(Gap { gap, at, cpu })
        })
        .max_by_key(|g| g.gap)
        .unwrap_or_default()
}

/// When the pre-copy paused the VM, ms after its start (0: never).
fn pause_ms(steps: &[Step]) -> f64 {
    steps
        .iter()
        .find(|s| s.kind == StepKind::Pause)
        .map_or(0.0, |s| s.start_ms)
}

/// Waits until every one of `vcpus` stamped a heartbeat after tsc `pause`
/// in the console `serial` (the destination's).
pub(crate) fn wait_beats_after(
    serial: &Path,
    vcpus: u8,
    pause: u64,
    timeout: Duration,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(serial).is_ok_and(|t| t.contains("MISMATCH")) {
            return Err(CliError::failure(
                "the destination's guest reported a MISMATCH",
            ));
        }
        let stamps = heartbeat_stamps(serial);
        let beat = |cpu: u64| stamps.iter().any(|&(c, t, _)| c == cpu && t > pause);
        if (0..u64::from(vcpus)).all(beat) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::failure(
                "the destination's guest did not beat on every vCPU in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Figures of a stopped migration: (guest-visible downtime ms, cryo's
/// pause ms, total s, bytes sent).
fn stopped(a: &MigrateArgs, src: &Source) -> Result<(f64, f64, f64, u64), CliError> {
    let dest = Destination::spawn(a, &format!("stopped-{}", src.rate))?;
    eprintln!("bench: stopped migration (save --to {})", dest.endpoint);
    let t0 = rdtsc();
    let opts = image::SaveOptions {
        format: image::SaveFormat::FixedRam,
        keep_running: true,
        channels: image::fixed::ChannelOptions {
            channels: a.channels,
            ..Default::default()
        },
        compression: None,
        progress: None,
        control: image::SaveControl::for_vm(&src.controller),
        disk_targets: Vec::new(),
    };
    let target = image::SaveTarget::Peer(dest.endpoint.clone());
    let stats = image::save_vm(&src.controller, &target, &opts)?;
    let t1 = rdtsc();
    std::thread::sleep(Duration::from_secs(1));
    drop(dest);
    // From a second before the pause: the last heartbeat before it counts.
    let second = src.ticks(Duration::from_secs(1));
    let beats = heartbeats(&src.serial);
    let gap = largest_gap(&beats, t0.saturating_sub(second), t1 + second);
    let interval = src.beat_interval_ms(a, &beats, t0);
    Ok((
        src.ms(gap) - interval,
        stats.paused_ms,
        stats.total_ms / 1e3,
        stats.bytes,
    ))
}

/// Waits until every one of `vcpus` of the guest printing to `console` has
/// filled its share: its heartbeats count rewrites, which start once the
/// fill is over.
pub(crate) fn wait_writing(console: &Path, vcpus: u8, timeout: Duration) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let beats = heartbeats(console);
        let writing = (0..u64::from(vcpus))
            .all(|cpu| beats.iter().any(|&(c, _, writes)| c == cpu && writes > 0));
        if writing {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError::failure(
                "the guest did not finish its fill in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Boots a guest writing at `rate`, lets it fill its hot set, then migrates
/// it stopped (it runs on) and live.
fn one_rate(
    a: &MigrateArgs,
    kernel: &Path,
    rate: u32,
    loopback: f64,
) -> Result<RateReport, CliError> {
    eprintln!(
        "bench: booting a {} MiB guest that fills {} MiB and rewrites {} pages/s per vCPU",
        a.mem_mib,
        a.hot_mib,
        if rate == 0 {
            "as many".to_string()
        } else {
            rate.to_string()
        }
    );
    let src = Source::boot(a, kernel, rate)?;
    wait_writing(&src.serial, a.vcpus, Duration::from_secs(1200))?;
    std::thread::sleep(Duration::from_secs(2));
    let (stopped_gap, stopped_paused, stopped_s, stopped_bytes) = stopped(a, &src)?;
    std::thread::sleep(Duration::from_secs(2));
    let mut r = live(a, &src, rate, loopback)?;
    r.stopped_guest_downtime_ms = stopped_gap;
    r.stopped_paused_ms = stopped_paused;
    r.stopped_total_s = stopped_s;
    r.stopped_gb_s_over_loopback = stopped_bytes as f64 / stopped_s.max(1e-9) / loopback;
    Ok(r)
}

/// The flat-out rate's link limit, bytes/s: `--flat-out-link-mb-s`, or half
/// what the guest wrote over the last 2 s, at least the hot set in 60 s.
fn flat_out_link(a: &MigrateArgs, src: &Source) -> u64 {
    if a.flat_out_link_mb_s > 0 {
        return a.flat_out_link_mb_s * 1_000_000;
    }
    let now = rdtsc();
    let from = now.saturating_sub(src.ticks(Duration::from_secs(2)));
    let pages_s = write_rate(&heartbeats(&src.serial), from, now, src.tsc_hz);
    let hot_in_a_minute = (a.hot_mib << 20) / 60;
    ((pages_s * 4096.0 / 2.0) as u64).max(hot_in_a_minute)
}

/// The live migration of `src` and what the guest saw of it.
fn live(a: &MigrateArgs, src: &Source, rate: u32, loopback: f64) -> Result<RateReport, CliError> {
    // Sampling from a second before the start: a stall may open before it.
    let sampler = Sampler::start();
    let dest = Destination::spawn(a, &format!("live-{rate}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let max_bandwidth = (rate == 0).then(|| flat_out_link(a, src));
    eprintln!(
        "bench: live migration to {}{}",
        dest.endpoint,
        max_bandwidth.map_or(String::new(), |b| format!(
            ", link held to {:.1} MB/s",
            b as f64 / 1e6
        ))
    );
    let opts = precopy::MigrateOptions {
        channels: a.channels,
        compression: None,
        max_downtime_ms: a.max_downtime_ms,
        max_bandwidth,
        timeout: Some(Duration::from_secs(a.timeout_s)),
        priority: a.priority.into(),
    };
    let t0 = rdtsc();
    let start = Instant::now();
    let result = precopy::migrate_vm(
        &src.controller,
        &dest.endpoint,
        &opts,
        &image::SaveControl::default(),
        None,
    );
    let total_s = start.elapsed().as_secs_f64();
    let t1 = rdtsc();
    let samples = sampler.finish();
    let before = heartbeats(&src.serial);
    let rate_before = write_rate(
        &before,
        t0.saturating_sub(src.ticks(Duration::from_secs(2))),
        t0,
        src.tsc_hz,
    );
    let rate_during = write_rate(&before, t0, t1, src.tsc_hz);
    let mut r = RateReport::failed(rate, String::new());
    r.live_max_bandwidth_mb_s = max_bandwidth.map_or(0.0, |b| b as f64 / 1e6);
    r.live_ok = result.is_ok();
    r.live_error = result.as_ref().err().map(ToString::to_string);
    r.live_total_s = total_s;
    r.write_rate_before_pages_s = rate_before;
    r.write_rate_during_pages_s = rate_during;
    r.during_over_before = if rate_before > 0.0 {
        rate_during / rate_before
    } else {
        0.0
    };
    if let Ok(stats) = result {
        let pause = t0 + src.ticks(Duration::from_secs_f64(pause_ms(&stats.steps) / 1e3));
        wait_beats_after(&dest.serial, a.vcpus, pause, Duration::from_secs(60))?;
        let interval = src.beat_interval_ms(a, &before, t0);
        r.beat_interval_ms = interval;
        // Every stamp, from both consoles (lines cut by the pause count:
        // the guest ran then).
        let mut stamps = heartbeat_stamps(&src.serial);
        stamps.extend(heartbeat_stamps(&dest.serial));
        let trace = Trace {
            src,
            t0,
            beats: &stamps,
            samples: &samples,
            steps: &stats.steps,
        };
        let switch = switch_gap(&stamps, pause);
        r.live_switch_gap_ms = src.ms(switch.gap);
        r.live_switch_cpu = switch.cpu as u64;
        r.live_switch = trace.switch_parts(switch, dest_resume_ms(&dest.log));
        trace.precopy_stall(&mut r);
        r.live_guest_downtime_ms = src.ms(switch.gap) - interval;
        let from = t0.saturating_sub(src.ticks(Duration::from_secs(1)));
        let noise_from = t0.saturating_sub(src.ticks(Duration::from_secs(2)));
        r.baseline_largest_gap_ms = src.ms(largest_gap(&before, noise_from, t0)) - interval;
        let g = largest_gap_at(&before, from, t1);
        r.live_largest_gap_ms = src.ms(g.gap) - interval;
        r.live_largest_gap_at_s = src.ms_between(t0, g.at) / 1e3;
        r.live_paused_ms = stats.downtime_ms;
        r.live_rounds = stats.rounds;
        r.live_bytes_over_ram = stats.bytes as f64 / stats.ram_bytes.max(1) as f64;
        r.live_throttle_percent = stats.throttle_percent;
        r.live_gb_s_over_loopback = stats.bytes as f64 / total_s.max(1e-9) / loopback;
    }
    Ok(r)
}

/// What a live migration left to trace its gaps with: the source's
/// heartbeats, the vCPU threads' scheduler samples and the pre-copy's steps,
/// on the TSC time line that starts at `t0` (the pre-copy's start).
struct Trace<'a> {
    src: &'a Source,
    t0: u64,
    beats: &'a [(u64, u64, u64)],
    samples: &'a [(u64, Vec<(u64, u64)>)],
    steps: &'a [Step],
}

impl Trace<'_> {
    /// The first step of `kind` (all zero: none).
    fn step(&self, kind: StepKind) -> Step {
        self.steps
            .iter()
            .find(|s| s.kind == kind)
            .copied()
            .unwrap_or(Step {
                kind,
                round: 0,
                start_ms: 0.0,
                ms: 0.0,
                pages: 0,
            })
    }

    /// The tsc `ms` after the pre-copy's start.
    fn tsc_at(&self, ms: f64) -> u64 {
        self.t0 + self.src.ticks(Duration::from_secs_f64(ms.max(0.0) / 1e3))
    }

    /// Splits the switch gap `g` (last source beat to first destination
    /// beat) at the stop-and-copy's steps.
    fn switch_parts(&self, g: Gap, dest_resume_ms: f64) -> SwitchParts {
        let pause = self.step(StepKind::Pause);
        let finish = self.step(StepKind::Finish);
        let last = self.step(StepKind::LastRound);
        let ack = self.tsc_at(finish.start_ms + finish.ms);
        let paused_at = self.tsc_at(pause.start_ms);
        SwitchParts {
            ran_after_last_beat_ms: self.src.ms_between(g.at, paused_at),
            ran_after_last_beat_during: steps_during(
                self.steps,
                self.src.ms_between(self.t0, g.at),
                pause.start_ms,
            ),
            ran_after_last_beat_sched: self.sched(g.at, paused_at),
            pause_ms: pause.ms,
            last_fetch_ms: self.step(StepKind::LastFetch).ms,
            last_round_ms: last.ms,
            last_round_pages: last.pages,
            finish_ms: finish.ms,
            ack_to_first_beat_ms: self.src.ms_between(ack, g.at + g.gap),
            dest_resume_ms,
        }
    }

    /// The largest gap on the source before the pause, when, during which
    /// steps, and what the vCPU's thread did meanwhile.
    fn precopy_stall(&self, r: &mut RateReport) {
        let pause = self.tsc_at(pause_ms(self.steps));
        let from = self
            .t0
            .saturating_sub(self.src.ticks(Duration::from_secs(1)));
        let g = largest_gap_at(self.beats, from, pause);
        let (a, b) = (
            self.src.ms_between(self.t0, g.at),
            self.src.ms_between(self.t0, g.at + g.gap),
        );
        r.live_precopy_stall_ms = self.src.ms(g.gap);
        r.live_precopy_stall_at_s = a / 1e3;
        r.live_precopy_stall_cpu = g.cpu as u64;
        r.live_precopy_stall_during = steps_during(self.steps, a, b);
        r.live_precopy_stall_sched = self.sched(g.at, g.at + g.gap);
    }

    /// What each vCPU's thread did between tsc `from` and `to`.
    fn sched(&self, from: u64, to: u64) -> Vec<ThreadTime> {
        (0..)
            .map_while(|cpu| thread_time(self.samples, cpu, from, to, self.src.tsc_hz))
            .collect()
    }
}

/// The destination's time from its memory being ready to the guest
/// resumed, ms, from its log line (0: not found).
fn dest_resume_ms(log: &Path) -> f64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let after = |key: &str| -> Option<f64> {
        let rest = &text[text.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    match (after("guest resumed after "), after("memory ready after ")) {
        (Some(resumed), Some(ready)) => resumed - ready,
        _ => 0.0,
    }
}

fn print_table(r: &Report) {
    println!(
        "cryo bench migrate: {} MiB guest, {} MiB hot, loopback TCP, {} channels, --max-downtime-ms {}, heartbeat every {} ms, cryo's --priority {}",
        r.mem_mib,
        r.hot_mib,
        r.channels,
        r.max_downtime_ms,
        r.hb_ms,
        match r.priority {
            precopy::CpuPriority::Guest => "guest",
            precopy::CpuPriority::Transfer => "transfer",
        }
    );
    println!(
        "  loopback TCP, {} streams (measured in this run): {:.2} GB/s",
        r.channels, r.loopback_gb_s
    );
    for x in &r.rates {
        let rate = match x.rate_pages_s_per_vcpu {
            0 => "flat out".to_string(),
            n => format!("{n} pages/s/vCPU"),
        };
        println!("  guest writing {rate}:");
        if x.live_max_bandwidth_mb_s > 0.0 {
            println!(
                "    link held to {:.1} MB/s for the live migration (the stopped one is not held)",
                x.live_max_bandwidth_mb_s
            );
        }
        match &x.live_error {
            Some(e) => println!("    live:    failed: {e} (after {:.1} s)", x.live_total_s),
            None => println!(
                "    live:    guest-visible downtime (switch gap) {:.1} ms, {:.1} ms less the beat interval (cryo's pause {:.1} ms), total {:.2} s, {} rounds, sent {:.2}x RAM, throttle {}%, {:.2}x loopback; largest heartbeat gap while migrating {:.1} ms (at {:+.2} s)",
                x.live_switch_gap_ms, x.live_guest_downtime_ms, x.live_paused_ms, x.live_total_s, x.live_rounds,
                x.live_bytes_over_ram, x.live_throttle_percent, x.live_gb_s_over_loopback,
                x.live_largest_gap_ms, x.live_largest_gap_at_s
            ),
        }
        if x.live_ok {
            print_gaps(x);
        }
        println!(
            "    heartbeat noise floor: largest gap in the 2 s before the live migration {:.1} ms; gaps are given less the interval the guest kept then, {:.1} ms",
            x.baseline_largest_gap_ms, x.beat_interval_ms
        );
        println!(
            "    guest writes during the migration: {:.0} pages/s, {:.2} of before ({:.0})",
            x.write_rate_during_pages_s, x.during_over_before, x.write_rate_before_pages_s
        );
        println!(
            "    stopped: guest-visible downtime {:.1} ms (cryo's pause {:.1} ms), total {:.2} s, {:.2}x loopback",
            x.stopped_guest_downtime_ms, x.stopped_paused_ms, x.stopped_total_s, x.stopped_gb_s_over_loopback
        );
        if let Some(q) = &x.qemu {
            print_qemu(x, q);
        }
    }
}

/// QEMU's live migration of the same guest, and cryo's against it.
fn print_qemu(x: &RateReport, q: &crate::bench_qemu::QemuFigures) {
    match &q.error {
        Some(e) => println!("    QEMU live: not measured: {e}"),
        None => println!(
            "    QEMU live ({}): its downtime {:.1} ms, total {:.2} s, {} rounds, sent {:.2}x RAM, throttle {}%, guest writes during {:.2} of before",
            q.version, q.downtime_ms, q.total_s, q.rounds, q.bytes_over_ram, q.throttle_percent, q.during_over_before
        ),
    }
    if x.total_over_qemu > 0.0 {
        println!(
            "    cryo live / QEMU live: total time {:.2}x, bytes sent {:.2}x, pause {:.2}x",
            x.total_over_qemu,
            x.bytes_over_qemu,
            x.live_paused_ms / q.downtime_ms.max(1e-9)
        );
    }
}

/// The switch gap and the pre-copy stall of one rate, with their parts.
fn print_gaps(x: &RateReport) {
    let s = &x.live_switch;
    println!(
        "    switch gap (last source heartbeat to first destination heartbeat) {:.1} ms: ran on after its last beat {:.1}, pause+state {:.1}, last fetch {:.1}, last round {:.1} ({} pages), state+END+ACK {:.1}, ACK to first beat {:.1} (destination building and starting the VM {:.1})",
        x.live_switch_gap_ms, s.ran_after_last_beat_ms, s.pause_ms, s.last_fetch_ms,
        s.last_round_ms, s.last_round_pages, s.finish_ms, s.ack_to_first_beat_ms, s.dest_resume_ms
    );
    if s.ran_after_last_beat_ms > 2.0 * x.beat_interval_ms {
        println!(
            "      vCPU {} ran on {:.1} ms after its last beat, during {}",
            x.live_switch_cpu, s.ran_after_last_beat_ms, s.ran_after_last_beat_during
        );
        print_sched(&s.ran_after_last_beat_sched);
    }
    println!(
        "    largest pre-copy stall {:.1} ms on vCPU {} at {:+.2} s, during {}",
        x.live_precopy_stall_ms,
        x.live_precopy_stall_cpu,
        x.live_precopy_stall_at_s,
        x.live_precopy_stall_during
    );
    print_sched(&x.live_precopy_stall_sched);
}

/// What each vCPU's thread did over a gap.
fn print_sched(threads: &[ThreadTime]) {
    for (cpu, t) in threads.iter().enumerate() {
        println!(
            "      vCPU {cpu}'s thread over {:.1} ms: on a CPU {:.1} ms, waiting for a CPU {:.1} ms, blocked or asleep {:.1} ms",
            t.window_ms, t.ran_ms, t.waited_ms, t.blocked_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_per_vcpu_and_within_the_window() {
        // (cpu, tsc, writes): cpu 0 beats every 10, cpu 1 has one gap of 50.
        let beats = [
            (0, 10, 0),
            (1, 12, 0),
            (0, 20, 0),
            (1, 62, 0),
            (0, 30, 0),
            (1, 72, 0),
        ];
        assert_eq!(largest_gap(&beats, 0, u64::MAX), 50);
        assert_eq!(largest_gap(&beats, 15, u64::MAX), 10);
        assert_eq!(largest_gap(&[], 0, 100), 0);
        let g = largest_gap_at(&beats, 0, u64::MAX);
        assert_eq!((g.gap, g.at, g.cpu), (50, 12, 1));
    }

    #[test]
    fn the_median_interval_is_per_vcpu() {
        let beats = [(0, 10, 0), (0, 20, 0), (0, 50, 0), (1, 5, 0), (1, 15, 0)];
        // Intervals 10, 30 (cpu 0) and 10 (cpu 1).
        assert_eq!(median_interval(&beats, 0, u64::MAX), 10);
        assert_eq!(median_interval(&beats, 20, u64::MAX), 30);
        assert_eq!(median_interval(&beats[..1], 0, u64::MAX), 0);
    }

    #[test]
    fn the_switch_gap_runs_from_the_last_stamp_before_the_pause_to_the_first_after() {
        // Paused at 112; vCPU 1 stamped 100 on the source but printed it
        // on the destination, after the pause.
        let beats = [
            (0, 100, 0),
            (0, 110, 0),
            (1, 90, 0),
            (0, 140, 0),
            (0, 150, 0),
            (1, 100, 0),
            (1, 125, 0),
        ];
        let g = switch_gap(&beats, 112);
        assert_eq!((g.gap, g.at, g.cpu), (30, 110, 0));
        assert_eq!(switch_gap(&beats[..3], 112).gap, 0);
    }

    #[test]
    fn a_stamp_counts_once_printed_whole_also_on_a_cut_line() {
        let path = std::env::temp_dir().join(format!("cryo-hb-stamps-{}", std::process::id()));
        std::fs::write(
            &path,
            "HB cpu=0 seq=1 tsc=100 writes=5 verified=0 sweeps=0 errors=0\n\
             HB cpu=1 seq=1 tsc=150 wri\n\
             HB cpu=0 seq=2 tsc=20",
        )
        .unwrap();
        let stamps = heartbeat_stamps(&path);
        let whole = heartbeats(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(stamps, [(0, 100, 5), (1, 150, 0)]);
        assert_eq!(whole, [(0, 100, 5)]);
    }

    #[test]
    fn loopback_bandwidth_is_measured() {
        let bw = loopback_bandwidth(2, 8 << 20).unwrap();
        assert!(bw > 0.0);
    }
}
