//! Pre-copy, the engine of live migration and live save: the VM keeps
//! running while its RAM goes to a sink, first all of it, then rounds of the
//! pages dirtied meanwhile (KVM dirty logging of the guest's writes plus
//! the devices' own writes into guest memory, merged by the `dirty-log`
//! crate). Once the dirty pages left fit the downtime limit at the measured
//! bandwidth, the VM is paused, the last pages and the device state go to
//! the sink, and it finishes (the peer's ACK, or the image's commit). Any
//! failure, `cancel` or the time limit leaves the VM running with dirty
//! logging off.
//!
//! Two sinks: a `cryo restore --listen` peer over multifd protocol version
//! 2 ([`migrate_vm`], here) and a fixed-ram image file written in place
//! (`live_save.rs`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dirty_log::{DirtyBitmap, DirtyLog, VmmDirty, PAGE_SIZE as LOG_PAGE};
use microvm::{observe_writes, GuestMemory, MicroVm, RunState, VmController, WriteObserver};
use multifd::{LiveSender, MemRegion, PageSet, RoundStats, SocketOptions};
use serde::Serialize;

use super::fixed::mem_regions;
use super::migrate::CompressionArg;
use super::{snapshot, SaveControl, SaveError, PAGE_SIZE};
use crate::progress::{MigrationProgress, Progress};

/// Who goes first for the host's CPUs while a live transfer runs beside
/// the guest (the rounds before the pause; the last round, with the guest
/// paused, always runs at full priority).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuPriority {
    /// The guest's vCPUs: the transfer threads run under `SCHED_BATCH` at
    /// nice 5. A guest that keeps the host's CPUs busy keeps its speed;
    /// on a host without spare CPUs the transfer takes longer.
    #[default]
    Guest,
    /// The transfer: its threads run at the vCPUs' priority (as QEMU's
    /// migration threads do). It ends sooner on a host without spare
    /// CPUs, and the guest slows meanwhile.
    Transfer,
}

impl CpuPriority {
    /// Whether the transfer threads yield the CPU to the guest.
    pub fn yields_to_guest(self) -> bool {
        self == CpuPriority::Guest
    }
}

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
    /// Who goes first for the host's CPUs while the guest runs.
    pub priority: CpuPriority,
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
    /// Each step, when it began and how long it took.
    pub steps: Vec<Step>,
}

/// What the pre-copy engine did, whatever the sink.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrecopyStats {
    /// Rounds, the first full pass and the last one included.
    pub rounds: u32,
    /// Pages moved over all rounds.
    pub pages_sent: u64,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Pages moved in the last round (with the VM paused).
    pub last_round_pages: u64,
    /// How long the VM was paused, from the pause to the sink's finish, ms
    /// (not serialized: each caller's result names it).
    #[serde(skip_serializing)]
    pub downtime_ms: f64,
    /// The bandwidth the downtime estimate used, MB/s.
    pub bandwidth_mb_s: f64,
    /// The highest auto-converge throttle reached, percent (0: never).
    pub throttle_percent: u32,
    /// The whole operation, ms (not serialized: each caller's result names it).
    #[serde(skip_serializing)]
    pub total_ms: f64,
    /// Each step, when it began and how long it took.
    pub steps: Vec<Step>,
}

/// What a pre-copy step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Switching dirty logging on.
    LogOn,
    /// A round of pages moved while the guest runs (round 0: the first pass).
    Round,
    /// Fetching and clearing the dirty log after a round.
    Fetch,
    /// Waiting for the destination to take the rounds sent (its socket
    /// buffers drained into its memory) before the pause.
    Drain,
    /// Pausing the vCPUs and capturing the VM's state.
    Pause,
    /// Fetching the dirty log with the VM paused.
    LastFetch,
    /// The last round, with the VM paused.
    LastRound,
    /// The device state and the sink's finish (the peer's ACK, the image's
    /// commit).
    Finish,
}

impl StepKind {
    /// The step in words.
    pub fn describe(self) -> &'static str {
        match self {
            StepKind::LogOn => "switching dirty logging on",
            StepKind::Round => "sending a round",
            StepKind::Fetch => "fetching the dirty log",
            StepKind::Drain => "waiting for the destination to take the rounds sent",
            StepKind::Pause => "pausing the vCPUs and capturing the state",
            StepKind::LastFetch => "fetching the dirty log, paused",
            StepKind::LastRound => "sending the last round, paused",
            StepKind::Finish => "sending the device state, waiting for the ACK",
        }
    }
}

/// One step of a pre-copy, for tracing where its time went.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Step {
    /// What it did.
    pub kind: StepKind,
    /// The round it belongs to (a fetch: the round it fetched after).
    pub round: u32,
    /// When it began, ms after the pre-copy started.
    pub start_ms: f64,
    /// How long it took, ms.
    pub ms: f64,
    /// Pages it moved (rounds) or found dirty (fetches); 0 otherwise.
    pub pages: u64,
}

/// The steps of one pre-copy as they happen.
struct Timeline {
    start: Instant,
    steps: Vec<Step>,
}

impl Timeline {
    /// Records a step that began at `began` and ends now.
    fn record(&mut self, kind: StepKind, round: u32, began: Instant, pages: u64) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.steps.push(Step {
            kind,
            round,
            start_ms: ms(began.saturating_duration_since(self.start)),
            ms: ms(began.elapsed()),
            pages,
        });
    }
}

/// Where the rounds of a pre-copy go.
pub trait Sink {
    /// What the sink gives back once finished.
    type Done;
    /// Moves one round of pages (`last`: the VM is paused). A round that
    /// `stop` ended is [`RoundError::Stopped`].
    fn round(
        &mut self,
        pages: PageSet<'_>,
        last: bool,
        stop: &AtomicBool,
    ) -> Result<RoundStats, RoundError>;
    /// The number of the next round (0 = the first pass).
    fn next_round(&self) -> u32;
    /// Waits until the other side has taken every round sent so far, so
    /// that a pause now holds the VM only for the last round. A file has
    /// them once each round returns (the default); a peer may still be
    /// working through its socket buffers. `stop` ends the wait.
    fn wait_taken(&mut self, _stop: &AtomicBool) -> Result<(), RoundError> {
        Ok(())
    }
    /// The pre-copy gives up (cancel, time limit): tell the other side why.
    fn abort(&mut self, why: &str);
    /// After the last round: the device state, then the sink's commitment
    /// (the peer's ACK, the image's commit). Only `Ok` is success.
    fn finish(self, device_state: &[u8]) -> Result<Self::Done, SaveError>;
    /// The target, for messages.
    fn target(&self) -> PathBuf;
}

/// Why a round did not complete.
#[derive(Debug)]
pub enum RoundError {
    /// The stop flag (cancel or time limit) ended it.
    Stopped,
    /// It failed.
    Failed(SaveError),
}

/// The fixed inputs of one pre-copy.
pub struct Precopy<'a> {
    /// The running VM.
    pub controller: &'a VmController,
    /// The longest pause the guest may see, in ms.
    pub max_downtime_ms: u64,
    /// Give up (and keep the VM running) after this long.
    pub timeout: Option<Duration>,
    /// Cancellation.
    pub control: &'a SaveControl,
    /// Where progress goes.
    pub progress: Option<&'a Progress>,
    /// "migration" or "live save", for messages.
    pub what: &'static str,
}

/// The share of the downtime limit the expected downtime may take: the
/// rest is margin (the pages written between the last fetch and the pause,
/// a busy host).
const TARGET_SHARE_OF_DOWNTIME: f64 = 0.8;

/// What the stop-and-copy costs besides the pages and the log fetch:
/// pausing the vCPUs, capturing their and the devices' state, the sink's
/// finish and, for a migration, the destination building and resuming the
/// VM after its ACK (about 1-2 ms and 9 ms for 2 vCPUs on an idle host).
const PAUSE_ALLOWANCE: Duration = Duration::from_millis(10);

/// Bytes the device state is expected to take on the wire (14.5 KB for 2
/// vCPUs and the legacy devices), moved during the pause. Kept close to
/// that: on a link held to 1 MB/s each KiB here is a millisecond.
const DEVICE_STATE_ALLOWANCE: f64 = 16.0 * 1024.0;

/// The downtime a stop-and-copy now is expected to take, in seconds:
/// `pending` dirty bytes and the device state at `bandwidth` bytes/s, the
/// log fetched once more with the VM paused (as long as the last fetch
/// took), and [`PAUSE_ALLOWANCE`].
fn expected_downtime(pending: f64, bandwidth: f64, fetch: Duration) -> f64 {
    (pending + DEVICE_STATE_ALLOWANCE) / bandwidth.max(1.0)
        + fetch.as_secs_f64()
        + PAUSE_ALLOWANCE.as_secs_f64()
}

/// A wait for the sink longer than this lets the guest dirty enough pages
/// to fetch the log again before deciding to pause.
const DRAIN_REFETCH: Duration = Duration::from_millis(5);

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
    let p = Precopy {
        controller,
        max_downtime_ms: opts.max_downtime_ms,
        timeout: opts.timeout,
        control,
        progress,
        what: "migration",
    };
    let (stats, wire) = p.run(|regions| {
        let socket_opts = SocketOptions {
            channels: opts.channels.clamp(1, 64),
            compression: opts.compression.unwrap_or(CompressionArg::None).multifd(),
        };
        let mut tx = LiveSender::connect(&mut || endpoint.connect(), regions, &socket_opts)
            .map_err(|e| wire_err(endpoint, e))?;
        tx.set_max_bandwidth(opts.max_bandwidth);
        tx.set_yield_to_guest(opts.priority.yields_to_guest());
        Ok(PeerSink { tx, endpoint })
    })?;
    Ok(MigrateStats {
        to: endpoint.to_string(),
        rounds: stats.rounds,
        pages_sent: stats.pages_sent,
        ram_bytes: stats.ram_bytes,
        bytes: wire.bytes,
        last_round_pages: stats.last_round_pages,
        downtime_ms: stats.downtime_ms,
        bandwidth_mb_s: stats.bandwidth_mb_s,
        throttle_percent: stats.throttle_percent,
        total_ms: stats.total_ms,
        steps: stats.steps,
    })
}

fn wire_err(endpoint: &multifd::Endpoint, e: multifd::MultifdError) -> SaveError {
    SaveError::Image {
        path: endpoint.to_string().into(),
        source: e.into(),
    }
}

/// A `cryo restore --listen` peer as a pre-copy sink.
struct PeerSink<'a> {
    tx: LiveSender<multifd::Stream>,
    endpoint: &'a multifd::Endpoint,
}

impl PeerSink<'_> {
    /// A wire error of a round or a wait: `Stopped` when `stop` ended it.
    fn round_err(&self, e: multifd::MultifdError, stop: &AtomicBool) -> RoundError {
        match e {
            multifd::MultifdError::Aborted(_) if stop.load(Ordering::Acquire) => {
                RoundError::Stopped
            }
            e => RoundError::Failed(wire_err(self.endpoint, e)),
        }
    }
}

impl Sink for PeerSink<'_> {
    type Done = multifd::TransferStats;

    fn round(
        &mut self,
        pages: PageSet<'_>,
        last: bool,
        stop: &AtomicBool,
    ) -> Result<RoundStats, RoundError> {
        if last {
            // The VM is paused: the last round goes as fast as the link
            // allows, as a live save's does.
            self.tx.set_max_bandwidth(None);
        }
        self.tx
            .send_round(pages, last, stop)
            .map_err(|e| self.round_err(e, stop))
    }

    fn next_round(&self) -> u32 {
        self.tx.next_round()
    }

    fn wait_taken(&mut self, stop: &AtomicBool) -> Result<(), RoundError> {
        let Some(round) = self.tx.next_round().checked_sub(1) else {
            return Ok(());
        };
        self.tx
            .wait_received(round, stop)
            .map(|_| ())
            .map_err(|e| self.round_err(e, stop))
    }

    fn abort(&mut self, why: &str) {
        self.tx.abort(why);
    }

    fn finish(self, device_state: &[u8]) -> Result<multifd::TransferStats, SaveError> {
        self.tx
            .finish(device_state)
            .map_err(|e| wire_err(self.endpoint, e))
    }

    fn target(&self) -> PathBuf {
        self.endpoint.to_string().into()
    }
}

impl Precopy<'_> {
    /// Runs the pre-copy into the sink `open` makes for guest RAM. On
    /// success the VM is paused (the caller resumes or ends it); on failure
    /// it runs on, dirty logging off.
    pub fn run<S: Sink>(
        &self,
        open: impl FnOnce(&[MemRegion]) -> Result<S, SaveError>,
    ) -> Result<(PrecopyStats, S::Done), SaveError> {
        let start = Instant::now();
        self.control.check(self.what)?;
        let memory = self.running_memory()?;
        let mut timeline = Timeline {
            start,
            steps: Vec::new(),
        };
        let began = Instant::now();
        let mut log = Some(start_log(self.controller)?);
        timeline.record(StepKind::LogOn, 0, began, 0);
        let mut paused = false;
        let result = self.precopy(&memory, open, &mut log, &mut paused, timeline);
        if let Some(log) = log {
            // Off on every path; a VM that ended has no log to switch off.
            let _ = self.controller.call(move |vm| stop_log(vm, log));
        }
        match result {
            Ok((mut stats, done)) => {
                stats.total_ms = start.elapsed().as_secs_f64() * 1e3;
                Ok((stats, done))
            }
            Err(e) => {
                if paused && !self.control.vm_ending() {
                    let _ = self.controller.resume();
                }
                Err(e)
            }
        }
    }

    /// The guest memory of the running VM.
    fn running_memory(&self) -> Result<GuestMemory, SaveError> {
        let what = self.what;
        self.controller.call(move |vm| match vm.state() {
            RunState::Running => Ok(vm.memory().clone()),
            s => Err(SaveError::BadRequest(format!(
                "a live {what} needs a running VM (it is {s:?}); a stopped save (`cryo save`) \
                 takes a paused one"
            ))),
        })?
    }
}

/// Device emulation's writes into guest memory (virtio-blk read data,
/// virtio-net receive buffers, used rings), marked in the dirty log's VMM
/// bitmap, which each fetch merges with KVM's.
pub(crate) struct DeviceWrites(pub(crate) VmmDirty);

impl WriteObserver for DeviceWrites {
    fn wrote(&self, addr: u64, len: u64) {
        self.0.mark(addr, len);
    }
}

/// Switches dirty logging on: KVM's for the vCPUs, and the VM's own device
/// writes. Runs on the event loop, the thread that serves the devices, so
/// no device write is under way while the observer is attached.
pub(crate) fn start_log(controller: &VmController) -> Result<DirtyLog, SaveError> {
    let t = Instant::now();
    let log = controller.call(|vm| {
        let slots = vm.memory_slots()?;
        // SAFETY: the VM's own memory slots as registered; the VM owns
        // their mappings for as long as its fd (and so the slots) exists.
        let log = unsafe { DirtyLog::start(vm.vm_fd(), &slots) }?;
        let devices = Arc::new(DeviceWrites(log.vmm_writes()));
        observe_writes(vm.memory(), Some(devices));
        Ok::<_, SaveError>(log)
    })??;
    log::info!(
        "dirty logging on in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(log)
}

/// Switches both halves of dirty logging off again.
pub(crate) fn stop_log(vm: &mut MicroVm, log: DirtyLog) -> Result<(), dirty_log::Error> {
    observe_writes(vm.memory(), None);
    log.stop(vm.vm_fd())
}

/// The pages dirtied since the last fetch, one bitmap per memory region,
/// and how long the fetch took.
pub(crate) fn fetch(
    controller: &VmController,
    log: &mut Option<DirtyLog>,
) -> Result<(Vec<DirtyBitmap>, Duration), SaveError> {
    let mut l = log
        .take()
        .ok_or(SaveError::BadRequest("dirty logging is not running".into()))?;
    let t = Instant::now();
    let (l, maps) = controller.call(move |vm| {
        let r = l.fetch_and_clear(vm.vm_fd());
        (l, r)
    })?;
    let took = t.elapsed();
    log::debug!("dirty log fetched in {:.1} ms", took.as_secs_f64() * 1e3);
    *log = Some(l);
    Ok((maps?, took))
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

impl Precopy<'_> {
    /// The rounds, with a watcher that stops them on cancel or at the time
    /// limit, and the auto-converge throttle.
    fn precopy<S: Sink>(
        &self,
        memory: &GuestMemory,
        open: impl FnOnce(&[MemRegion]) -> Result<S, SaveError>,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
        timeline: Timeline,
    ) -> Result<(PrecopyStats, S::Done), SaveError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let throttle = Throttle {
            percent: AtomicU32::new(0),
            slice: Mutex::new(()),
        };
        std::thread::scope(|s| {
            s.spawn(|| watch(self.control, deadline, &stop, &done));
            s.spawn(|| throttle.run(self.controller, &done));
            let r = self
                .first_pass(memory, open, &stop, timeline)
                .and_then(|moving| self.rounds(moving, log, paused, &stop, &throttle));
            done.store(true, Ordering::Release);
            r
        })
    }

    /// After the first pass: the dirty rounds, then the stop-and-copy.
    fn rounds<S: Sink>(
        &self,
        mut moving: Moving<S>,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
        stop: &AtomicBool,
        throttle: &Throttle,
    ) -> Result<(PrecopyStats, S::Done), SaveError> {
        let maps = self.converge(&mut moving, log, stop, throttle)?;
        throttle.percent.store(0, Ordering::Release);
        // No throttle slice runs from here on (a poisoned lock: the throttle
        // thread is gone, which is as good).
        let _no_slices = throttle.slice.lock();
        self.stop_and_copy(moving, maps, log, paused)
    }

    /// Moves one round; a round stopped by cancel or the time limit tells
    /// the other side and becomes the matching error.
    fn send<S: Sink>(
        &self,
        sink: &mut S,
        pages: PageSet<'_>,
        stop: &AtomicBool,
    ) -> Result<RoundStats, SaveError> {
        let r = sink.round(pages, false, stop);
        self.settle(sink, r)
    }

    /// [`Sink::wait_taken`]; a wait stopped by cancel or the time limit
    /// tells the other side and becomes the matching error.
    fn wait_sink<S: Sink>(&self, sink: &mut S, stop: &AtomicBool) -> Result<(), SaveError> {
        let r = sink.wait_taken(stop);
        self.settle(sink, r)
    }

    /// The outcome of a sink step while the guest runs: stopped by cancel
    /// or the time limit, it tells the other side why.
    fn settle<S: Sink, T>(&self, sink: &mut S, r: Result<T, RoundError>) -> Result<T, SaveError> {
        match r {
            Ok(v) => Ok(v),
            Err(RoundError::Stopped) => Err(self.stopped(sink)),
            Err(RoundError::Failed(e)) => Err(e),
        }
    }

    /// Tells the sink why the pre-copy stops (cancel or time limit).
    fn stopped<S: Sink>(&self, sink: &mut S) -> SaveError {
        if self.control.is_cancelled() {
            sink.abort(&format!("the source cancelled the {}", self.what));
            SaveError::Cancelled(self.what)
        } else {
            sink.abort("the source gave up: time limit reached");
            SaveError::NotConverged {
                what: self.what,
                limit_s: self.timeout.map_or(0, |t| t.as_secs()),
            }
        }
    }

    /// Opens the sink and moves every non-zero page while the guest runs.
    fn first_pass<S: Sink>(
        &self,
        memory: &GuestMemory,
        open: impl FnOnce(&[MemRegion]) -> Result<S, SaveError>,
        stop: &AtomicBool,
        mut timeline: Timeline,
    ) -> Result<Moving<S>, SaveError> {
        let regions = mem_regions(memory);
        let ram_bytes: u64 = regions.iter().map(|r| r.len()).sum();
        if let Some(p) = self.progress {
            p.set_total(ram_bytes);
            p.phase("first pass");
        }
        let began = Instant::now();
        let mut sink = open(&regions)?;
        let first = self.send(&mut sink, PageSet::AllNonZero, stop)?;
        timeline.record(StepKind::Round, 0, began, first.pages);
        if let Some(p) = self.progress {
            p.add(ram_bytes);
            p.phase("dirty rounds");
        }
        Ok(Moving {
            sink,
            ram_bytes,
            bandwidth: first.bytes_per_s().max(1.0),
            pages_sent: first.pages,
            round_time: first.elapsed,
            throttled: 0,
            fetch_time: Duration::ZERO,
            expected_s: 0.0,
            timeline,
        })
    }

    /// Rounds of dirty pages until what is left fits the downtime, throttling
    /// the vCPUs when a round does not shrink the dirty set; returns the
    /// pages still dirty.
    fn converge<S: Sink>(
        &self,
        m: &mut Moving<S>,
        log: &mut Option<DirtyLog>,
        stop: &AtomicBool,
        throttle: &Throttle,
    ) -> Result<Vec<DirtyBitmap>, SaveError> {
        let budget = self.max_downtime_ms as f64 / 1e3 * TARGET_SHARE_OF_DOWNTIME;
        let (mut maps, took) = self.fetch_step(m, log, StepKind::Fetch)?;
        m.fetch_time = took;
        let mut fetched = Instant::now();
        let mut before: Option<f64> = None;
        // The pages found after a wait for the sink are not a round's
        // worth: they do not step the throttle up.
        let mut after_drain = false;
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(self.stopped(&mut m.sink));
            }
            let pending = dirty_bytes(&maps) as f64;
            self.report(m, pending);
            m.expected_s = expected_downtime(pending, m.bandwidth, m.fetch_time);
            // At least one dirty round first: the first pass's rate, one
            // long sequential stream, overstates how fast scattered dirty
            // pages go (a file takes them at its IOPS limit). Nothing
            // dirty: another round cannot shorten the pause, even under a
            // limit below the fixed costs.
            if (before.is_some() && m.expected_s <= budget) || pending == 0.0 {
                // A receiver still working through earlier rounds would
                // hold the pause for as long: let it catch up first.
                let began = Instant::now();
                self.wait_sink(&mut m.sink, stop)?;
                let waited = began.elapsed();
                m.timeline.record(
                    StepKind::Drain,
                    m.sink.next_round().saturating_sub(1),
                    began,
                    0,
                );
                log::info!(
                    "live {}: waited {:.1} ms for the receiving side to take the rounds sent",
                    self.what,
                    waited.as_secs_f64() * 1e3
                );
                if waited <= DRAIN_REFETCH {
                    return Ok(maps);
                }
                // The guest ran on meanwhile: decide again with its writes.
                let (newer, took) = self.fetch_step(m, log, StepKind::Fetch)?;
                merge(&mut maps, &newer);
                m.fetch_time = took;
                after_drain = true;
                continue;
            }
            if !std::mem::take(&mut after_drain) && should_throttle(before, pending) {
                m.throttled = throttle.step_up();
                log::info!(
                    "live {}: auto-converge throttles the vCPUs {}%",
                    self.what,
                    m.throttled
                );
            }
            before = Some(pending);
            let words: Vec<&[u64]> = maps.iter().map(DirtyBitmap::words).collect();
            let began = Instant::now();
            let r = self.send(&mut m.sink, PageSet::Dirty(&words), stop)?;
            m.timeline.record(StepKind::Round, r.round, began, r.pages);
            m.pages_sent += r.pages;
            if r.bytes >= MIN_MEASURED_BYTES {
                m.bandwidth = r.bytes_per_s().max(1.0);
            }
            log::info!(
                "live {} round {}: {} pages in {:.1} ms ({:.0} MB/s)",
                self.what,
                r.round,
                r.pages,
                r.elapsed.as_secs_f64() * 1e3,
                r.bytes_per_s() / 1e6
            );
            (maps, m.fetch_time) = self.fetch_step(m, log, StepKind::Fetch)?;
            m.round_time = fetched.elapsed();
            fetched = Instant::now();
        }
    }

    /// [`fetch`], recorded as a step of kind `kind`.
    fn fetch_step<S: Sink>(
        &self,
        m: &mut Moving<S>,
        log: &mut Option<DirtyLog>,
        kind: StepKind,
    ) -> Result<(Vec<DirtyBitmap>, Duration), SaveError> {
        let began = Instant::now();
        let (maps, took) = fetch(self.controller, log)?;
        let round = m.sink.next_round().saturating_sub(1);
        m.timeline
            .record(kind, round, began, dirty_bytes(&maps) / LOG_PAGE);
        Ok((maps, took))
    }

    fn report<S: Sink>(&self, m: &Moving<S>, pending: f64) {
        if let Some(p) = self.progress {
            p.set_migration(MigrationProgress {
                round: m.sink.next_round(),
                dirty_rate_mb_s: pending / m.round_time.as_secs_f64().max(1e-3) / 1e6,
                remaining_bytes: pending as u64,
                expected_downtime_ms: expected_downtime(pending, m.bandwidth, m.fetch_time) * 1e3,
                throttle_percent: m.throttled,
            });
        }
    }

    /// Pauses the VM, moves the pages still dirty (`maps` plus those written
    /// up to the pause) and the device state, and finishes the sink.
    fn stop_and_copy<S: Sink>(
        &self,
        mut m: Moving<S>,
        mut maps: Vec<DirtyBitmap>,
        log: &mut Option<DirtyLog>,
        paused: &mut bool,
    ) -> Result<(PrecopyStats, S::Done), SaveError> {
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
        m.timeline
            .record(StepKind::Pause, m.sink.next_round(), pause_start, 0);
        // The pause held every virtio device (`MicroVm::pause`): none serves
        // a request or a tap frame until resumed, so nothing writes guest
        // memory after this last fetch.
        let (last_maps, fetch_time) = self.fetch_step(&mut m, log, StepKind::LastFetch)?;
        merge(&mut maps, &last_maps);
        let device_state =
            snapshot::encode(&snap, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
                path: m.sink.target(),
                source: e.into(),
            })?;
        let captured_ms = pause_start.elapsed().as_secs_f64() * 1e3;
        let words: Vec<&[u64]> = maps.iter().map(DirtyBitmap::words).collect();
        let never = AtomicBool::new(false);
        let began = Instant::now();
        let last = match m.sink.round(PageSet::Dirty(&words), true, &never) {
            Ok(r) => r,
            Err(RoundError::Failed(e)) => return Err(e),
            Err(RoundError::Stopped) => return Err(SaveError::Cancelled(self.what)),
        };
        m.timeline
            .record(StepKind::LastRound, last.round, began, last.pages);
        let rounds = m.sink.next_round();
        let target = m.sink.target();
        let began = Instant::now();
        let done = m.sink.finish(&device_state)?;
        m.timeline.record(StepKind::Finish, last.round, began, 0);
        let downtime_ms = pause_start.elapsed().as_secs_f64() * 1e3;
        log::info!(
            "live {} to {}: {rounds} rounds, {} pages, paused {downtime_ms:.1} ms (expected {:.1} ms; state and log {captured_ms:.1} ms of which the log {:.1} ms, last round {} pages in {:.1} ms)",
            self.what,
            target.display(),
            m.pages_sent + last.pages,
            m.expected_s * 1e3,
            fetch_time.as_secs_f64() * 1e3,
            last.pages,
            last.elapsed.as_secs_f64() * 1e3
        );
        let stats = PrecopyStats {
            rounds,
            pages_sent: m.pages_sent + last.pages,
            ram_bytes: m.ram_bytes,
            last_round_pages: last.pages,
            downtime_ms,
            bandwidth_mb_s: m.bandwidth / 1e6,
            throttle_percent: m.throttled,
            total_ms: 0.0,
            steps: m.timeline.steps,
        };
        Ok((stats, done))
    }
}

/// Whether the throttle steps up: the dirty set did not shrink by a fifth
/// over the last round (the guest writes about as fast as the sink drains,
/// or faster).
fn should_throttle(before: Option<f64>, pending: f64) -> bool {
    before.is_some_and(|b| pending >= b * 0.8)
}

/// A pre-copy's sink between rounds, and what it measured.
struct Moving<S> {
    sink: S,
    ram_bytes: u64,
    /// Bytes per second, as last measured.
    bandwidth: f64,
    pages_sent: u64,
    /// How long the last round took (for the dirty rate).
    round_time: Duration,
    /// The auto-converge throttle reached, percent.
    throttled: u32,
    /// How long the last fetch of the dirty log took.
    fetch_time: Duration,
    /// The downtime expected when the stop-and-copy began, seconds.
    expected_s: f64,
    /// The steps so far.
    timeline: Timeline,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_downtime_counts_pages_state_fetch_and_pause() {
        let fetch = Duration::from_millis(4);
        // 10 MB at 1 GB/s: 10 ms, plus the state (16 KiB: 0.016 ms), the
        // fetch and the allowance.
        let e = expected_downtime(10e6, 1e9, fetch) * 1e3;
        let want = 10.0 + 0.016384 + 4.0 + PAUSE_ALLOWANCE.as_secs_f64() * 1e3;
        assert!((e - want).abs() < 1e-6, "{e} vs {want}");
        // Nothing dirty still costs the pause and the fetch.
        assert!(expected_downtime(0.0, 1e9, fetch) > 0.014);
        // A zero bandwidth does not divide by zero.
        assert!(expected_downtime(1.0, 0.0, fetch).is_finite());
    }

    #[test]
    fn throttle_steps_up_only_when_the_dirty_set_does_not_shrink() {
        assert!(!should_throttle(None, 100.0));
        assert!(!should_throttle(Some(100.0), 79.0));
        assert!(should_throttle(Some(100.0), 80.0));
        assert!(should_throttle(Some(100.0), 150.0));
    }

    #[test]
    fn throttle_steps_climb_and_stay_at_the_top() {
        let t = Throttle {
            percent: AtomicU32::new(0),
            slice: Mutex::new(()),
        };
        let steps: Vec<u32> = (0..8).map(|_| t.step_up()).collect();
        assert_eq!(steps, [20, 40, 60, 80, 95, 99, 99, 99]);
    }
}
