//! Live snapshots: a fixed-ram image of the VM exactly as it was at one
//! instant, written while the vCPUs keep running.
//!
//! Userfaultfd write protection is applied over guest RAM while the vCPUs
//! run (bg-snapshot's pre-arm: a guest write meanwhile is let through and
//! its block remembered). The vCPUs are paused only to capture the device
//! state and re-protect the blocks written since, so the pause does not grow
//! with RAM; then they run on while walker threads copy every block once
//! into the image; a guest write to a block not yet copied is held until
//! the fault thread has copied the page it writes (only that page is
//! un-protected; the block's walker takes the copy). The image is committed
//! with the device state of the pause, so it is the VM at that instant.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bg_snapshot::{
    Armed, BlockSink, CancelHandle, MemRange, PreArmed, SnapshotError, SnapshotReport,
};
use fixed_ram::{ImageWriter, Layout};
use microvm::devices::virtio::disk_copy::{CopyCancel, DiskCopy, DiskCopyError};
use microvm::persist::VmSnapshot;
use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{GuestMemory, RunState, VmController};
use serde::Serialize;

use super::disk_snapshot::{self, DiskCopyStats, Running, Starts};
use super::fixed::ChannelOptions;
use super::{
    create_temp, file_sizes, publish, region_specs, snapshot, SaveControl, SaveError, PAGE_SIZE,
};
use crate::progress::Progress;

/// Default block size of a live snapshot: the unit of the walk, of
/// re-protection and of the image's checksums. A guest write to a block
/// not yet copied costs one page's copy ([`Walk::fault_copy_bytes`]), not
/// the block's. A write to a block already copied un-protects the whole
/// block with one fault, so larger blocks mean fewer faults for a guest
/// writing all over its memory: with 1 MiB instead of 256 KiB, a 4 GiB
/// guest writing hard took 2.4x fewer faults and the snapshot 1.4x less
/// time (docs/benchmarks.md, "Live snapshot").
pub const BLOCK_SIZE: usize = 1 << 20;

/// How a live snapshot walks guest RAM (the defaults unless tuning).
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// Block size: a power of two from 4 KiB ([`BLOCK_SIZE`]).
    pub block_size: usize,
    /// Record never-populated blocks as holes without reading them (true).
    pub skip_unpopulated: bool,
    /// What a guest write to a block not yet copied copies and
    /// un-protects: the aligned run of this many bytes holding the page (a
    /// power of two from 4 KiB up to the block size; default one page).
    pub fault_copy_bytes: usize,
}

impl Default for Walk {
    fn default() -> Self {
        Walk {
            block_size: BLOCK_SIZE,
            skip_unpopulated: true,
            fault_copy_bytes: PAGE_SIZE,
        }
    }
}

/// What a live snapshot did.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    /// Target file.
    pub path: std::path::PathBuf,
    /// File size.
    pub bytes: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Device-state bytes.
    pub device_state_bytes: u64,
    /// How long the vCPUs were paused, from the pause request to resumed:
    /// the sum of the four `pause_*` parts.
    pub paused_ms: f64,
    /// In the pause: stopping the vCPUs.
    pub pause_stop_ms: f64,
    /// In the pause: capturing the device state.
    pub pause_state_ms: f64,
    /// In the pause: completing the protection (stopping the pre-arm fault
    /// thread and re-protecting the blocks written since the pre-arm).
    pub arm_ms: f64,
    /// In the pause: resuming the vCPUs.
    pub pause_resume_ms: f64,
    /// Blocks re-protected in the pause.
    pub blocks_reprotected_paused: u64,
    /// Write-protecting all of RAM while the vCPUs ran (before the pause).
    pub pre_arm_ms: f64,
    /// Guest writes let through (block un-protected) before the pause.
    pub pre_arm_faults: u64,
    /// Blocks re-protected while the vCPUs ran, and in how many rounds.
    pub blocks_reprotected_running: u64,
    /// Re-protect rounds while the vCPUs ran.
    pub pre_arm_rounds: u32,
    /// Total time until the image was committed.
    pub total_ms: f64,
    /// Blocks copied by the walkers.
    pub blocks_by_walkers: u64,
    /// Blocks the fault thread copied whole, because a vCPU wrote them
    /// while the pool of page copies was full.
    pub blocks_by_faults: u64,
    /// Pages copied (their content at the pause) because a vCPU wrote them
    /// before their block was walked.
    pub pages_by_faults: u64,
    /// Blocks the walkers completed from page copies made by faults and
    /// the still-protected rest of the block.
    pub blocks_with_fault_pages: u64,
    /// Most page copies held at once, waiting for their blocks' walkers.
    pub fault_pages_peak: u64,
    /// Blocks never populated, recorded as holes without reading them
    /// (counted in the two above too).
    pub blocks_unpopulated: u64,
    /// Write faults taken.
    pub faults: u64,
    /// Median fault latency (µs).
    pub fault_latency_median_us: f64,
    /// 99th percentile fault latency (µs).
    pub fault_latency_p99_us: f64,
    /// Longest fault (µs).
    pub fault_latency_max_us: f64,
    /// Whether never-touched memory was protected by WP_UNPOPULATED (else pre-touched).
    pub wp_unpopulated: bool,
    /// The disk copies (`--disk-snapshot`), in slot order.
    pub disks: Vec<DiskCopyStats>,
}

/// Shared with the API so that `cancel` can reach a running snapshot.
#[derive(Default)]
pub struct CancelSlot(Mutex<Option<(CancelHandle, Vec<CopyCancel>)>>);

impl CancelSlot {
    /// Cancels the running snapshot (memory and disk copies); false if none runs.
    pub fn cancel(&self) -> bool {
        match self.0.lock().ok().and_then(|s| s.clone()) {
            Some((h, disks)) => {
                h.cancel();
                disks.iter().for_each(CopyCancel::cancel);
                true
            }
            None => false,
        }
    }

    fn set(&self, h: Option<(CancelHandle, Vec<CopyCancel>)>) {
        if let Ok(mut s) = self.0.lock() {
            *s = h;
        }
    }
}

/// The fixed-ram writer as bg-snapshot's block sink.
struct ImageSink<'a> {
    writer: &'a ImageWriter,
    block_size: usize,
    direct: Option<File>,
    progress: Option<&'a Progress>,
}

impl BlockSink for ImageSink<'_> {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn write_block(
        &self,
        range: usize,
        block: u64,
        data: &[u8],
    ) -> Result<(), bg_snapshot::SinkError> {
        // Blocks straight from guest memory are page aligned and can go
        // through O_DIRECT; fault copies live in ordinary buffers.
        if let Some(p) = self.progress {
            p.add(data.len() as u64);
        }
        let aligned = (data.as_ptr() as usize).is_multiple_of(PAGE_SIZE);
        let r = match (&self.direct, aligned) {
            (Some(fd), true) => self.writer.write_chunk_via(fd, range, block, data),
            _ => self.writer.write_chunk(range, block, data),
        };
        r.map(|_| ()).map_err(Into::into)
    }

    fn write_zero_block(
        &self,
        range: usize,
        block: u64,
        len: usize,
    ) -> Result<(), bg_snapshot::SinkError> {
        // Never populated: every page a hole, nothing to read or write.
        if let Some(p) = self.progress {
            p.add(len as u64);
        }
        self.writer
            .record_zero_chunk(range, block)
            .map_err(Into::into)
    }
}

fn snap_err(path: &Path) -> impl Fn(SnapshotError) -> SaveError + '_ {
    move |e| match e {
        SnapshotError::Unsupported { .. } => SaveError::Invalid {
            path: path.to_owned(),
            reason: format!("live snapshot impossible: {e}"),
        },
        // Shared memory on tmpfs or hugetlbfs can be write-protected
        // (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, negotiated by bg-snapshot where
        // the kernel has it); a --mem-file on a disk filesystem cannot.
        SnapshotError::UnsupportedMemory { .. } => SaveError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "live snapshot impossible: {e}. A --mem-file can be snapshotted live only on \
                 tmpfs (e.g. /dev/shm) or hugetlbfs, with Linux 5.19 or later; for this VM use \
                 `cryo save --keep-running` (the VM pauses while it is written)"
            ),
        },
        other => SaveError::Image {
            path: path.to_owned(),
            source: other.into(),
        },
    }
}

/// Guest RAM as bg-snapshot's ranges.
pub(crate) fn guest_ranges(memory: &GuestMemory) -> Vec<MemRange> {
    memory
        .iter()
        .map(|r| {
            // SAFETY: guest RAM stays mapped while the VM exists, which
            // outlives the snapshot (the caller holds `memory` throughout);
            // vCPUs write it only with ordinary stores.
            unsafe { MemRange::new(r.as_ptr(), r.len() as usize) }
        })
        .collect()
}

/// How the vCPUs' pause was spent.
struct PauseSplit {
    stop: Duration,
    state: Duration,
    arm: Duration,
    resume: Duration,
}

/// What the pause captured: the device state, the protection, the disk
/// copies started at that instant, and how the pause was spent.
struct Captured {
    snapshot: VmSnapshot,
    armed: Result<Armed, SnapshotError>,
    copies: Result<Vec<DiskCopy>, (usize, DiskCopyError)>,
    split: PauseSplit,
}

/// Pauses the vCPUs, captures the device state (which quiesces the disks),
/// starts the disk copies, completes the protection (the snapshot's
/// instant) and resumes them: the only time they stop. RAM is not armed if
/// a disk copy did not start.
fn pause_and_arm(
    controller: &VmController,
    pre: PreArmed,
    disks: Starts,
) -> Result<Captured, SaveError> {
    let r = controller.call(move |vm| {
        let was_running = vm.state() == RunState::Running;
        let t = Instant::now();
        vm.pause()?;
        let stop = t.elapsed();
        // If the state fails, `pre` drops here: all protection goes.
        let result = vm.save_state().map(|snap| {
            let state = t.elapsed();
            let copies = disks.start();
            let armed = match &copies {
                Ok(_) => pre.arm(),
                Err(_) => Err(SnapshotError::Cancelled),
            };
            (snap, state, armed, copies)
        });
        let armed_at = t.elapsed();
        if was_running {
            let _ = vm.resume();
        }
        result.map(|(snapshot, state, armed, copies)| Captured {
            snapshot,
            armed,
            copies,
            split: PauseSplit {
                stop,
                state: state - stop,
                arm: armed_at - state,
                resume: t.elapsed() - armed_at,
            },
        })
    })??;
    Ok(r)
}

/// The image file, created (as a temporary) before the pause.
struct OpenImage {
    tmp: crate::files::TempFile,
    /// Guest RAM bytes the snapshot copies (the progress total).
    ram_bytes: u64,
    block_size: usize,
    writer: ImageWriter,
    direct: Option<File>,
}

fn open_image(
    path: &Path,
    memory: &GuestMemory,
    channels: &ChannelOptions,
    block_size: usize,
) -> Result<OpenImage, SaveError> {
    // The same error kinds as a stopped save (a missing directory is the
    // request's fault either way).
    let ierr = super::fixed::image_err(path);
    let layout = Layout::with_params(
        PAGE_SIZE as u32,
        fixed_ram::DEFAULT_ALIGNMENT,
        block_size as u64,
        &region_specs(memory),
    )
    .map_err(&ierr)?;
    let (tmp, file) = create_temp(path)?;
    let writer = ImageWriter::from_file(file, layout).map_err(&ierr)?;
    let direct = match multifd::open_with_direct_io(tmp.path(), channels.direct_io, true) {
        Ok((f, true)) => Some(f),
        Ok((_, false)) => None,
        Err(e @ multifd::MultifdError::DirectIoUnsupported { .. }) => {
            return Err(SaveError::BadImage {
                path: path.to_owned(),
                source: e.into(),
            })
        }
        Err(e) => {
            return Err(SaveError::Image {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    };
    Ok(OpenImage {
        tmp,
        ram_bytes: memory.iter().map(|r| r.len()).sum(),
        block_size,
        writer,
        direct,
    })
}

/// Takes a live snapshot of the VM into `path`, walking RAM as `walk`
/// says, and copies each disk to its `disk_targets` entry at the same
/// instant.
pub fn snapshot_vm(
    controller: &VmController,
    path: &Path,
    channels: &ChannelOptions,
    disk_targets: &[PathBuf],
    walk: Walk,
    cancel: &CancelSlot,
    progress: Option<&Progress>,
) -> Result<SnapshotStats, SaveError> {
    crate::files::check_save_target(path).map_err(|e| SaveError::BadRequest(e.0))?;
    let disks = controller.call(|vm| {
        let b = vm.blocks().iter();
        b.map(|b| (b.disk.path.clone(), b.copy_source.clone()))
            .collect::<Vec<_>>()
    })?;
    let disks = disk_snapshot::prepare(disk_targets, disks, path)?;
    if let Some(p) = progress {
        p.phase("pausing");
    }
    let start = Instant::now();
    let serr = snap_err(path);
    let memory = controller.call(|vm| vm.memory().clone())?;
    let image = open_image(path, &memory, channels, walk.block_size)?;
    if let Some(p) = progress {
        // Known before the write protection, which runs before the pause
        // and can take a while: a client sees the size from then on.
        p.set_total(image.ram_bytes);
    }
    // Register and protect while the vCPUs run; the pause only re-protects
    // what they wrote meanwhile.
    let opts = bg_snapshot::ArmOptions {
        skip_unpopulated: walk.skip_unpopulated,
        fault_copy_bytes: walk.fault_copy_bytes,
        ..Default::default()
    };
    let pre = bg_snapshot::prepare_with(&guest_ranges(&memory), walk.block_size, opts)
        .and_then(|p| p.pre_arm())
        .map_err(&serr)?;
    let pre_stats = pre.stats();
    let (disks, starts) = disks.split();
    let captured = pause_and_arm(controller, pre, starts)?;
    // Disk copy errors first: RAM was not armed when one failed.
    let disks = disks.started(captured.copies)?;
    let armed = captured.armed.map_err(&serr)?;
    let (mut snapshot, split) = (captured.snapshot, captured.split);
    cancel.set(Some((armed.cancel_handle(), disks.cancel_handles())));
    let result = copy_and_commit(path, image, armed, disks, &mut snapshot, channels, progress).map(
        |(report, bytes, allocated, state_bytes, disks)| {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let pa = report.pre_arm.unwrap_or(pre_stats);
            SnapshotStats {
                path: path.to_owned(),
                bytes,
                allocated_bytes: allocated,
                device_state_bytes: state_bytes,
                paused_ms: ms(split.stop + split.state + split.arm + split.resume),
                pause_stop_ms: ms(split.stop),
                pause_state_ms: ms(split.state),
                arm_ms: ms(split.arm),
                pause_resume_ms: ms(split.resume),
                blocks_reprotected_paused: pa.blocks_reprotected_paused,
                pre_arm_ms: ms(pa.protect_time),
                pre_arm_faults: pa.faults,
                blocks_reprotected_running: pa.blocks_reprotected_running,
                pre_arm_rounds: pa.rounds,
                total_ms: ms(start.elapsed()),
                blocks_by_walkers: report.blocks_by_walkers,
                blocks_by_faults: report.blocks_by_faults,
                pages_by_faults: report.pages_by_faults,
                blocks_with_fault_pages: report.blocks_with_fault_pages,
                fault_pages_peak: report.fault_pages_peak,
                blocks_unpopulated: report.blocks_unpopulated,
                faults: report.faults,
                fault_latency_median_us: ms(report.fault_latency.median) * 1000.0,
                fault_latency_p99_us: ms(report.fault_latency.p99) * 1000.0,
                fault_latency_max_us: ms(report.fault_latency.max) * 1000.0,
                wp_unpopulated: report.wp_unpopulated,
                disks,
            }
        },
    );
    cancel.set(None);
    drop(memory);
    result
}

/// What a committed snapshot reports: the copy's report, file size,
/// allocated bytes, device-state bytes and the disk copies.
type Committed = (SnapshotReport, u64, u64, u64, Vec<DiskCopyStats>);

/// Runs the armed snapshot into the image, waits for the disk copies, and
/// commits the image with the device state (naming the copies).
fn copy_and_commit(
    path: &Path,
    image: OpenImage,
    armed: Armed,
    disks: Running,
    snapshot: &mut VmSnapshot,
    channels: &ChannelOptions,
    progress: Option<&Progress>,
) -> Result<Committed, SaveError> {
    let serr = snap_err(path);
    let ierr = super::fixed::image_err(path);
    if let Some(p) = progress {
        p.phase("copying");
    }
    let sink = ImageSink {
        writer: &image.writer,
        block_size: image.block_size,
        direct: image.direct,
        progress,
    };
    let report = armed
        .run(&sink, channels.channels.max(1))
        .map_err(|e| match e {
            SnapshotError::Cancelled => SaveError::Cancelled("snapshot"),
            other => serr(other),
        })?;
    drop(sink);
    if let (Some(p), false) = (progress, disks.is_empty()) {
        p.phase("copying disks");
    }
    let disks = disks.finish()?;
    // The image names the copies, as they were at the pause.
    disks.record(snapshot);
    if let Some(p) = progress {
        p.phase("committing");
    }
    let device_state =
        snapshot::encode(snapshot, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
            path: path.to_owned(),
            source: e.into(),
        })?;
    let file = image.writer.commit(&device_state).map_err(&ierr)?;
    let (bytes, allocated) = file_sizes(&file, path)?;
    drop(file);
    let disks = disks.publish()?;
    // A live snapshot is consistent while the VM runs: only a cancel stops it.
    publish(image.tmp, path, &SaveControl::default())?;
    Ok((report, bytes, allocated, device_state.len() as u64, disks))
}
