//! The `fixed-ram` format: every guest page at a fixed offset
//! (docs/fixed-ram-format.md). Saving writes chunks from several threads at
//! once with positioned I/O; restoring reads them back the same way (eager),
//! or maps each region's page area copy-on-write as guest memory (lazy).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use fixed_ram::{Image, ImageWriter, Layout};
use microvm::persist::VmSnapshot;
use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{create_guest_memory, GuestMemory, MemoryBacking, VmShell};

use crate::progress::Progress;

use super::{
    create_temp, file_sizes, publish, region_specs, snapshot, ImageError, Loaded, RestoreMode,
    SaveControl, SaveError, SavePhases, Written, PAGE_SIZE,
};

/// How page data moves between guest memory and the image.
#[derive(Clone, Copy, Debug)]
pub struct ChannelOptions {
    /// Channel threads, each with its own file descriptor.
    pub channels: usize,
    /// O_DIRECT use.
    pub direct_io: multifd::DirectIo,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            channels: io_threads(),
            direct_io: multifd::DirectIo::Auto,
        }
    }
}

impl ChannelOptions {
    fn multifd(&self) -> multifd::FileChannelOptions {
        multifd::FileChannelOptions {
            channels: self.channels.clamp(1, multifd::MAX_FILE_CHANNELS),
            direct_io: self.direct_io,
            prefault: true,
        }
    }
}

/// The fixed-ram image as multifd's file layout: pages at their fixed
/// offsets; saving records each chunk's bitmap and CRC in the writer,
/// loading reads present pages by the bitmap and checks each chunk's CRC.
struct ImageLayout<'a> {
    layout: &'a Layout,
    side: Side<'a>,
    progress: Option<&'a Progress>,
    control: Option<&'a SaveControl>,
}

enum Side<'a> {
    Save(&'a ImageWriter),
    Load(&'a Image),
}

impl<'a> ImageLayout<'a> {
    fn save(
        writer: &'a ImageWriter,
        progress: Option<&'a Progress>,
        control: &'a SaveControl,
    ) -> Self {
        ImageLayout {
            layout: writer.layout(),
            side: Side::Save(writer),
            progress,
            control: Some(control),
        }
    }

    fn load(image: &'a Image, progress: Option<&'a Progress>) -> Self {
        ImageLayout {
            layout: image.layout(),
            side: Side::Load(image),
            progress,
            control: None,
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(p) = self.progress {
            p.add(bytes);
        }
    }
}

impl multifd::FileLayout for ImageLayout<'_> {
    fn page_size(&self) -> u64 {
        u64::from(self.layout.page_size())
    }
    fn chunk_size(&self) -> u64 {
        self.layout.chunk_size()
    }
    fn chunks(&self, region: usize) -> u64 {
        self.layout.chunks(region)
    }
    fn chunk_range(&self, region: usize, chunk: u64) -> (u64, u64) {
        self.layout.chunk_range(region, chunk)
    }
    fn page_file_offset(&self, region: usize, page: u64) -> u64 {
        self.layout.regions()[region].pages_offset + page * self.page_size()
    }
    fn chunk_saved(
        &self,
        region: usize,
        chunk: u64,
        present: &[u64],
        crc: u32,
    ) -> Result<(), multifd::CallerError> {
        let Side::Save(writer) = self.side else {
            return Err("the image is open for reading".into());
        };
        // A cancelled save stops at its next chunk.
        if let Some(c) = self.control {
            c.check("save").map_err(|e| e.to_string())?;
        }
        self.advance(self.layout.chunk_range(region, chunk).1);
        let bit = |p: u64| {
            present
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        };
        writer
            .record_chunk(region, chunk, &bit, crc)
            .map_err(Into::into)
    }
    fn page_present(&self, region: usize, page: u64) -> bool {
        match self.side {
            Side::Load(image) => image.is_present(region, page),
            Side::Save(_) => false,
        }
    }
    fn chunk_loaded(
        &self,
        region: usize,
        chunk: u64,
        data: &[u8],
    ) -> Result<(), multifd::CallerError> {
        let Side::Load(image) = self.side else {
            return Ok(());
        };
        self.advance(data.len() as u64);
        let expected = image.chunk_checksum(region, chunk);
        let found = crc32c::crc32c(data);
        if found == expected {
            return Ok(());
        }
        let (offset, len) = self.chunk_range(region, chunk);
        let base = self.layout.regions()[region].guest_addr + offset;
        Err(Box::new(fixed_ram::FixedRamError::ChunkChecksum {
            region,
            chunk,
            expected,
            found,
            guest_start: base,
            guest_end: base + len,
        }))
    }
}

/// One pass of a live save (`live_save.rs`) into the temporary image at
/// `tmp` that `writer` writes: the chunks `pass` selects, their bitmaps and
/// CRCs recorded again (pages now zero are punched back to holes). No
/// progress or cancel check per chunk: the pre-copy does both.
pub(super) fn save_pass(
    tmp: &Path,
    writer: &ImageWriter,
    regions: &[multifd::MemRegion],
    channels: &ChannelOptions,
    pass: &multifd::FilePass<'_>,
) -> Result<multifd::TransferStats, multifd::MultifdError> {
    let layout = ImageLayout {
        layout: writer.layout(),
        side: Side::Save(writer),
        progress: None,
        control: None,
    };
    multifd::save_pass_to_file(tmp, regions, &layout, &channels.multifd(), pass)
}

/// Asks for transparent huge pages on fresh guest memory about to be filled:
/// faulting it in (MADV_POPULATE_WRITE, one 2 MiB page at a time) is then
/// several times cheaper than 4 KiB page by page, which is most of the cost
/// of an eager restore's reads into new memory. Best effort.
fn advise_huge_pages(memory: &GuestMemory) {
    for r in memory.iter() {
        // SAFETY: advice on a live mapping owned by `memory`; MADV_HUGEPAGE
        // changes no contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!("MADV_HUGEPAGE refused: {}", std::io::Error::last_os_error());
        }
    }
}

/// multifd's view of guest memory.
pub fn mem_regions(memory: &GuestMemory) -> Vec<multifd::MemRegion> {
    memory
        .iter()
        .map(|r| {
            // SAFETY: the region is a live, page-aligned mapping owned by
            // `memory`, which the caller keeps alive (and paused, or not yet
            // running) for as long as the channels use it.
            unsafe { multifd::MemRegion::new(r.start_addr().0, r.as_ptr(), r.len()) }
        })
        .collect()
}

/// Threads that move pages: one per host CPU.
pub fn io_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 64)
}

/// Every (region, chunk) of a layout, in file order.
fn all_chunks(layout: &Layout) -> Vec<(usize, u64)> {
    (0..layout.regions().len())
        .flat_map(|r| (0..layout.chunks(r)).map(move |c| (r, c)))
        .collect()
}

/// Runs `work(state, i)` for every `i` below `count` on `threads` threads
/// (at most one per `i`), each taking the next `i` from a shared cursor with
/// its own `state` from `init`; the first error stops them all and is
/// returned.
pub fn for_each_index<S, E: Send>(
    threads: usize,
    count: usize,
    init: impl Fn() -> Result<S, E> + Sync,
    work: impl Fn(&mut S, usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let first_error = page_runs::FirstError::new();
    std::thread::scope(|s| {
        for _ in 0..threads.min(count).max(1) {
            s.spawn(|| {
                let mut state = match init() {
                    Ok(st) => st,
                    Err(e) => return first_error.fail(e),
                };
                while !first_error.stopped() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    if let Err(e) = work(&mut state, i) {
                        first_error.fail(e);
                    }
                }
            });
        }
    });
    first_error.into_result()
}

pub(super) fn image_err(path: &Path) -> impl Fn(fixed_ram::FixedRamError) -> SaveError + '_ {
    move |e| SaveError::writing(path, e)
}

/// Writes a fixed-ram image of the paused VM to `path` (temp file, data,
/// fsync, header, fsync, rename, directory fsync). On failure or cancel the
/// temporary file is removed. The result carries the time of each phase.
pub fn write_fixed_file(
    path: &Path,
    snapshot: &VmSnapshot,
    memory: &GuestMemory,
    channels: &ChannelOptions,
    progress: Option<&Progress>,
    control: &SaveControl,
) -> Result<Written, SaveError> {
    let ierr = image_err(path);
    if let Some(p) = progress {
        p.phase("writing");
    }
    let layout = Layout::new(PAGE_SIZE as u32, &region_specs(memory)).map_err(&ierr)?;
    let device_state =
        snapshot::encode(snapshot, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
            path: path.to_owned(),
            source: e.into(),
        })?;
    let data_start = Instant::now();
    let (tmp, file) = create_temp(path)?;
    let writer = ImageWriter::from_file(file, layout).map_err(&ierr)?;
    let stats = write_pages(
        path,
        tmp.path(),
        &writer,
        memory,
        channels,
        progress,
        control,
    )?;
    let data = data_start.elapsed();
    if let Some(p) = progress {
        p.phase("committing");
    }
    let (file, times) = writer.commit_timed(&device_state).map_err(&ierr)?;
    let (bytes, allocated) = file_sizes(&file, path)?;
    drop(file);
    let publish_start = Instant::now();
    publish(tmp, path, control)?;
    let phases = SavePhases {
        data,
        metadata: times.metadata,
        sync: times.data_sync + times.header_sync,
        publish: publish_start.elapsed(),
    };
    log::info!("{}: save phases {phases:?}", path.display());
    Ok(Written {
        bytes,
        allocated_bytes: allocated,
        device_state_bytes: device_state.len() as u64,
        ram_pages: stats.present_pages,
        zero_pages: stats.zero_pages,
        phases,
    })
}

/// The data phase of a save: the channels write every present page of
/// `memory` into the temporary file `tmp` of the image at `path`.
fn write_pages(
    path: &Path,
    tmp: &Path,
    writer: &ImageWriter,
    memory: &GuestMemory,
    channels: &ChannelOptions,
    progress: Option<&Progress>,
    control: &SaveControl,
) -> Result<multifd::TransferStats, SaveError> {
    let stats = multifd::save_to_file(
        tmp,
        &mem_regions(memory),
        &ImageLayout::save(writer, progress, control),
        &channels.multifd(),
    )
    .map_err(|e| match e {
        _ if control.is_cancelled() => SaveError::Cancelled("save"),
        multifd::MultifdError::DirectIoUnsupported { .. } => SaveError::BadImage {
            path: path.to_owned(),
            source: e.into(),
        },
        other => SaveError::Image {
            path: path.to_owned(),
            source: other.into(),
        },
    })?;
    log::info!(
        "saved {} pages ({} zero) through {} channels{} in {:?}: {:.0} MB/s",
        stats.present_pages,
        stats.zero_pages,
        stats.channels,
        if stats.direct_io {
            " with O_DIRECT"
        } else {
            ""
        },
        stats.elapsed,
        stats.mb_per_s()
    );
    Ok(stats)
}

fn open_image(path: &Path) -> Result<Image, SaveError> {
    Image::open(path).map_err(|e| image_error(path, e))
}

/// A fixed-ram reader's error as a save error: I/O failures apart from a
/// bad image.
fn image_error(path: &Path, e: fixed_ram::FixedRamError) -> SaveError {
    match e {
        fixed_ram::FixedRamError::Io { source, .. } => SaveError::Read {
            path: path.to_owned(),
            source,
        },
        other => SaveError::BadImage {
            path: path.to_owned(),
            source: other.into(),
        },
    }
}

/// The KVM VM over `memory`, made on its own thread while the caller goes on
/// reading: milliseconds, most of them registering the memory slots, that
/// would otherwise come between having the memory and resuming the guest.
fn make_shell_meanwhile(
    memory: &GuestMemory,
) -> Option<JoinHandle<Result<VmShell, microvm::Error>>> {
    let memory = memory.clone();
    std::thread::Builder::new()
        .name("vm-shell".into())
        .spawn(move || VmShell::new(memory))
        .ok()
}

/// The VM [`make_shell_meanwhile`] made; None when it could not be made,
/// and the restore makes it again and reports why.
fn join_shell(shell: Option<JoinHandle<Result<VmShell, microvm::Error>>>) -> Option<VmShell> {
    shell
        .and_then(|t| t.join().ok())
        .and_then(|made| made.map_err(|e| log::debug!("VM shell: {e}")).ok())
}

/// A lazy restore's guest memory, mapped from the image's page areas as soon
/// as the header is read, and the KVM VM being made over it while the rest
/// of the image is read and checked.
struct LazyStart {
    file: Arc<File>,
    /// The regions mapped, as the header read first placed them.
    mapped: Vec<fixed_ram::RegionLayout>,
    memory: GuestMemory,
    shell: Option<JoinHandle<Result<VmShell, microvm::Error>>>,
    /// Warm the rest in the background after resuming.
    prefetch: bool,
}

impl LazyStart {
    /// Reads the header of the image at `path`, maps its page areas
    /// copy-on-write and starts making the VM. Nothing reads the mapping
    /// before the whole image has been accepted.
    fn begin(path: &Path, prefetch: bool) -> Result<LazyStart, SaveError> {
        let file = File::open(path).map_err(|source| SaveError::Read {
            path: path.to_owned(),
            source,
        })?;
        let header = Image::read_header(&file).map_err(|e| image_error(path, e))?;
        let file = Arc::new(file);
        let mapped = header.regions;
        // Only RAM laid out as cryo lays it out can restore (the machine
        // section must match it too): nothing is mapped or registered with
        // KVM for any other shape before the full checks.
        let regions: Vec<(u64, u64)> = mapped.iter().map(|r| (r.guest_addr, r.size)).collect();
        let total = regions.iter().fold(0u64, |t, &(_, s)| t.saturating_add(s));
        let layout: Vec<(u64, u64)> = microvm::memory::ram_ranges(total)
            .iter()
            .map(|r| (r.start, r.len))
            .collect();
        if regions != layout {
            return Err(SaveError::Invalid {
                path: path.to_owned(),
                reason: format!(
                    "RAM regions {regions:x?} are not laid out as guest RAM of that size is ({layout:x?})"
                ),
            });
        }
        let ranges: Vec<microvm::memory::FileRange> = mapped
            .iter()
            .map(|r| microvm::memory::FileRange {
                guest_addr: r.guest_addr,
                size: r.size,
                file: Arc::clone(&file),
                offset: r.pages_offset,
            })
            .collect();
        let memory =
            microvm::memory::map_file_private(&ranges).map_err(|e| SaveError::BadImage {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let shell = make_shell_meanwhile(&memory);
        Ok(LazyStart {
            file,
            mapped,
            memory,
            shell,
            prefetch,
        })
    }
}

/// Loads a fixed-ram image: device state, then guest memory by `mode`,
/// calling `on_memory` with the guest memory as soon as it
/// exists (before any page is read; for measurements).
pub fn load_fixed_with(
    path: &Path,
    mode: RestoreMode,
    verify: bool,
    channels: &ChannelOptions,
    on_memory: &dyn Fn(&GuestMemory),
    progress: Option<&Progress>,
) -> Result<Loaded, SaveError> {
    let invalid = |reason: String| SaveError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let bad_image = |e: ImageError| SaveError::BadImage {
        path: path.to_owned(),
        source: e,
    };
    // None: an eager restore.
    let lazy_start = match mode {
        RestoreMode::Lazy { prefetch } => Some(LazyStart::begin(path, prefetch)?),
        RestoreMode::Eager => None,
    };
    let image = match &lazy_start {
        Some(start) => start
            .file
            .try_clone()
            .map_err(|source| SaveError::Read {
                path: path.to_owned(),
                source,
            })
            .and_then(|file| Image::from_file(file).map_err(|e| image_error(path, e)))?,
        None => open_image(path)?,
    };
    if image.header().page_size as usize != PAGE_SIZE {
        return Err(invalid(format!(
            "page size {} is not this host's {PAGE_SIZE}",
            image.header().page_size
        )));
    }
    if verify {
        image.verify().map_err(|e| bad_image(e.into()))?;
    }
    let device_state = image.device_state().map_err(|e| bad_image(e.into()))?;
    let snapshot = snapshot::decode(&device_state).map_err(|source| SaveError::DeviceState {
        path: path.to_owned(),
        source,
    })?;
    let image_regions: Vec<(u64, u64)> = image
        .layout()
        .regions()
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if image_regions != snapshot.machine.regions {
        return Err(invalid(format!(
            "RAM regions {image_regions:x?} differ from the machine section's {:x?}",
            snapshot.machine.regions
        )));
    }
    match lazy_start {
        None => {
            let memory = create_guest_memory(snapshot.machine.mem_mib, &MemoryBacking::Anonymous)
                .map_err(|e| bad_image(e.into()))?;
            advise_huge_pages(&memory);
            on_memory(&memory);
            let shell = make_shell_meanwhile(&memory);
            if let Some(p) = progress {
                p.set_total(snapshot.machine.mem_mib << 20);
                p.phase("reading");
            }
            let stats = multifd::load_from_file(
                path,
                &mem_regions(&memory),
                &ImageLayout::load(&image, progress),
                &channels.multifd(),
            )
            .map_err(|e| match e {
                multifd::MultifdError::DirectIoUnsupported { .. } => bad_image(e.into()),
                multifd::MultifdError::Io { .. } => SaveError::Image {
                    path: path.to_owned(),
                    source: e.into(),
                },
                other => bad_image(other.into()),
            })?;
            log::info!(
                "loaded {} pages through {} channels{} in {:?}: {:.0} MB/s",
                stats.present_pages,
                stats.channels,
                if stats.direct_io {
                    " with O_DIRECT"
                } else {
                    ""
                },
                stats.elapsed,
                stats.mb_per_s()
            );
            Ok(Loaded {
                snapshot,
                memory,
                prefetch: None,
                shell: join_shell(shell),
            })
        }
        Some(start) => {
            // The header was read twice from the same open file; a writer
            // between the reads would leave the mapping describing another
            // image.
            if image.layout().regions() != start.mapped.as_slice() {
                return Err(invalid(
                    "the image changed while it was being opened".into(),
                ));
            }
            let prefetch = start.prefetch.then(|| Prefetch {
                memory: start.memory.clone(),
                image: Arc::new(image),
            });
            Ok(Loaded {
                snapshot,
                memory: start.memory,
                prefetch,
                shell: join_shell(start.shell),
            })
        }
    }
}

/// Background warming of a lazily restored VM's memory: faults every present
/// page in from the image, so the guest stops paying for first touches.
pub struct Prefetch {
    memory: GuestMemory,
    image: Arc<Image>,
}

impl Prefetch {
    /// Starts the prefetch threads; `done` is called with the elapsed time when finished.
    pub fn start(self, done: impl FnOnce(std::time::Duration, u64) + Send + 'static) {
        let _ = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                let start = Instant::now();
                let layout = self.image.layout().clone();
                let regions: Vec<&microvm::GuestRegion> = self.memory.iter().collect();
                let chunks = all_chunks(&layout);
                let pages = AtomicU64::new(0);
                let init = || Ok::<(), ()>(());
                let _ = for_each_index(io_threads(), chunks.len(), init, |_, i| {
                    let (region, chunk) = chunks[i];
                    let (offset, len) = layout.chunk_range(region, chunk);
                    let base = regions[region].as_ptr();
                    let first = offset / PAGE_SIZE as u64;
                    let count = len / PAGE_SIZE as u64;
                    let mut p = 0;
                    while p < count {
                        if !self.image.is_present(region, first + p) {
                            p += 1;
                            continue;
                        }
                        let mut q = p + 1;
                        while q < count && self.image.is_present(region, first + q) {
                            q += 1;
                        }
                        let start_off = (first + p) as usize * PAGE_SIZE;
                        let run = (q - p) as usize * PAGE_SIZE;
                        // SAFETY: the range lies inside the region's live
                        // mapping. MADV_POPULATE_WRITE faults each page in
                        // and breaks copy-on-write (the kernel copies the
                        // page's current contents), so the guest's later
                        // accesses neither read the file nor copy; it never
                        // changes what the guest sees, even while vCPUs run.
                        let rc = unsafe {
                            libc::madvise(
                                base.add(start_off).cast(),
                                run,
                                libc::MADV_POPULATE_WRITE,
                            )
                        };
                        if rc != 0 {
                            // Kernels before 5.14: read one byte per page, which
                            // at least brings the data in from the file.
                            for page in 0..(q - p) as usize {
                                // SAFETY: inside the live mapping; a volatile
                                // read has no effect on the contents.
                                unsafe {
                                    std::ptr::read_volatile(base.add(start_off + page * PAGE_SIZE))
                                };
                            }
                        }
                        pages.fetch_add(q - p, Ordering::Relaxed);
                        p = q;
                    }
                    Ok::<(), ()>(())
                });
                done(start.elapsed(), pages.into_inner());
            });
    }
}

/// `cryo verify` for a fixed-ram image: header and every checksum.
pub fn verify(path: &Path) -> Result<fixed_ram::VerifyReport, SaveError> {
    let image = open_image(path)?;
    image.verify().map_err(|e| SaveError::BadImage {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// What `cryo inspect` shows of a fixed-ram image.
pub fn open_for_inspect(path: &Path) -> Result<Image, SaveError> {
    open_image(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lazy restore maps nothing and makes no VM for RAM that is not laid
    /// out as guest RAM of its size is: the header alone refuses it.
    #[test]
    fn a_lazy_restore_refuses_ram_laid_out_otherwise_before_mapping_it() {
        let dir = std::env::temp_dir().join(format!("cryo-{}-lazy-shape", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("img");
        let region = fixed_ram::RegionSpec {
            guest_addr: 1 << 20,
            size: 4 << 20,
        };
        let layout = Layout::new(PAGE_SIZE as u32, &[region]).expect("layout");
        let writer = ImageWriter::create(&path, layout).expect("writer");
        let zeros = vec![0u8; 1 << 20];
        for chunk in 0..writer.layout().chunks(0) {
            let (_, len) = writer.layout().chunk_range(0, chunk);
            writer
                .write_chunk(0, chunk, &zeros[..len as usize])
                .expect("chunk");
        }
        writer.commit(b"never decoded").expect("commit");
        let lazy = RestoreMode::Lazy { prefetch: false };
        let refused = load_fixed_with(
            &path,
            lazy,
            false,
            &ChannelOptions::default(),
            &|_| {},
            None,
        );
        let Err(err) = refused else {
            panic!("an image with RAM at 1 MiB was restored");
        };
        assert!(matches!(err, SaveError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("not laid out"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
