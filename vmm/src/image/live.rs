//! Live snapshots: a fixed-ram image of the VM exactly as it was at one
//! instant, written while the vCPUs keep running.
//!
//! The vCPUs are paused only to capture the device state and arm
//! userfaultfd write protection over guest RAM (bg-snapshot); then they run
//! on while walker threads copy every block once into the image; a guest
//! write to a block not yet copied is held until the fault thread has
//! copied that block. The image is committed with the device state of the
//! pause, so it is the VM at that instant.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bg_snapshot::{Armed, BlockSink, CancelHandle, MemRange, Prepared, SnapshotError};
use fixed_ram::{ImageWriter, Layout};
use microvm::devices::virtio::disk_copy::{CopyCancel, DiskCopy, DiskCopyError};
use microvm::persist::VmSnapshot;
use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{MicroVm, RunState, VmController};
use serde::Serialize;

use super::disk_snapshot::{self, DiskCopyStats, Starts};
use super::fixed::ChannelOptions;
use super::{
    create_temp, file_sizes, publish, region_specs, snapshot, SaveControl, SaveError, PAGE_SIZE,
};
use crate::progress::Progress;

/// Block size of a live snapshot: the unit of copy, of write protection and
/// of the image's checksums. Smaller blocks hold a faulting vCPU for less
/// time (one block copy); 256 KiB keeps the fault latency near 0.1 ms here.
pub const BLOCK_SIZE: usize = 256 << 10;

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
    /// How long the vCPUs were paused (capture state + arm protection).
    pub paused_ms: f64,
    /// Time to arm the protection (inside the pause).
    pub arm_ms: f64,
    /// Total time until the image was committed.
    pub total_ms: f64,
    /// Blocks copied by the walkers.
    pub blocks_by_walkers: u64,
    /// Blocks copied because a vCPU wrote them first.
    pub blocks_by_faults: u64,
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

/// What the pause captured.
type Captured = (
    VmSnapshot,
    Result<Armed, SnapshotError>,
    Result<Vec<DiskCopy>, (usize, DiskCopyError)>,
    Duration,
);

/// Pause, capture the device state (which quiesces the disks), start the
/// disk copies at this instant, arm the protection of RAM, resume: the only
/// time the vCPUs stop. RAM is not armed if a disk copy did not start.
fn pause_and_capture(
    vm: &mut MicroVm,
    prepared: Prepared,
    disks: Starts,
) -> Result<Captured, microvm::Error> {
    let was_running = vm.state() == RunState::Running;
    let pause_start = Instant::now();
    vm.pause()?;
    let result = vm.save_state().map(|snap| {
        let copies = disks.start();
        let armed = match &copies {
            Ok(_) => prepared.arm(),
            Err(_) => Err(SnapshotError::Cancelled),
        };
        (snap, armed, copies)
    });
    if was_running {
        let _ = vm.resume();
    }
    result.map(|(s, a, c)| (s, a, c, pause_start.elapsed()))
}

/// The fixed-ram writer as bg-snapshot's block sink.
struct ImageSink<'a> {
    writer: &'a ImageWriter,
    direct: Option<File>,
    progress: Option<&'a Progress>,
}

impl BlockSink for ImageSink<'_> {
    fn block_size(&self) -> usize {
        BLOCK_SIZE
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

/// Takes a live snapshot of the VM into `path`.
pub fn snapshot_vm(
    controller: &VmController,
    path: &Path,
    channels: &ChannelOptions,
    disk_targets: &[PathBuf],
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
    // Register the userfaultfd while the vCPUs run; only the protection
    // itself needs the pause.
    let memory = controller.call(|vm| vm.memory().clone())?;
    let ranges: Vec<MemRange> = memory
        .iter()
        .map(|r| {
            // SAFETY: guest RAM stays mapped while the VM exists, which
            // outlives the snapshot (`memory` holds it below); vCPUs write
            // it only with ordinary stores.
            unsafe { MemRange::new(r.as_ptr(), r.len() as usize) }
        })
        .collect();
    let prepared = bg_snapshot::prepare(&ranges, BLOCK_SIZE).map_err(&serr)?;
    let (disks, starts) = disks.split();
    let (mut snapshot, armed, copies, paused) =
        controller.call(move |vm| pause_and_capture(vm, prepared, starts))??;
    // Disk copy errors first: RAM was not armed when one failed.
    let disks = disks.started(copies)?;
    let armed = armed.map_err(&serr)?;
    cancel.set(Some((armed.cancel_handle(), disks.cancel_handles())));
    let arm_time = armed.arm_time();

    let result = (|| {
        let specs = region_specs(&memory);
        // The same error kinds as a stopped save (a missing directory is
        // the request's fault either way).
        let ierr = super::fixed::image_err(path);
        let layout = Layout::with_params(
            PAGE_SIZE as u32,
            fixed_ram::DEFAULT_ALIGNMENT,
            BLOCK_SIZE as u64,
            &specs,
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
        if let Some(p) = progress {
            p.set_total(memory.iter().map(|r| r.len()).sum());
            p.phase("copying");
        }
        let sink = ImageSink {
            writer: &writer,
            direct,
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
        disks.record(&mut snapshot);
        if let Some(p) = progress {
            p.phase("committing");
        }
        let device_state =
            snapshot::encode(&snapshot, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let file = writer.commit(&device_state).map_err(&ierr)?;
        let (bytes, allocated) = file_sizes(&file, path)?;
        drop(file);
        let disks = disks.publish()?;
        // A live snapshot is consistent while the VM runs: only a cancel stops it.
        publish(tmp, path, &SaveControl::default())?;
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        Ok(SnapshotStats {
            path: path.to_owned(),
            bytes,
            allocated_bytes: allocated,
            device_state_bytes: device_state.len() as u64,
            paused_ms: paused.as_secs_f64() * 1000.0,
            arm_ms: arm_time.as_secs_f64() * 1000.0,
            total_ms: start.elapsed().as_secs_f64() * 1000.0,
            blocks_by_walkers: report.blocks_by_walkers,
            blocks_by_faults: report.blocks_by_faults,
            faults: report.faults,
            fault_latency_median_us: us(report.fault_latency.median),
            fault_latency_p99_us: us(report.fault_latency.p99),
            fault_latency_max_us: us(report.fault_latency.max),
            wp_unpopulated: report.wp_unpopulated,
            disks,
        })
    })();
    cancel.set(None);
    drop(memory);
    result
}
