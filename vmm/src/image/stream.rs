//! The `stream` format: device-state sections, the RAM layout, then runs of
//! non-zero pages as raw records and runs of zero pages as zero records.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use microvm::persist::VmSnapshot;
use microvm::vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use microvm::{create_guest_memory, GuestMemory, MemoryBacking};
use migration_stream::{PagesKind, RamRegion, Record, StreamReader, StreamWriter};

use crate::progress::Progress;

use super::snapshot::{write_sections, SnapshotBuilder};
use super::{
    create_temp, file_sizes, publish, region_bytes, ImageError, SaveControl, SaveError, Written,
    PAGE_SIZE,
};

/// Stream buffer size.
const IO_BUFFER: usize = 1 << 20;

/// Writes the snapshot and memory as a stream to `path` (atomically: temp
/// file, fsync, rename, directory fsync).
pub fn write_stream_file(
    path: &Path,
    snapshot: &VmSnapshot,
    memory: &GuestMemory,
    progress: Option<&Progress>,
    control: &SaveControl,
) -> Result<Written, SaveError> {
    let werr = |source| SaveError::Write {
        path: path.to_owned(),
        source,
    };
    // The temporary file is removed when `tmp` drops, unless published.
    let (tmp, file) = create_temp(path)?;
    let (file, stats) = write_stream(file, path, snapshot, memory, progress, control)?;
    file.sync_all().map_err(werr)?;
    drop(file);
    publish(tmp, path, control)?;
    Ok(stats)
}

fn write_stream(
    file: File,
    path: &Path,
    snapshot: &VmSnapshot,
    memory: &GuestMemory,
    progress: Option<&Progress>,
    control: &SaveControl,
) -> Result<(File, Written), SaveError> {
    if let Some(p) = progress {
        p.phase("writing");
    }
    let serr = |e: migration_stream::StreamError| SaveError::writing(path, e);
    let mut w = StreamWriter::new(BufWriter::with_capacity(IO_BUFFER, file), PAGE_SIZE as u32)
        .map_err(serr)?;
    let before = w.bytes_written();
    write_sections(&mut w, snapshot).map_err(serr)?;
    let device_bytes = w.bytes_written() - before;

    let layout: Vec<RamRegion> = memory
        .iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
        })
        .collect();
    w.write_ram_layout(&layout).map_err(serr)?;
    let (mut ram_pages, mut zero_pages) = (0u64, 0u64);
    for (index, region) in memory.iter().enumerate() {
        let bytes = region_bytes(region);
        let pages = bytes.len() / PAGE_SIZE;
        let page = |i: usize| &bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        for (run, zero) in page_runs::spans(pages as u64, |p| page_runs::is_zero(page(p as usize)))
        {
            let (p, q) = (run.start as usize, run.end as usize);
            let count = run.len();
            control.check("save")?;
            if let Some(pr) = progress {
                pr.add(count * PAGE_SIZE as u64);
            }
            if zero {
                w.write_zero_pages(index as u32, p as u64, count)
                    .map_err(serr)?;
                zero_pages += count;
            } else {
                w.write_pages(index as u32, p as u64, &bytes[p * PAGE_SIZE..q * PAGE_SIZE])
                    .map_err(serr)?;
                ram_pages += count;
            }
        }
    }
    let buffered = w.finish().map_err(serr)?;
    let file = buffered.into_inner().map_err(|e| SaveError::Write {
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    let (total, allocated) = file_sizes(&file, path)?;
    Ok((
        file,
        Written {
            bytes: total,
            allocated_bytes: allocated,
            device_state_bytes: device_bytes,
            ram_pages,
            zero_pages,
            phases: Default::default(),
        },
    ))
}

/// Reads a stream file back: the snapshot and a guest memory holding its RAM.
pub fn load_stream_file(path: &Path) -> Result<(VmSnapshot, GuestMemory), SaveError> {
    let invalid = |reason: String| SaveError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let bad_image = |e: ImageError| SaveError::BadImage {
        path: path.to_owned(),
        source: e,
    };
    let file = File::open(path).map_err(|source| SaveError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut r = StreamReader::new(BufReader::with_capacity(IO_BUFFER, file))
        .map_err(|e| bad_image(e.into()))?;
    if r.page_size() as usize != PAGE_SIZE {
        return Err(invalid(format!(
            "page size {} is not this host's {PAGE_SIZE}",
            r.page_size()
        )));
    }
    let device_state = |source| SaveError::DeviceState {
        path: path.to_owned(),
        source,
    };
    let mut builder = SnapshotBuilder::default();
    let mut memory: Option<GuestMemory> = None;
    while let Some(record) = r.next_record().map_err(|e| bad_image(e.into()))? {
        match record {
            Record::Section(s) => {
                builder.add(&s).map_err(device_state)?;
                if memory.is_none() {
                    if let Some(m) = builder.machine() {
                        memory = Some(
                            create_guest_memory(m.mem_mib, &MemoryBacking::Anonymous)
                                .map_err(|e| bad_image(e.into()))?,
                        );
                    }
                }
            }
            Record::RamLayout(regions) => {
                let m = builder
                    .machine()
                    .ok_or_else(|| invalid("RAM layout before the machine section".into()))?;
                let got: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
                if got != m.regions {
                    return Err(invalid(format!(
                        "RAM layout {got:x?} differs from the machine section's {:x?}",
                        m.regions
                    )));
                }
            }
            Record::Pages(pages) => {
                let mem = memory
                    .as_ref()
                    .ok_or_else(|| invalid("RAM pages before the machine section".into()))?;
                let region = mem.iter().nth(pages.region as usize).ok_or_else(|| {
                    invalid(format!(
                        "pages for region {} that does not exist",
                        pages.region
                    ))
                })?;
                if let PagesKind::Raw(data) = pages.kind {
                    let offset = pages
                        .first_page
                        .checked_mul(PAGE_SIZE as u64)
                        .filter(|o| o.saturating_add(data.len() as u64) <= region.len())
                        .ok_or_else(|| invalid("pages beyond their region".into()))?;
                    region
                        .write_slice(&data, MemoryRegionAddress(offset))
                        .map_err(|e| invalid(format!("writing pages into guest memory: {e}")))?;
                }
            }
            Record::Sync(_) | Record::End => {}
        }
    }
    let snapshot = builder.finish().map_err(device_state)?;
    let memory = memory.ok_or_else(|| invalid("no guest memory".into()))?;
    Ok((snapshot, memory))
}
