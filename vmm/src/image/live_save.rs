//! `cryo save --live`: the pre-copy of live migration (`precopy.rs`) into a
//! fixed-ram image file instead of a peer. A first pass writes every
//! non-zero page at its fixed offset while the guest runs; each later round
//! writes, in place, the pages the guest dirtied and records their chunks'
//! bitmaps and CRCs again (pages that became zero are punched back to
//! holes); then the VM pauses for the
//! last round and its device state, and the image is committed (header
//! last, fsync, rename, directory fsync). The image is the VM at the end of
//! the save. Until the commit nothing exists under the target name: a
//! failure, `cancel` or the time limit removes the temporary file, leaves a
//! previous image at the name alone, and the VM runs on.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fixed_ram::{ImageWriter, Layout, RegionSpec};
use microvm::VmController;
use multifd::{FilePass, MemRegion, PageSet, RoundStats};
use serde::Serialize;

use super::fixed::{image_err, save_pass, ChannelOptions};
use super::precopy::{CpuPriority, Precopy, PrecopyStats, RoundError, Sink};
use super::{
    create_temp, file_sizes, publish, SaveControl, SaveError, SaveFormat, SaveStats, Written,
};
use crate::files::TempFile;
use crate::progress::Progress;

/// Options of a live save.
#[derive(Clone, Debug, Default)]
pub struct LiveSaveOptions {
    /// File channels and O_DIRECT.
    pub channels: ChannelOptions,
    /// The longest pause the guest may see, in ms.
    pub max_downtime_ms: u64,
    /// Write bandwidth limit of the channels together, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Give up (and keep the VM running) after this long.
    pub timeout: Option<Duration>,
    /// Resume the VM after the save instead of leaving it paused for the
    /// caller to end.
    pub keep_running: bool,
    /// Who goes first for the host's CPUs while the guest runs.
    pub priority: CpuPriority,
}

/// What a live save did: what a stopped save reports (`paused_ms`: the
/// last round and the commit), and the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct LiveSaveStats {
    /// The image written.
    #[serde(flatten)]
    pub save: SaveStats,
    /// The rounds: pages written, throttle, bandwidth.
    #[serde(flatten)]
    pub precopy: PrecopyStats,
}

/// Saves the running VM behind `controller` to the fixed-ram image `path`
/// while it runs. On success the VM is paused, or running again with
/// `keep_running`; the caller ends a paused one, as after a stopped save.
/// On failure it runs on, dirty logging off, and no file is left.
pub fn save_vm_live(
    controller: &VmController,
    path: &Path,
    opts: &LiveSaveOptions,
    control: &SaveControl,
    progress: Option<&Progress>,
) -> Result<LiveSaveStats, SaveError> {
    crate::files::check_save_target(path).map_err(|e| SaveError::BadRequest(e.0))?;
    // The commit checks that the VM is still paused for the last round.
    let control = control.watching(controller);
    let p = Precopy {
        controller,
        max_downtime_ms: opts.max_downtime_ms,
        timeout: opts.timeout,
        control: &control,
        progress,
        what: "save",
    };
    let (precopy, written) = p.run(|regions| FileSink::create(path, regions, opts, &control))?;
    if opts.keep_running {
        controller.resume()?;
    }
    let save = SaveStats {
        path: path.to_owned(),
        format: SaveFormat::FixedRam,
        bytes: written.bytes,
        allocated_bytes: written.allocated_bytes,
        device_state_bytes: written.device_state_bytes,
        ram_pages: written.ram_pages,
        zero_pages: written.zero_pages,
        paused_ms: precopy.downtime_ms,
        total_ms: precopy.total_ms,
        disks: Vec::new(),
    };
    Ok(LiveSaveStats { save, precopy })
}

/// A fixed-ram image being written in place, as a pre-copy sink.
struct FileSink<'a> {
    path: &'a Path,
    tmp: TempFile,
    writer: ImageWriter,
    regions: Vec<MemRegion>,
    opts: &'a LiveSaveOptions,
    control: &'a SaveControl,
    round: u32,
}

impl<'a> FileSink<'a> {
    /// Creates the temporary image (mode 0600, all holes) for `regions`.
    fn create(
        path: &'a Path,
        regions: &[MemRegion],
        opts: &'a LiveSaveOptions,
        control: &'a SaveControl,
    ) -> Result<FileSink<'a>, SaveError> {
        let specs: Vec<RegionSpec> = regions
            .iter()
            .map(|r| RegionSpec {
                guest_addr: r.guest_addr(),
                size: r.len(),
            })
            .collect();
        let layout = Layout::new(super::PAGE_SIZE as u32, &specs).map_err(image_err(path))?;
        let (tmp, file) = create_temp(path)?;
        let writer = ImageWriter::from_file(file, layout).map_err(image_err(path))?;
        Ok(FileSink {
            path,
            tmp,
            writer,
            regions: regions.to_vec(),
            opts,
            control,
            round: 0,
        })
    }

    fn failed(&self, e: multifd::MultifdError) -> SaveError {
        match e {
            multifd::MultifdError::DirectIoUnsupported { .. } => SaveError::BadImage {
                path: self.path.to_owned(),
                source: e.into(),
            },
            other => SaveError::writing(self.path, other),
        }
    }
}

impl Sink for FileSink<'_> {
    type Done = Written;

    fn round(
        &mut self,
        pages: PageSet<'_>,
        last: bool,
        stop: &AtomicBool,
    ) -> Result<RoundStats, RoundError> {
        let start = Instant::now();
        let pass = FilePass {
            pages,
            // The last round runs with the VM paused: as fast as it can.
            max_bytes_per_s: self.opts.max_bandwidth.filter(|_| !last),
            stop,
            // While the guest runs, its vCPUs go first (unless the user
            // chose the save).
            background: !last && self.opts.priority.yields_to_guest(),
        };
        let r = save_pass(
            self.tmp.path(),
            &self.writer,
            &self.regions,
            &self.opts.channels,
            &pass,
        );
        let stats = match r {
            Ok(s) => s,
            Err(_) if stop.load(std::sync::atomic::Ordering::Acquire) => {
                return Err(RoundError::Stopped)
            }
            Err(e) => return Err(RoundError::Failed(self.failed(e))),
        };
        let round = self.round;
        self.round += 1;
        Ok(RoundStats {
            round,
            pages: stats.present_pages,
            // The pages' bytes, not the file bytes written (a dirty round
            // also writes clean pages between close dirty ones): the
            // downtime estimate divides dirty bytes by this rate.
            bytes: stats.present_pages * super::PAGE_SIZE as u64,
            elapsed: start.elapsed(),
        })
    }

    fn next_round(&self) -> u32 {
        self.round
    }

    /// Nothing to tell: dropping the sink removes the temporary file.
    fn abort(&mut self, why: &str) {
        log::info!("live save to {}: {why}", self.path.display());
    }

    fn finish(self, device_state: &[u8]) -> Result<Written, SaveError> {
        let total: u64 =
            self.regions.iter().map(|r| r.len()).sum::<u64>() / super::PAGE_SIZE as u64;
        let ram_pages = self.writer.present_pages();
        let (file, times) = self
            .writer
            .commit_timed(device_state)
            .map_err(image_err(self.path))?;
        let (bytes, allocated_bytes) = file_sizes(&file, self.path)?;
        drop(file);
        let publish_start = std::time::Instant::now();
        publish(self.tmp, self.path, self.control)?;
        Ok(Written {
            bytes,
            allocated_bytes,
            device_state_bytes: device_state.len() as u64,
            ram_pages,
            zero_pages: total - ram_pages,
            // The data went out in the pre-copy rounds, timed by them.
            phases: super::SavePhases {
                data: std::time::Duration::ZERO,
                metadata: times.metadata,
                sync: times.data_sync + times.header_sync,
                publish: publish_start.elapsed(),
            },
        })
    }

    fn target(&self) -> PathBuf {
        self.path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixed::mem_regions;
    use microvm::vm_memory::{Bytes, GuestAddress};
    use microvm::{create_guest_memory, MemoryBacking};
    use std::sync::atomic::Ordering;

    /// A fresh scratch directory and the image path in it.
    fn scratch(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("cryo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("img");
        (dir, path)
    }

    fn page(memory: &microvm::GuestMemory, addr: u64, byte: u8) {
        memory
            .write_slice(&[byte; 4096], GuestAddress(addr))
            .expect("inside guest RAM");
    }

    /// Rounds rewrite chunks in place: a page written in the first pass and
    /// zeroed before a later round is a hole (absent) in the committed
    /// image, a changed page holds its new bytes, and the image verifies.
    #[test]
    fn later_rounds_rewrite_pages_in_place_and_zeroed_pages_become_holes() {
        let (dir, path) = scratch("live-save-unit");
        let memory = create_guest_memory(4, &MemoryBacking::Anonymous).expect("guest memory");
        page(&memory, 0x1000, 0x11);
        page(&memory, 0x20_0000, 0x22);
        let regions = mem_regions(&memory);
        let opts = LiveSaveOptions {
            channels: ChannelOptions {
                channels: 2,
                direct_io: multifd::DirectIo::Off,
            },
            ..LiveSaveOptions::default()
        };
        let control = SaveControl::default();
        let mut sink = FileSink::create(&path, &regions, &opts, &control).expect("sink");
        let never = AtomicBool::new(false);
        let first = sink
            .round(PageSet::AllNonZero, false, &never)
            .expect("pass");
        assert_eq!(first.pages, 2);
        // The guest zeroes one page and rewrites the other.
        page(&memory, 0x1000, 0);
        page(&memory, 0x20_0000, 0x33);
        let pages = (4u64 << 20) / 4096;
        let mut map = vec![0u64; pages.div_ceil(64) as usize];
        map[0] |= 1 << 1;
        map[0x200 / 64] |= 1 << (0x200 % 64);
        let maps: Vec<&[u64]> = vec![&map];
        let last = sink
            .round(PageSet::Dirty(&maps), true, &never)
            .expect("last");
        assert_eq!((last.round, last.pages), (1, 1));
        let written = sink.finish(b"device state").expect("commit");
        assert_eq!(written.ram_pages, 1);
        let image = fixed_ram::Image::open(&path).expect("committed image");
        image.verify().expect("verifies");
        assert!(!image.is_present(0, 1), "the zeroed page is a hole");
        assert!(image.is_present(0, 0x200));
        let bytes = std::fs::read(&path).expect("read image");
        let at = (image.layout().regions()[0].pages_offset + 0x20_0000) as usize;
        assert!(bytes[at..at + 4096].iter().all(|b| *b == 0x33));
        let at = (image.layout().regions()[0].pages_offset + 0x1000) as usize;
        assert!(bytes[at..at + 4096].iter().all(|b| *b == 0));
        assert_eq!(image.device_state().expect("state"), b"device state");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!never.load(Ordering::Relaxed));
    }

    /// A sink dropped before its commit (failure, cancel, time limit)
    /// leaves no file: neither the target nor its temporary file.
    #[test]
    fn a_sink_dropped_before_the_commit_leaves_no_file() {
        let (dir, path) = scratch("live-save-drop");
        std::fs::write(&path, b"a previous image").expect("previous");
        let memory = create_guest_memory(4, &MemoryBacking::Anonymous).expect("guest memory");
        page(&memory, 0, 0x44);
        let opts = LiveSaveOptions::default();
        let control = SaveControl::default();
        let mut sink =
            FileSink::create(&path, &mem_regions(&memory), &opts, &control).expect("sink");
        let stop = AtomicBool::new(true);
        assert!(matches!(
            sink.round(PageSet::AllNonZero, false, &stop),
            Err(RoundError::Stopped)
        ));
        drop(sink);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("img")]);
        assert_eq!(std::fs::read(&path).expect("read"), b"a previous image");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
