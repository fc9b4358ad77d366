//! Live migration (pre-copy): the VM keeps running while its RAM goes to a
//! `cryo restore --listen` peer, first all of it, then rounds of the pages
//! the guest dirtied meanwhile (KVM dirty logging, the `dirty-log` crate),
//! over multifd protocol version 2. Once the dirty pages left fit the
//! downtime limit at the measured bandwidth, the VM is paused, the last
//! pages and the device state are sent, and the source ends only after the
//! destination's ACK. Any failure, `cancel` or the time limit leaves the
//! source running with dirty logging off.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dirty_log::{DirtyBitmap, DirtyLog, PAGE_SIZE as LOG_PAGE};
use microvm::{GuestMemory, RunState, VmController};
use multifd::{LiveSender, PageSet, SocketOptions};
use serde::Serialize;

use super::fixed::mem_regions;
use super::migrate::CompressionArg;
use super::{snapshot, SaveControl, SaveError, PAGE_SIZE};
use crate::progress::{MigrationProgress, Progress};

/// Options of a live migration.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Data channels (1 to 64).
    pub channels: usize,
    /// Per-packet compression.
    pub compression: Option<CompressionArg>,
    /// The longest pause the guest may see, in ms.
    pub max_downtime_ms: u64,
    /// Bandwidth limit of the data channels together, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Give up (and keep the source running) after this long.
    pub timeout: Option<Duration>,
}

/// What a live migration did.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateStats {
    /// The peer.
    pub to: String,
    /// Rounds sent, the first full pass and the last one included.
    pub rounds: u32,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Pages sent in the last round (with the VM paused).
    pub last_round_pages: u64,
    /// How long the VM was paused, from pause to the destination's ACK, ms.
    pub downtime_ms: f64,
    /// The bandwidth the downtime estimate used, MB/s.
    pub bandwidth_mb_s: f64,
    /// The highest auto-converge throttle reached: the share of time the
    /// vCPUs were held paused, percent (0: never throttled).
    pub throttle_percent: u32,
    /// The whole migration, ms.
    pub total_ms: f64,
}

/// The share of the downtime limit the last round's pages may take.
const DATA_SHARE_OF_DOWNTIME: f64 = 0.5;

/// Rounds shorter than this say little about the bandwidth.
const MIN_MEASURED_BYTES: u64 = 4 << 20;

/// Migrates the running VM behind `controller` to `endpoint`. On success
/// the VM is paused and the destination runs it: the caller ends it. On
/// failure it runs on, dirty logging off.
pub fn migrate_vm(
    controller: &VmController,
    endpoint: &multifd::Endpoint,
    opts: &MigrateOptions,
    control: &SaveControl,
    progress: Option<&Progress>,
) -> Result<MigrateStats, SaveError> {
    let start = Instant::now();
    control.check("migration")?;
    let memory = controller.call(|vm| match vm.state() {
        // A virtio device writes guest memory (read data, received
        // frames, used rings) without marking it dirty yet, so a page it
        // wrote during a round could reach the destination stale.
        _ if vm.virtio_device_count() > 0 => Err(SaveError::BadRequest(
            "live migration of a VM with disks or network devices is not supported yet (device \
             writes to guest memory are not dirty-tracked); use `cryo save --to \
             unix:PATH|tcp:HOST:PORT`, which migrates it stopped"
                .into(),
        )),
        RunState::Running => Ok(vm.memory().clone()),
        s => Err(SaveError::BadRequest(format!(
            "live migration needs a running VM (it is {s:?}); use save --to for a paused one"
        ))),
    })??;
    let mut log = Some(start_log(controller)?);
    let mut paused = false;
    let m = Migration {
        controller,
        endpoint,
        opts,
        control,
        progress,
        memory: &memory,
    };
    let result = m.precopy(&mut log, &mut paused);
    if let Some(log) = log {
        // Off on every path; a VM that ended has no log to switch off.
        let _ = controller.call(move |vm| log.stop(vm.vm_fd()));
    }
    match result {
        Ok(mut stats) => {
            stats.total_ms = start.elapsed().as_secs_f64() * 1e3;
            Ok(stats)
        }
        Err(e) => {
            if paused && !control.vm_ending() {
                let _ = controller.resume();
            }
            Err(e)
        }
    }
}

fn start_log(controller: &VmController) -> Result<DirtyLog, SaveError> {
    controller.call(|vm| {
        let slots = vm.memory_slots()?;
        // SAFETY: the VM's own memory slots as registered; the VM owns
        // their mappings for as long as its fd (and so the slots) exists.
        unsafe { DirtyLog::start(vm.vm_fd(), &slots) }.map_err(SaveError::from)
    })?
}

/// The pages dirtied since the last fetch, one bitmap per memory region.
fn fetch(
    controller: &VmController,
    log: &mut Option<DirtyLog>,
) -> Result<Vec<DirtyBitmap>, SaveError> {
    let mut l = log
        .take()
        .ok_or(SaveError::BadRequest("dirty logging is not running".into()))?;
    let (l, maps) = controller.call(move |vm| {
        let r = l.fetch_and_clear(vm.vm_fd());
        (l, r)
    })?;
    *log = Some(l);
    Ok(maps?)
}

fn dirty_bytes(maps: &[DirtyBitmap]) -> u64 {
    maps.iter().map(DirtyBitmap::count).sum::<u64>() * LOG_PAGE
}

/// Adds `newer` into `maps` (same shapes: the same slots).
fn merge(maps: &mut [DirtyBitmap], newer: &[DirtyBitmap]) {
    for (m, n) in maps.iter_mut().zip(newer) {
        m.merge(n);
    }
}

/// Sets `stop` when the migration is cancelled or runs past `deadline`,
/// until `done`.
fn watch(control: &SaveControl, deadline: Option<Instant>, stop: &AtomicBool, done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if control.is_cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
            stop.store(true, Ordering::Release);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Auto-converge: while a guest dirties memory faster than the link
/// drains it, its vCPUs are held paused for a growing share of each period.
struct Throttle {
    percent: AtomicU32,
    /// Held for the length of one paused slice; the last round holds it so
    /// that no slice starts (or is under way) while it pauses the VM.
    slice: Mutex<()>,
}

const THROTTLE_PERIOD: Duration = Duration::from_millis(100);
/// The shares tried, one step per round that did not shrink the dirty set.
const THROTTLE_STEPS: [u32; 6] = [20, 40, 60, 80, 95, 99];

impl Throttle {
    /// The next step after the current one; the highest stays.
    fn step_up(&self) -> u32 {
        let now = self.percent.load(Ordering::Acquire);
        let next = THROTTLE_STEPS
            .iter()
            .copied()
            .find(|s| *s > now)
            .unwrap_or(now);
        self.percent.store(next, Ordering::Release);
        next
    }

    /// Pauses and resumes the VM in slices until `done`.
    fn run(&self, controller: &VmController, done: &AtomicBool) {
        while !done.load(Ordering::Acquire) {
            let Ok(guard) = self.slice.lock() else {
                return;
            };
            let percent = self.percent.load(Ordering::Acquire);
            if percent == 0 {
                drop(guard);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let hold = THROTTLE_PERIOD * percent / 100;
            if controller.pause().is_ok() {
                std::thread::sleep(hold);
                let _ = controller.resume();
            }
            drop(guard);
            std::thread::sleep(THROTTLE_PERIOD - hold);
        }
    }
}

/// One live migration's fixed inputs.
struct Migration<'a> {
    controller: &'a VmController,
    endpoint: &'a multifd::Endpoint,
    opts: &'a MigrateOptions,
    control: &'a SaveControl,
    progress: Option<&'a Progress>,
    memory: &'a GuestMemory,
}

impl Migration<'_> {
    /// The rounds, with a watcher that stops them on cancel or at the time
    /// limit, and the auto-converge throttle.
    fn precopy(
        &self,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
    ) -> Result<MigrateStats, SaveError> {
        let deadline = self.opts.timeout.map(|t| Instant::now() + t);
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let throttle = Throttle {
            percent: AtomicU32::new(0),
            slice: Mutex::new(()),
        };
        std::thread::scope(|s| {
            s.spawn(|| watch(self.control, deadline, &stop, &done));
            s.spawn(|| throttle.run(self.controller, &done));
            let r = self.rounds(log, paused, &stop, &throttle);
            done.store(true, Ordering::Release);
            r
        })
    }

    fn rounds(
        &self,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
        stop: &AtomicBool,
        throttle: &Throttle,
    ) -> Result<MigrateStats, SaveError> {
        let mut sending = self.first_pass(stop)?;
        let maps = self.converge(&mut sending, log, stop, throttle)?;
        throttle.percent.store(0, Ordering::Release);
        // No throttle slice runs from here on (a poisoned lock: the throttle
        // thread is gone, which is as good).
        let _no_slices = throttle.slice.lock();
        self.stop_and_copy(sending, maps, log, paused)
    }

    fn wire(&self, e: multifd::MultifdError) -> SaveError {
        SaveError::Image {
            path: self.endpoint.to_string().into(),
            source: e.into(),
        }
    }

    /// Sends one round; a round stopped by cancel or the time limit tells
    /// the destination and becomes the matching error.
    fn send(
        &self,
        tx: &mut LiveSender<multifd::Stream>,
        pages: PageSet<'_>,
        stop: &AtomicBool,
    ) -> Result<multifd::RoundStats, SaveError> {
        match tx.send_round(pages, false, stop) {
            Err(multifd::MultifdError::Aborted(_)) if stop.load(Ordering::Acquire) => {
                Err(self.stopped(tx))
            }
            r => r.map_err(|e| self.wire(e)),
        }
    }

    /// Tells the destination why the source stops (cancel or time limit).
    fn stopped(&self, tx: &mut LiveSender<multifd::Stream>) -> SaveError {
        if self.control.is_cancelled() {
            tx.abort("the source cancelled the migration");
            SaveError::Cancelled("migration")
        } else {
            tx.abort("the source gave up: time limit reached");
            SaveError::NotConverged {
                limit_s: self.opts.timeout.map_or(0, |t| t.as_secs()),
            }
        }
    }

    /// Connects and sends every non-zero page while the guest runs.
    fn first_pass(&self, stop: &AtomicBool) -> Result<Sending, SaveError> {
        let regions = mem_regions(self.memory);
        let ram_bytes: u64 = regions.iter().map(|r| r.len()).sum();
        if let Some(p) = self.progress {
            p.set_total(ram_bytes);
            p.phase("first pass");
        }
        let socket_opts = SocketOptions {
            channels: self.opts.channels.clamp(1, 64),
            compression: self
                .opts
                .compression
                .unwrap_or(CompressionArg::None)
                .multifd(),
        };
        let mut tx = LiveSender::connect(&mut || self.endpoint.connect(), &regions, &socket_opts)
            .map_err(|e| self.wire(e))?;
        tx.set_max_bandwidth(self.opts.max_bandwidth);
        let first = self.send(&mut tx, PageSet::AllNonZero, stop)?;
        if let Some(p) = self.progress {
            p.add(ram_bytes);
            p.phase("dirty rounds");
        }
        Ok(Sending {
            tx,
            ram_bytes,
            bandwidth: first.bytes_per_s().max(1.0),
            pages_sent: first.pages,
            round_time: first.elapsed,
            throttled: 0,
        })
    }

    /// Rounds of dirty pages until what is left fits the downtime, throttling
    /// the vCPUs when a round does not shrink the dirty set; returns the
    /// pages still dirty.
    fn converge(
        &self,
        s: &mut Sending,
        log: &mut Option<DirtyLog>,
        stop: &AtomicBool,
        throttle: &Throttle,
    ) -> Result<Vec<DirtyBitmap>, SaveError> {
        // Half the downtime for the pages; the other half covers pausing and
        // capturing the device state, the pages written up to the pause, and
        // the destination's confirmation.
        let budget = self.opts.max_downtime_ms as f64 / 1e3 * DATA_SHARE_OF_DOWNTIME;
        let mut maps = fetch(self.controller, log)?;
        let mut fetched = Instant::now();
        let mut before: Option<f64> = None;
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(self.stopped(&mut s.tx));
            }
            let pending = dirty_bytes(&maps) as f64;
            self.report(s, pending);
            if pending / s.bandwidth <= budget {
                return Ok(maps);
            }
            // The dirty set did not shrink by a fifth: the guest writes
            // about as fast as the link drains, or faster.
            if before.is_some_and(|b| pending >= b * 0.8) {
                s.throttled = throttle.step_up();
                log::info!(
                    "live migration: auto-converge throttles the vCPUs {}%",
                    s.throttled
                );
            }
            before = Some(pending);
            let words: Vec<&[u64]> = maps.iter().map(DirtyBitmap::words).collect();
            let r = self.send(&mut s.tx, PageSet::Dirty(&words), stop)?;
            s.pages_sent += r.pages;
            if r.bytes >= MIN_MEASURED_BYTES {
                s.bandwidth = r.bytes_per_s().max(1.0);
            }
            log::info!(
                "live migration round {}: {} pages in {:.1} ms ({:.0} MB/s)",
                r.round,
                r.pages,
                r.elapsed.as_secs_f64() * 1e3,
                r.bytes_per_s() / 1e6
            );
            maps = fetch(self.controller, log)?;
            s.round_time = fetched.elapsed();
            fetched = Instant::now();
        }
    }

    fn report(&self, s: &Sending, pending: f64) {
        if let Some(p) = self.progress {
            p.set_migration(MigrationProgress {
                round: s.tx.next_round(),
                dirty_rate_mb_s: pending / s.round_time.as_secs_f64().max(1e-3) / 1e6,
                remaining_bytes: pending as u64,
                expected_downtime_ms: pending / s.bandwidth * 1e3,
                throttle_percent: s.throttled,
            });
        }
    }

    /// Pauses the VM, sends the pages still dirty (`maps` plus those written
    /// up to the pause) and the device state, and waits for the ACK.
    fn stop_and_copy(
        &self,
        mut s: Sending,
        mut maps: Vec<DirtyBitmap>,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
    ) -> Result<MigrateStats, SaveError> {
        if let Some(p) = self.progress {
            p.phase("stop-and-copy");
        }
        let pause_start = Instant::now();
        let snap = self.controller.call(|vm| {
            vm.pause()?;
            vm.save_state()
        })?;
        *paused = true;
        let snap = snap?;
        merge(&mut maps, &fetch(self.controller, log)?);
        let device_state =
            snapshot::encode(&snap, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
                path: self.endpoint.to_string().into(),
                source: e.into(),
            })?;
        let captured_ms = pause_start.elapsed().as_secs_f64() * 1e3;
        let words: Vec<&[u64]> = maps.iter().map(DirtyBitmap::words).collect();
        let never = AtomicBool::new(false);
        let last =
            s.tx.send_round(PageSet::Dirty(&words), true, &never)
                .map_err(|e| self.wire(e))?;
        let rounds = s.tx.next_round();
        let stats = s.tx.finish(&device_state).map_err(|e| self.wire(e))?;
        let downtime_ms = pause_start.elapsed().as_secs_f64() * 1e3;
        log::info!(
            "live migration to {}: {rounds} rounds, {} pages, paused {downtime_ms:.1} ms (state and log {captured_ms:.1} ms, last round {:.1} ms)",
            self.endpoint,
            s.pages_sent + last.pages,
            last.elapsed.as_secs_f64() * 1e3
        );
        Ok(MigrateStats {
            to: self.endpoint.to_string(),
            rounds,
            pages_sent: s.pages_sent + last.pages,
            ram_bytes: s.ram_bytes,
            bytes: stats.bytes,
            last_round_pages: last.pages,
            downtime_ms,
            bandwidth_mb_s: s.bandwidth / 1e6,
            throttle_percent: s.throttled,
            total_ms: 0.0,
        })
    }
}

/// A migration's sending side between rounds.
struct Sending {
    tx: LiveSender<multifd::Stream>,
    ram_bytes: u64,
    /// Bytes per second, as last measured.
    bandwidth: f64,
    pages_sent: u64,
    /// How long the last round took (for the dirty rate).
    round_time: Duration,
    /// The auto-converge throttle reached, percent.
    throttled: u32,
}
