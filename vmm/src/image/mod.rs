//! Saved-VM images: what `cryo save` writes and `cryo restore` reads.
//!
//! Two formats share one device-state encoding (migration-stream sections,
//! see [`sections`]):
//! - `fixed-ram` (the default, docs/fixed-ram-format.md): every guest page at
//!   a fixed offset, zero pages as holes, chunk checksums; restored eagerly
//!   (parallel reads into guest memory) or lazily (the page area mapped
//!   copy-on-write as guest memory).
//! - `stream` (docs/stream-format.md): one sequential stream of sections and
//!   page records.
//!
//! A save never leaves a file under the target name that would restore
//! wrong: it writes `.<name>.tmp-<pid>-<random>` beside the target, fsyncs
//! it, renames it over the target and fsyncs the directory. A failed or
//! cancelled save removes the temporary file it created (and only that) and
//! leaves the VM as it was (running, or paused). Temporary files of saves
//! whose process died are removed by the next save to the same target.

pub mod disk_snapshot;
pub mod fixed;
pub mod live;
pub mod live_save;
pub mod migrate;
pub mod precopy;
pub mod snapshot;
pub mod stream;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microvm::persist::VmSnapshot;
use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{GuestMemory, RunState, VmController};
use serde::{Deserialize, Serialize};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;

/// Section names in a saved image's device state (each state's
/// [`StateSection::NAME`](microvm::persist::StateSection::NAME)).
pub mod sections {
    use microvm::devices::virtio::state::{BlockDeviceState, NetDeviceState};
    use microvm::persist::{
        CmosState, I8042State, MachineState, SerialState, StateSection, VcpuState, VmState,
    };
    /// [`microvm::persist::MachineState`], always first.
    pub const MACHINE: &str = MachineState::NAME;
    /// [`microvm::persist::VmState`].
    pub const KVM_VM: &str = VmState::NAME;
    /// [`microvm::persist::VcpuState`], instance = vCPU index.
    pub const VCPU: &str = VcpuState::NAME;
    /// [`microvm::persist::SerialState`].
    pub const SERIAL: &str = SerialState::NAME;
    /// [`microvm::persist::I8042State`].
    pub const I8042: &str = I8042State::NAME;
    /// [`microvm::persist::CmosState`].
    pub const CMOS: &str = CmosState::NAME;
    /// [`microvm::devices::virtio::state::BlockDeviceState`], instance = MMIO slot.
    pub const VIRTIO_BLK: &str = BlockDeviceState::NAME;
    /// [`microvm::devices::virtio::state::NetDeviceState`], instance = MMIO slot.
    pub const VIRTIO_NET: &str = NetDeviceState::NAME;
}

/// The image formats `save` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaveFormat {
    /// Every page at a fixed offset (docs/fixed-ram-format.md).
    #[default]
    FixedRam,
    /// A sequential migration stream (docs/stream-format.md).
    Stream,
}

/// What a save did.
#[derive(Clone, Debug, Serialize)]
pub struct SaveStats {
    /// Target file.
    pub path: PathBuf,
    /// Format written.
    pub format: SaveFormat,
    /// File size (apparent).
    pub bytes: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// Non-zero pages written.
    pub ram_pages: u64,
    /// Zero pages (not written).
    pub zero_pages: u64,
    /// Time the VM was paused for the save, in milliseconds.
    pub paused_ms: f64,
    /// Total time, in milliseconds.
    pub total_ms: f64,
    /// The disk copies (`--disk-snapshot`), in slot order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<disk_snapshot::DiskCopyStats>,
}

/// Sizes of a written image.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    /// File size.
    pub bytes: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Device-state bytes.
    pub device_state_bytes: u64,
    /// Non-zero pages stored.
    pub ram_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// How long each phase took (fixed-ram file saves; zero elsewhere).
    pub phases: SavePhases,
}

/// The phases of a fixed-ram save, as the save itself timed them: what a
/// caller (`cryo bench save-restore`) reads to say where the time goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SavePhases {
    /// Creating the temporary file and writing the page data (not durable yet).
    pub data: Duration,
    /// Writing the bitmaps, the checksum table and the device state.
    pub metadata: Duration,
    /// Making the file durable: the sync of data and metadata, the header
    /// and its sync.
    pub sync: Duration,
    /// Renaming the file into place and syncing the directory.
    pub publish: Duration,
}

/// What failed underneath a save or load, by layer.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The fixed-ram image.
    #[error(transparent)]
    FixedRam(#[from] fixed_ram::FixedRamError),
    /// The migration stream (stream files, device state).
    #[error(transparent)]
    Stream(#[from] migration_stream::StreamError),
    /// The page channels.
    #[error(transparent)]
    Multifd(#[from] multifd::MultifdError),
    /// The live-snapshot engine.
    #[error(transparent)]
    Snapshot(#[from] bg_snapshot::SnapshotError),
    /// Guest memory for the image.
    #[error(transparent)]
    Memory(#[from] microvm::MemoryError),
}

/// Why a save or load failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The VM could not be paused or its state read.
    #[error("capturing VM state: {0}")]
    Vm(#[from] microvm::Error),
    /// The target could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The image writer or reader failed.
    #[error("writing {path}: {source}")]
    Image {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// A migration stream broke while it was being received (the source or
    /// the link died, or the source gave up).
    #[error("receiving from {path}: {source}")]
    Receive {
        /// The endpoint listened on.
        path: PathBuf,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The image's device state does not make a VM (damaged, or from a newer cryo).
    #[error("{path}: device state: {source}")]
    DeviceState {
        /// File (or peer).
        path: PathBuf,
        /// Why.
        #[source]
        source: snapshot::DeviceStateError,
    },
    /// The file (or peer) is not a valid saved VM, or cannot be used as
    /// asked (e.g. O_DIRECT where the filesystem refuses it), as a lower
    /// layer found (bad input).
    #[error("{path}: {source}")]
    BadImage {
        /// File (or peer).
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ImageError,
    },
    /// The file is not a valid saved VM.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The request cannot be carried out as asked (a bad target or option).
    #[error("{0}")]
    BadRequest(String),
    /// The VM ran while a stopped save wrote its memory, so the image would
    /// be torn: it is discarded.
    #[error("{path}: the VM ran while its memory was being written; the image was discarded")]
    RanDuringSave {
        /// The target that was not committed.
        path: PathBuf,
    },
    /// The save or snapshot was cancelled (by `cancel`, `quit` or a signal).
    #[error("the {0} was cancelled; no file was written")]
    Cancelled(&'static str),
    /// `--disk-snapshot` was given a number of times other than the VM's
    /// number of disks.
    #[error("--disk-snapshot given {targets} times, but the VM has {disks} disks (one copy per disk, in slot order)")]
    DiskSnapshotCount {
        /// Disks of the VM.
        disks: usize,
        /// Targets given.
        targets: usize,
    },
    /// A disk copy failed (the VM runs on, nothing was written).
    #[error("disk snapshot {path}: {source}")]
    DiskCopy {
        /// The copy's target.
        path: PathBuf,
        /// Why.
        #[source]
        source: microvm::devices::virtio::disk_copy::DiskCopyError,
    },
    /// A received VM names a disk this host refuses (missing, or changed
    /// since the save): refused before the ACK, so the source runs on.
    #[error("receiving from {endpoint}: {source}")]
    DiskRefused {
        /// The endpoint listened on.
        endpoint: PathBuf,
        /// The disk and why.
        #[source]
        source: microvm::devices::virtio::block::DiskError,
    },
    /// A received VM's net devices cannot have the taps this host gives
    /// them (busy, a bad name, the wrong number or MAC): refused before the
    /// ACK, so the source runs on.
    #[error("receiving from {endpoint}: {source}")]
    NetRefused {
        /// The endpoint listened on.
        endpoint: PathBuf,
        /// The tap and why.
        #[source]
        source: microvm::Error,
    },
    /// A finished disk copy could not be identified.
    #[error("disk snapshot {path}: {source}")]
    DiskIdentity {
        /// The copy's target.
        path: PathBuf,
        /// Why.
        #[source]
        source: microvm::devices::virtio::block::DiskError,
    },
    /// Dirty logging failed (live migration).
    #[error("dirty logging: {0}")]
    DirtyLog(#[from] dirty_log::Error),
    /// A live migration or live save did not finish within its time limit;
    /// the VM runs on.
    #[error("the live {what} did not finish within {limit_s} s; the VM runs on here")]
    NotConverged {
        /// "migration" or "save".
        what: &'static str,
        /// The limit, seconds.
        limit_s: u64,
    },
}

impl SaveError {
    /// A lower layer's error while writing `path`: its I/O errors are
    /// [`SaveError::Write`] (the target's fault, e.g. a full disk), the rest
    /// [`SaveError::Image`].
    pub fn writing(path: &Path, e: impl Into<ImageError>) -> SaveError {
        match e.into() {
            ImageError::FixedRam(fixed_ram::FixedRamError::Io { source, .. })
            | ImageError::Stream(migration_stream::StreamError::Io { source, .. }) => {
                SaveError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
            other => SaveError::Image {
                path: path.to_owned(),
                source: other,
            },
        }
    }

    /// The API error kind for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            SaveError::Write { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::PermissionDenied
                        | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                "bad-request"
            }
            // A target the request cannot use (e.g. O_DIRECT where the
            // filesystem refuses it).
            SaveError::Invalid { .. }
            | SaveError::BadRequest(_)
            | SaveError::DiskSnapshotCount { .. }
            | SaveError::BadImage { .. }
            | SaveError::DiskRefused { .. }
            | SaveError::NetRefused { .. }
            | SaveError::DeviceState { .. } => "bad-request",
            SaveError::Cancelled(_) => "cancelled",
            SaveError::NotConverged { .. } => "timeout",
            _ => "failed",
        }
    }

    /// Whether this is the input's fault (exit status 2) rather than a runtime failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SaveError::Read { .. }
                | SaveError::Invalid { .. }
                | SaveError::BadRequest(_)
                | SaveError::BadImage { .. }
                | SaveError::DiskRefused { .. }
                | SaveError::NetRefused { .. }
                | SaveError::DeviceState { .. }
        )
    }
}

/// What a save in progress answers to: a cancel request, and (for a stopped
/// save) the VM that must stay paused until the image is committed.
#[derive(Clone, Default)]
pub struct SaveControl {
    cancelled: Arc<AtomicBool>,
    /// The VM is ending: its event loop no longer answers controller calls.
    vm_ending: Arc<AtomicBool>,
    frozen: Option<VmController>,
}

impl SaveControl {
    /// A control for a save of the VM behind `controller`, which must stay
    /// paused while the save writes its memory.
    pub fn for_vm(controller: &VmController) -> SaveControl {
        SaveControl::default().watching(controller)
    }

    /// The same cancel flag, checking that the VM behind `controller` stays paused.
    fn watching(&self, controller: &VmController) -> SaveControl {
        SaveControl {
            cancelled: Arc::clone(&self.cancelled),
            vm_ending: Arc::clone(&self.vm_ending),
            frozen: Some(controller.clone()),
        }
    }

    /// The VM is ending (quit, signal): cancels the save, which must not
    /// touch the VM any more.
    pub fn cancel_for_vm_end(&self) {
        self.vm_ending.store(true, Ordering::Release);
        self.cancel();
    }

    pub(crate) fn vm_ending(&self) -> bool {
        self.vm_ending.load(Ordering::Acquire)
    }

    /// Asks the save to stop at its next check and remove its file.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Whether [`SaveControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Err when the save must stop now.
    pub fn check(&self, what: &'static str) -> Result<(), SaveError> {
        if self.is_cancelled() {
            Err(SaveError::Cancelled(what))
        } else {
            Ok(())
        }
    }

    /// Err unless the image just written is the VM as it was paused: not
    /// cancelled, and the VM still paused (nothing resumed it meanwhile).
    fn check_before_commit(&self, path: &Path) -> Result<(), SaveError> {
        self.check("save")?;
        if let Some(c) = &self.frozen {
            let state = c.call(|vm| vm.state())?;
            if state != RunState::Paused {
                return Err(SaveError::RanDuringSave {
                    path: path.to_owned(),
                });
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for SaveControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveControl")
            .field("cancelled", &self.is_cancelled())
            .field("checks_vm", &self.frozen.is_some())
            .finish()
    }
}

pub use crate::files::temp_path;

/// fsyncs the directory holding `path`, so that a rename in it is durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Where a save goes.
#[derive(Clone, Debug)]
pub enum SaveTarget {
    /// A file.
    File(PathBuf),
    /// A `cryo restore --listen` peer.
    Peer(multifd::Endpoint),
}

impl SaveTarget {
    /// `tcp:HOST:PORT` and `unix:PATH` are peers; anything else is a file path.
    pub fn parse(s: &str) -> Result<SaveTarget, multifd::MultifdError> {
        if s.starts_with("tcp:") || s.starts_with("unix:") {
            multifd::parse_endpoint(s).map(SaveTarget::Peer)
        } else {
            Ok(SaveTarget::File(PathBuf::from(s)))
        }
    }
}

/// Options of a save.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Image format (files).
    pub format: SaveFormat,
    /// Resume the VM afterwards instead of ending it.
    pub keep_running: bool,
    /// File channels and O_DIRECT.
    pub channels: fixed::ChannelOptions,
    /// Socket compression (peers).
    pub compression: Option<migrate::CompressionArg>,
    /// Where to report progress.
    pub progress: Option<std::sync::Arc<crate::progress::Progress>>,
    /// Cancellation, and the check that the VM stayed paused.
    pub control: SaveControl,
    /// `--disk-snapshot`: a copy of each disk (in slot order) made inside
    /// the pause, which the image then names. Only for a file save that
    /// keeps the VM running (a stopped save ends the VM, so its disks do
    /// not change after it).
    pub disk_targets: Vec<PathBuf>,
}

/// Checks `opts.disk_targets` against `target` and the VM's disks, and
/// creates the copies' temporary files (before the pause).
fn prepare_disk_copies(
    controller: &VmController,
    target: &SaveTarget,
    opts: &SaveOptions,
) -> Result<disk_snapshot::Pending, SaveError> {
    let bad = |e: &str| Err(SaveError::BadRequest(format!("--disk-snapshot {e}")));
    let path = match target {
        _ if opts.disk_targets.is_empty() => {
            return disk_snapshot::prepare(&[], Vec::new(), Path::new(""))
        }
        SaveTarget::Peer(_) => return bad("applies to a file save, not to a peer"),
        SaveTarget::File(_) if !opts.keep_running => {
            return bad(
                "needs --keep-running: a stopped save ends the VM, so its disks stay as saved",
            )
        }
        SaveTarget::File(path) => path.as_path(),
    };
    let disks = controller.call(|vm| {
        let b = vm.blocks().iter();
        b.map(|b| (b.disk.path.clone(), b.copy_source.clone()))
            .collect::<Vec<_>>()
    })?;
    disk_snapshot::prepare(&opts.disk_targets, disks, path)
}

/// Waits for the disk copies started in the pause (the VM still paused, so
/// nothing writes the disks meanwhile) and names them in `snapshot`.
fn finish_disk_copies(
    targets: disk_snapshot::Targets,
    copies: Result<
        Vec<microvm::devices::virtio::disk_copy::DiskCopy>,
        (usize, microvm::devices::virtio::disk_copy::DiskCopyError),
    >,
    snapshot: &mut VmSnapshot,
) -> Result<disk_snapshot::Finished, SaveError> {
    let finished = targets.started(copies)?.finish()?;
    finished.record(snapshot);
    Ok(finished)
}

/// Pauses the VM, writes it to `target`, and resumes it when `keep_running`
/// (the caller ends it otherwise). On failure the VM is resumed if it was running.
pub fn save_vm(
    controller: &VmController,
    target: &SaveTarget,
    opts: &SaveOptions,
) -> Result<SaveStats, SaveError> {
    let keep_running = opts.keep_running;
    let format = opts.format;
    let progress = opts.progress.as_deref();
    // Refuse an unusable target before the VM is paused.
    if let SaveTarget::File(path) = target {
        crate::files::check_save_target(path).map_err(|e| SaveError::BadRequest(e.0))?;
    }
    let (targets, starts) = prepare_disk_copies(controller, target, opts)?.split();
    let control = opts.control.watching(controller);
    control.check("save")?;
    if let Some(p) = progress {
        p.phase("pausing");
    }
    let start = Instant::now();
    let (mut snapshot, memory, was_running, copies) = controller.call(|vm| {
        let was_running = vm.state() == RunState::Running;
        vm.pause()?;
        match vm.save_state() {
            // The disks were quiesced by save_state: the copies start here.
            Ok(s) => Ok((s, vm.memory().clone(), was_running, starts.start())),
            Err(e) => {
                if was_running {
                    let _ = vm.resume();
                }
                Err(e)
            }
        }
    })??;
    let copies = match finish_disk_copies(targets, copies, &mut snapshot) {
        Ok(c) => c,
        Err(e) => {
            if was_running {
                let _ = controller.resume();
            }
            return Err(e);
        }
    };
    if let Some(p) = progress {
        p.set_total(memory.iter().map(|r| r.len()).sum());
    }
    let (path, written) = match target {
        SaveTarget::File(path) => (
            path.clone(),
            match format {
                SaveFormat::Stream => {
                    stream::write_stream_file(path, &snapshot, &memory, progress, &control)
                }
                SaveFormat::FixedRam => fixed::write_fixed_file(
                    path,
                    &snapshot,
                    &memory,
                    &opts.channels,
                    progress,
                    &control,
                ),
            },
        ),
        SaveTarget::Peer(endpoint) => (PathBuf::from(endpoint.to_string()), {
            if let Some(p) = progress {
                p.phase("sending");
            }
            control
                .check("save")
                .and_then(|()| migrate::send_vm(endpoint, &snapshot, &memory, opts))
        }),
    };
    // The copies go in place once the image is (a crash between leaves an
    // image that names copies not there: refused at restore, never wrong).
    let written = written.and_then(|w| copies.publish().map(|d| (w, d)));
    let paused_ms = start.elapsed().as_secs_f64() * 1000.0;
    if was_running {
        if written.is_err() {
            if !control.vm_ending() {
                // Best effort: a failed or cancelled save leaves the VM running.
                let _ = controller.resume();
            }
        } else if keep_running {
            controller.resume()?;
        }
    }
    let (w, disks) = written?;
    Ok(SaveStats {
        path,
        format,
        bytes: w.bytes,
        allocated_bytes: w.allocated_bytes,
        device_state_bytes: w.device_state_bytes,
        ram_pages: w.ram_pages,
        zero_pages: w.zero_pages,
        paused_ms,
        total_ms: start.elapsed().as_secs_f64() * 1000.0,
        disks,
    })
}

/// The format of a saved file, from its first bytes.
pub fn detect_format(path: &Path) -> Result<SaveFormat, SaveError> {
    let f = File::open(path).map_err(|source| SaveError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut head = Vec::with_capacity(8);
    f.take(8)
        .read_to_end(&mut head)
        .map_err(|source| SaveError::Read {
            path: path.to_owned(),
            source,
        })?;
    let (magic, n) = {
        let mut m = [0u8; 8];
        m[..head.len()].copy_from_slice(&head);
        (m, head.len())
    };
    if magic == migration_stream::MAGIC {
        Ok(SaveFormat::Stream)
    } else if magic == fixed_ram::MAGIC || (n == magic.len() && magic == [0u8; 8]) {
        // A zero header is a fixed-ram image whose save never committed:
        // the fixed-ram reader says so.
        Ok(SaveFormat::FixedRam)
    } else {
        Err(SaveError::Invalid {
            path: path.to_owned(),
            reason: "not a cryo image (neither a migration stream nor a fixed-ram image)".into(),
        })
    }
}

/// How `restore` brings guest memory back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read every present page into fresh guest memory before resuming.
    #[default]
    Eager,
    /// Map the image's page areas copy-on-write as guest memory and resume at once.
    Lazy {
        /// Warm the rest in the background after resuming.
        prefetch: bool,
    },
}

/// A loaded image, ready to become a VM.
pub struct Loaded {
    /// Device state.
    pub snapshot: VmSnapshot,
    /// Guest memory holding (or mapping) the RAM.
    pub memory: GuestMemory,
    /// For a lazy restore with prefetch: what to warm after resuming.
    pub prefetch: Option<fixed::Prefetch>,
    /// The KVM VM over `memory`, made while the RAM was read (an eager
    /// restore), while the rest of the image was read and checked (a lazy
    /// one) or while the RAM arrived (a migration's destination); None: the
    /// restore makes it ([`Loaded::take_shell`]).
    pub shell: Option<microvm::VmShell>,
}

impl Loaded {
    /// The KVM VM over the memory: the one made while the RAM was read or
    /// arrived, or a new one.
    pub fn take_shell(&mut self) -> Result<microvm::VmShell, microvm::Error> {
        match self.shell.take() {
            Some(shell) => Ok(shell),
            None => microvm::VmShell::new(self.memory.clone()),
        }
    }
}

/// Loads any image format. `verify` checks every checksum first (fixed-ram).
pub fn load(
    path: &Path,
    mode: RestoreMode,
    verify: bool,
    channels: &fixed::ChannelOptions,
    progress: Option<&crate::progress::Progress>,
) -> Result<Loaded, SaveError> {
    match detect_format(path)? {
        SaveFormat::Stream => {
            if mode != RestoreMode::Eager {
                return Err(SaveError::Invalid {
                    path: path.to_owned(),
                    reason: "a stream image can only be restored eagerly (--lazy needs a fixed-ram image)".into(),
                });
            }
            let (snapshot, memory) = stream::load_stream_file(path)?;
            Ok(Loaded {
                snapshot,
                memory,
                prefetch: None,
                shell: None,
            })
        }
        SaveFormat::FixedRam => {
            fixed::load_fixed_with(path, mode, verify, channels, &|_| {}, progress)
        }
    }
}

/// The bytes of a guest memory region, for reading while the VM is paused.
pub fn region_bytes(region: &microvm::GuestRegion) -> &[u8] {
    let len = region.len() as usize;
    let ptr = region.as_ptr();
    // SAFETY: the region is a live mapping of `len` bytes owned by the
    // region, which outlives the returned slice (same lifetime); the vCPUs
    // are paused, so nothing writes it while we read.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// The bytes of a guest memory region, for filling before the VM runs.
///
/// # Safety
///
/// While the returned slice lives, nothing else may read or write the
/// region's bytes: no vCPU runs on this memory and no other reference
/// (from this function, [`region_bytes`] or vm-memory's accessors) to the
/// same bytes is in use.
#[allow(clippy::mut_from_ref)]
pub unsafe fn region_bytes_mut(region: &microvm::GuestRegion) -> &mut [u8] {
    let len = region.len() as usize;
    let ptr = region.as_ptr();
    // SAFETY: the region is a live mapping of `len` bytes owned by the
    // region; exclusive use is the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}

/// The guest memory regions as fixed-ram region specs.
pub fn region_specs(memory: &GuestMemory) -> Vec<fixed_ram::RegionSpec> {
    memory
        .iter()
        .map(|r| fixed_ram::RegionSpec {
            guest_addr: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

/// (apparent, allocated) size of a written image.
pub fn file_sizes(file: &File, path: &Path) -> Result<(u64, u64), SaveError> {
    let bytes = file
        .metadata()
        .map_err(|source| SaveError::Write {
            path: path.to_owned(),
            source,
        })?
        .len();
    Ok((bytes, page_runs::allocated_bytes(file)))
}

/// Makes a complete temporary image the target: check that the save may
/// still commit (not cancelled, VM still paused), rename, then fsync the
/// directory so that the rename survives a crash.
pub fn publish(
    tmp: crate::files::TempFile,
    path: &Path,
    control: &SaveControl,
) -> Result<(), SaveError> {
    control.check_before_commit(path)?;
    let werr = |source| SaveError::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::rename(tmp.path(), path).map_err(werr)?;
    tmp.keep();
    sync_dir(path).map_err(werr)
}

/// Creates the temporary file of a save to `path` (mode 0600, never an
/// existing file), after removing those of dead saves to the same target.
pub fn create_temp(path: &Path) -> Result<(crate::files::TempFile, File), SaveError> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::files::remove_stale_temps(path);
    let tmp = temp_path(path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| SaveError::Write {
            path: path.to_owned(),
            source,
        })?;
    Ok((crate::files::TempFile::created(tmp), file))
}
