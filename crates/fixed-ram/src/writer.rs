//! [`ImageWriter`]: creates an image, writes chunks from many threads,
//! commits.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use page_runs::{is_zero, spans};

use crate::io::{punch_hole, write_all_at, write_padded};
use crate::{FixedRamError, Header, Layout};

/// What [`ImageWriter::write_chunk`] did with one chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Pages with data, written at their fixed offsets.
    pub present_pages: u64,
    /// Zero pages, left as (or punched back to) holes.
    pub zero_pages: u64,
    /// Bytes of page data written.
    pub bytes_written: u64,
}

/// How long the steps of [`ImageWriter::commit_timed`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitTimes {
    /// Writing the bitmaps, the checksum table and the device state.
    pub metadata: Duration,
    /// Making the page data and that metadata durable (the first sync).
    pub data_sync: Duration,
    /// Writing the header and making it durable (the second sync).
    pub header_sync: Duration,
}

/// Writes a fixed-ram image: chunks in any order from any number of threads
/// (it is `Send + Sync`; every method but [`commit`](Self::commit) takes
/// `&self`), then [`commit`](Self::commit) writes the metadata and, last,
/// the header.
///
/// The same chunk must not be written by two threads at the same time
/// (different chunks may, even when they share a bitmap word).
#[derive(Debug)]
pub struct ImageWriter {
    file: File,
    layout: Layout,
    /// One bitmap per region, 64 pages per word.
    bitmaps: Vec<Vec<AtomicU64>>,
    /// CRC32C per chunk, in checksum-table order.
    crcs: Vec<AtomicU32>,
    /// Whether each chunk has been written or recorded.
    written: Vec<AtomicBool>,
    /// CRC32C of a whole chunk of zeros, computed on first use.
    zero_crc: OnceLock<u32>,
}

impl ImageWriter {
    /// Creates `path` (which must not exist: `O_CREAT|O_EXCL`, otherwise
    /// [`FixedRamError::Exists`]), sizes it to the device-state offset (all
    /// holes) and leaves the header zero until [`commit`](Self::commit).
    pub fn create(path: &Path, layout: Layout) -> Result<ImageWriter, FixedRamError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => FixedRamError::Exists(path.to_path_buf()),
                _ => FixedRamError::io(format!("creating {}", path.display()), e),
            })?;
        ImageWriter::from_file(file, layout).inspect_err(|_| {
            // Best effort: do not leave an empty file behind.
            let _ = std::fs::remove_file(path);
        })
    }

    /// The same as [`create`](Self::create) over a file the caller opened
    /// (with write access, perhaps other flags); it must be empty.
    pub fn from_file(file: File, layout: Layout) -> Result<ImageWriter, FixedRamError> {
        let len = file
            .metadata()
            .map_err(|e| FixedRamError::io("reading the metadata of the new image", e))?
            .len();
        if len != 0 {
            return Err(FixedRamError::BadArgument(format!(
                "the file for a new image must be empty, it has {len} bytes"
            )));
        }
        file.set_len(layout.device_state_offset()).map_err(|e| {
            FixedRamError::io(
                format!(
                    "sizing the new image to {:#x} bytes",
                    layout.device_state_offset()
                ),
                e,
            )
        })?;
        let bitmaps = layout
            .regions()
            .iter()
            .map(|r| (0..r.bitmap_len / 8).map(|_| AtomicU64::new(0)).collect())
            .collect();
        let total = layout.total_chunks();
        let crcs = (0..total).map(|_| AtomicU32::new(0)).collect();
        let written = (0..total).map(|_| AtomicBool::new(false)).collect();
        Ok(ImageWriter {
            file,
            layout,
            bitmaps,
            crcs,
            written,
            zero_crc: OnceLock::new(),
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes chunk `chunk` of region `region` from `data` (exactly the
    /// chunk's bytes, see [`Layout::chunk_range`], e.g. straight from guest
    /// memory). Zero pages are found with a word-wise scan and left as holes;
    /// each run of non-zero pages is written with one `pwrite` straight from
    /// `data` at its fixed offset. The pages' bitmap bits and the chunk's
    /// CRC32C are recorded.
    ///
    /// Writing a chunk again replaces it: pages that are now zero have their
    /// bits cleared and are punched back to holes (or overwritten with zeros
    /// where the file system cannot punch).
    pub fn write_chunk(
        &self,
        region: usize,
        chunk: u64,
        data: &[u8],
    ) -> Result<ChunkStats, FixedRamError> {
        self.write_chunk_impl(&self.file, region, chunk, data)
    }

    /// The same as [`write_chunk`](Self::write_chunk), but the page data
    /// goes through `fd`: the caller's own descriptor for the same file,
    /// e.g. opened with `O_DIRECT` (then `data` must be suitably aligned,
    /// which page-aligned guest memory is). The bookkeeping is shared.
    pub fn write_chunk_via(
        &self,
        fd: &File,
        region: usize,
        chunk: u64,
        data: &[u8],
    ) -> Result<ChunkStats, FixedRamError> {
        self.write_chunk_impl(fd, region, chunk, data)
    }

    fn write_chunk_impl(
        &self,
        fd: &File,
        region: usize,
        chunk: u64,
        data: &[u8],
    ) -> Result<ChunkStats, FixedRamError> {
        let g = self.layout.global_chunk(region, chunk)?;
        let (start, len) = self.layout.chunk_range(region, chunk);
        if data.len() as u64 != len {
            return Err(FixedRamError::BadArgument(format!(
                "chunk {chunk} of region {region} is {len} bytes, got {} bytes of data",
                data.len()
            )));
        }
        let ps = self.layout.page_size() as usize;
        let pages = data.len() / ps;
        let first_page = start / ps as u64;
        let mut stats = ChunkStats::default();
        let mut flush = |from: usize, to: usize, nonzero: bool| -> Result<(), FixedRamError> {
            let count = (to - from) as u64;
            let page = first_page + from as u64;
            if nonzero {
                let buf = &data[from * ps..to * ps];
                let offset = self.page_offset(region, page);
                write_all_at(fd, buf, offset, &|| {
                    format!("pages {page}.. of region {region}")
                })?;
                self.set_bits(region, page, count, true);
                stats.present_pages += count;
                stats.bytes_written += buf.len() as u64;
            } else {
                self.clear_and_punch(region, page, count)?;
                stats.zero_pages += count;
            }
            Ok(())
        };
        let page = |p: u64| &data[p as usize * ps..][..ps];
        for (run, nonzero) in spans(pages as u64, |p| !is_zero(page(p))) {
            flush(run.start as usize, run.end as usize, nonzero)?;
        }
        self.crcs[g].store(crc32c::crc32c(data), Ordering::Relaxed);
        self.written[g].store(true, Ordering::Release);
        Ok(stats)
    }

    /// Records a chunk whose pages the caller wrote itself (at
    /// [`RegionLayout::pages_offset`](crate::RegionLayout) `+ page * page_size`).
    /// `present(p)` says whether page `p` *of the chunk* (0 = its first page)
    /// holds data; `crc` is the CRC32C of the chunk's bytes with absent pages
    /// as zeros. Pages that were present before and are absent now are
    /// punched back to holes.
    pub fn record_chunk(
        &self,
        region: usize,
        chunk: u64,
        present: &dyn Fn(u64) -> bool,
        crc: u32,
    ) -> Result<(), FixedRamError> {
        let g = self.layout.global_chunk(region, chunk)?;
        let (start, len) = self.layout.chunk_range(region, chunk);
        let ps = u64::from(self.layout.page_size());
        let pages = len / ps;
        let first_page = start / ps;
        let flush = |from: u64, to: u64, is_present: bool| -> Result<(), FixedRamError> {
            if is_present {
                self.set_bits(region, first_page + from, to - from, true);
                Ok(())
            } else {
                self.clear_and_punch(region, first_page + from, to - from)
            }
        };
        for (run, is_present) in spans(pages, present) {
            flush(run.start, run.end, is_present)?;
        }
        self.crcs[g].store(crc, Ordering::Relaxed);
        self.written[g].store(true, Ordering::Release);
        Ok(())
    }

    /// Records a chunk that is all zeros without any data: every page
    /// absent (punched back to a hole if it was present), the CRC32C of
    /// zeros. The same as writing a chunk of zeros, without scanning them.
    pub fn record_zero_chunk(&self, region: usize, chunk: u64) -> Result<(), FixedRamError> {
        let (_, len) = self.layout.chunk_range(region, chunk);
        let crc = match len == self.layout.chunk_size() {
            true => *self.zero_crc.get_or_init(|| zeros_crc32c(len)),
            false => zeros_crc32c(len),
        };
        self.record_chunk(region, chunk, &|_| false, crc)
    }

    /// Pages present (bit set) in the bitmaps so far, all regions.
    pub fn present_pages(&self) -> u64 {
        self.bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Whether a chunk has been written or recorded.
    pub fn is_chunk_written(&self, region: usize, chunk: u64) -> bool {
        self.layout
            .global_chunk(region, chunk)
            .is_ok_and(|g| self.written[g].load(Ordering::Acquire))
    }

    /// Commits the image: checks that every chunk has been written (else
    /// [`FixedRamError::MissingChunk`] naming the first missing one), writes
    /// the bitmaps, the checksum table and `device_state`, makes all of it
    /// durable, then writes the header and makes that durable too. Returns
    /// the file; renaming it into place is the caller's job.
    pub fn commit(self, device_state: &[u8]) -> Result<File, FixedRamError> {
        self.commit_timed(device_state).map(|(file, _)| file)
    }

    /// The same as [`commit`](Self::commit), also saying how long each of
    /// its steps took.
    ///
    /// Durability uses `fdatasync`: it flushes the data and every piece of
    /// metadata needed to read it back (the file size, the block
    /// allocation), and skips only what reading does not need (timestamps).
    pub fn commit_timed(self, device_state: &[u8]) -> Result<(File, CommitTimes), FixedRamError> {
        self.check_complete()?;
        let start = Instant::now();
        let metadata_crc = self.write_metadata(device_state)?;
        let metadata = start.elapsed();
        let start = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| FixedRamError::io("fsyncing the image data", e))?;
        let data_sync = start.elapsed();
        let start = Instant::now();
        let header = Header::from_layout(
            &self.layout,
            device_state.len() as u64,
            crc32c::crc32c(device_state),
            metadata_crc,
        );
        write_padded(&self.file, &header.to_bytes(), 0, &|| {
            "the header".to_string()
        })?;
        self.file
            .sync_data()
            .map_err(|e| FixedRamError::io("fsyncing the image header", e))?;
        let times = CommitTimes {
            metadata,
            data_sync,
            header_sync: start.elapsed(),
        };
        Ok((self.file, times))
    }

    /// [`FixedRamError::MissingChunk`] for the first chunk never written.
    fn check_complete(&self) -> Result<(), FixedRamError> {
        let layout = &self.layout;
        for region in 0..layout.regions().len() {
            for chunk in 0..layout.chunks(region) {
                if !self.is_chunk_written(region, chunk) {
                    return Err(FixedRamError::MissingChunk { region, chunk });
                }
            }
        }
        Ok(())
    }

    /// Writes the bitmaps, the checksum table and the device state and sets
    /// the file length; returns the metadata CRC (every bitmap, then the
    /// checksum table).
    fn write_metadata(&self, device_state: &[u8]) -> Result<u32, FixedRamError> {
        let layout = &self.layout;
        // Metadata goes through 4096-aligned, padded buffers so that a file
        // opened with O_DIRECT (`from_file`) takes it; the padding lands in
        // the gaps before the next aligned area, or past the end (truncated).
        let mut metadata_crc = 0u32;
        for (region, (r, words)) in layout.regions().iter().zip(&self.bitmaps).enumerate() {
            let bytes: Vec<u8> = words
                .iter()
                .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                .collect();
            metadata_crc = crc32c::crc32c_append(metadata_crc, &bytes);
            write_padded(&self.file, &bytes, r.bitmap_offset, &|| {
                format!("the bitmap of region {region}")
            })?;
        }
        let table: Vec<u8> = self
            .crcs
            .iter()
            .flat_map(|c| c.load(Ordering::Acquire).to_le_bytes())
            .collect();
        metadata_crc = crc32c::crc32c_append(metadata_crc, &table);
        write_padded(&self.file, &table, layout.checksum_table_offset(), &|| {
            "the checksum table".to_string()
        })?;
        let dso = layout.device_state_offset();
        write_padded(&self.file, device_state, dso, &|| {
            "the device state".to_string()
        })?;
        let end = dso
            .checked_add(device_state.len() as u64)
            .ok_or_else(|| FixedRamError::BadArgument("the device state is too large".into()))?;
        self.file
            .set_len(end)
            .map_err(|e| FixedRamError::io(format!("setting the image length to {end:#x}"), e))?;
        Ok(metadata_crc)
    }

    fn page_offset(&self, region: usize, page: u64) -> u64 {
        let r = &self.layout.regions()[region];
        r.pages_offset + page * u64::from(self.layout.page_size())
    }

    /// Sets (or clears) `count` bits from `page`; returns whether any of them
    /// was set before.
    fn set_bits(&self, region: usize, page: u64, count: u64, set: bool) -> bool {
        let words = &self.bitmaps[region];
        let mut any = false;
        let mut p = page;
        let end = page + count;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let word = &words[(p / 64) as usize];
            let old = if set {
                word.fetch_or(mask, Ordering::AcqRel)
            } else {
                word.fetch_and(!mask, Ordering::AcqRel)
            };
            any |= old & mask != 0;
            p += n;
        }
        any
    }

    /// Clears the bits of `count` pages from `page`; if any was set, punches
    /// the pages back to holes.
    fn clear_and_punch(&self, region: usize, page: u64, count: u64) -> Result<(), FixedRamError> {
        if self.set_bits(region, page, count, false) {
            let ps = u64::from(self.layout.page_size());
            punch_hole(&self.file, self.page_offset(region, page), count * ps)?;
        }
        Ok(())
    }
}

/// CRC32C of `len` zero bytes.
fn zeros_crc32c(len: u64) -> u32 {
    page_runs::crc32c_append_zeros(0, len)
}
