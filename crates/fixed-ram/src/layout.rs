//! Constants, region descriptions and the file layout arithmetic.

use crate::FixedRamError;

/// The first 8 bytes of a committed image.
pub const MAGIC: [u8; 8] = *b"CRYOFRAM";
/// The format version this crate writes and the newest it reads; it reads
/// every version from 1 (version 2 added the metadata CRC).
pub const FORMAT_VERSION: u32 = 2;
/// The first version whose header holds the metadata CRC (of the bitmaps
/// and the checksum table).
pub const METADATA_CRC_VERSION: u32 = 2;
/// The alignment of every area in files this crate writes (raised to the
/// page size for larger pages).
pub const DEFAULT_ALIGNMENT: u64 = 1 << 20;
/// The checksum granularity in files this crate writes (raised to the page
/// size for larger pages).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// The smallest page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// The largest page size (2 MiB).
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// The largest alignment and chunk size a reader accepts (1 GiB).
pub const MAX_ALIGNMENT: u64 = 1 << 30;
/// The most regions an image may have.
pub const MAX_REGIONS: u32 = 1024;
/// Header bytes before the region table.
pub const HEADER_FIXED_LEN: usize = 68;
/// Bytes per region-table entry.
pub const REGION_ENTRY_LEN: usize = 40;

/// A guest memory region to lay out: guest physical address and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest physical address of the first byte (a multiple of the page size).
    pub guest_addr: u64,
    /// Size in bytes (a nonzero multiple of the page size).
    pub size: u64,
}

/// Where one region lives in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// File offset of the region's bitmap.
    pub bitmap_offset: u64,
    /// Bitmap length in bytes: `8 * ceil(pages / 64)`.
    pub bitmap_len: u64,
    /// File offset of page 0 of the region.
    pub pages_offset: u64,
}

/// The complete layout of an image: page size, alignment, chunk size and
/// where every area lives.
///
/// Built by [`Layout::new`] for writing, or from a validated
/// [`Header`](crate::Header) when reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub(crate) page_size: u32,
    pub(crate) alignment: u64,
    pub(crate) chunk_size: u64,
    pub(crate) regions: Vec<RegionLayout>,
    /// Global index of each region's first chunk (plus the total at the end).
    pub(crate) chunk_base: Vec<u64>,
    pub(crate) checksum_table_offset: u64,
    pub(crate) device_state_offset: u64,
}

pub(crate) fn is_valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// `8 * ceil(pages / 64)`.
pub(crate) fn bitmap_len_for(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

fn align_up(value: u64, alignment: u64) -> Option<u64> {
    value.checked_next_multiple_of(alignment)
}

fn overflow(what: &str) -> FixedRamError {
    FixedRamError::BadArgument(format!("the image layout overflows 64 bits at the {what}"))
}

pub(crate) fn check_alignment(alignment: u64, page_size: u32) -> Result<(), FixedRamError> {
    let bad = |reason: &str| FixedRamError::BadAlignment {
        alignment,
        reason: reason.to_string(),
    };
    if !alignment.is_power_of_two() {
        return Err(bad("must be a power of two"));
    }
    if alignment < u64::from(page_size) || alignment < u64::from(MIN_PAGE_SIZE) {
        return Err(bad("must be at least 4096 and the page size"));
    }
    if alignment > MAX_ALIGNMENT {
        return Err(bad("must be at most 1 GiB"));
    }
    Ok(())
}

pub(crate) fn check_chunk_size(chunk_size: u64, page_size: u32) -> Result<(), FixedRamError> {
    let bad = |reason: &str| FixedRamError::BadChunkSize {
        chunk_size,
        reason: reason.to_string(),
    };
    if !chunk_size.is_power_of_two() {
        return Err(bad("must be a power of two"));
    }
    if chunk_size < u64::from(page_size) {
        return Err(bad("must be at least the page size"));
    }
    if chunk_size > MAX_ALIGNMENT {
        return Err(bad("must be at most 1 GiB"));
    }
    Ok(())
}

/// Checks guest addresses and sizes of the regions (page multiples, nonzero,
/// sorted, not overlapping, no overflow).
pub(crate) fn check_region_specs(
    page_size: u32,
    regions: impl Iterator<Item = (u64, u64)>,
) -> Result<(), FixedRamError> {
    let ps = u64::from(page_size);
    let mut prev_end: Option<u64> = None;
    for (i, (guest_addr, size)) in regions.enumerate() {
        let bad = |reason: String| FixedRamError::BadRegion { region: i, reason };
        if size == 0 {
            return Err(bad("size is 0".into()));
        }
        if size % ps != 0 {
            return Err(bad(format!(
                "size {size:#x} is not a multiple of the page size {ps:#x}"
            )));
        }
        if guest_addr % ps != 0 {
            return Err(bad(format!(
                "guest address {guest_addr:#x} is not a multiple of the page size {ps:#x}"
            )));
        }
        let end = guest_addr.checked_add(size).ok_or_else(|| {
            bad(format!(
                "guest address {guest_addr:#x} + size {size:#x} overflows"
            ))
        })?;
        if let Some(prev_end) = prev_end {
            if guest_addr < prev_end {
                return Err(bad(format!(
                    "guest range {guest_addr:#x}..{end:#x} is not sorted after, or overlaps, region {} (ending at {prev_end:#x})",
                    i - 1
                )));
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// Chunk count per region and the global chunk bases; `None` on overflow.
pub(crate) fn chunk_bases(regions: &[RegionLayout], chunk_size: u64) -> Option<Vec<u64>> {
    let mut bases = Vec::with_capacity(regions.len() + 1);
    let mut total = 0u64;
    for r in regions {
        bases.push(total);
        total = total.checked_add(r.size.div_ceil(chunk_size))?;
    }
    bases.push(total);
    Some(bases)
}

impl Layout {
    /// Lays out an image for `regions` (sorted by guest address, not
    /// overlapping) with `page_size`-byte pages, the default alignment and
    /// chunk size (both raised to the page size for 2 MiB pages).
    pub fn new(page_size: u32, regions: &[RegionSpec]) -> Result<Layout, FixedRamError> {
        let ps = u64::from(page_size);
        Layout::with_params(
            page_size,
            DEFAULT_ALIGNMENT.max(ps),
            DEFAULT_CHUNK_SIZE.max(ps),
            regions,
        )
    }

    /// Lays out an image with an explicit alignment and chunk size (powers
    /// of two, at least the page size; the alignment at least 4096 and large
    /// enough to hold the header). Small values make small test files.
    pub fn with_params(
        page_size: u32,
        alignment: u64,
        chunk_size: u64,
        regions: &[RegionSpec],
    ) -> Result<Layout, FixedRamError> {
        if !is_valid_page_size(page_size) {
            return Err(FixedRamError::BadPageSize(page_size));
        }
        check_alignment(alignment, page_size)?;
        check_chunk_size(chunk_size, page_size)?;
        let count = u32::try_from(regions.len()).unwrap_or(u32::MAX);
        if count == 0 || count > MAX_REGIONS {
            return Err(FixedRamError::RegionCount(count));
        }
        if crate::header::header_len(FORMAT_VERSION, regions.len()) as u64 > alignment {
            return Err(FixedRamError::BadAlignment {
                alignment,
                reason: format!(
                    "the {}-byte header of {} regions does not fit in it",
                    crate::header::header_len(FORMAT_VERSION, regions.len()),
                    regions.len()
                ),
            });
        }
        check_region_specs(page_size, regions.iter().map(|r| (r.guest_addr, r.size)))?;
        let ps = u64::from(page_size);
        let mut cursor = alignment;
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            let bitmap_len = bitmap_len_for(r.size / ps);
            let bitmap_offset = cursor;
            let pages_offset = bitmap_offset
                .checked_add(bitmap_len)
                .and_then(|v| align_up(v, alignment))
                .ok_or_else(|| overflow("bitmap"))?;
            cursor = pages_offset
                .checked_add(r.size)
                .and_then(|v| align_up(v, alignment))
                .ok_or_else(|| overflow("page area"))?;
            out.push(RegionLayout {
                guest_addr: r.guest_addr,
                size: r.size,
                bitmap_offset,
                bitmap_len,
                pages_offset,
            });
        }
        let chunk_base = chunk_bases(&out, chunk_size).ok_or_else(|| overflow("chunk count"))?;
        let total = chunk_base.last().copied().unwrap_or(0);
        let checksum_table_offset = cursor;
        let device_state_offset = total
            .checked_mul(4)
            .and_then(|len| checksum_table_offset.checked_add(len))
            .and_then(|v| align_up(v, alignment))
            .ok_or_else(|| overflow("checksum table"))?;
        Ok(Layout {
            page_size,
            alignment,
            chunk_size,
            regions: out,
            chunk_base,
            checksum_table_offset,
            device_state_offset,
        })
    }

    /// The page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The checksum granularity in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The alignment of every area in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The regions, in guest-address order.
    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }

    /// The number of chunks in `region` (0 for a region that does not exist).
    pub fn chunks(&self, region: usize) -> u64 {
        self.regions
            .get(region)
            .map_or(0, |r| r.size.div_ceil(self.chunk_size))
    }

    /// The total number of chunks in all regions.
    pub fn total_chunks(&self) -> u64 {
        self.chunk_base.last().copied().unwrap_or(0)
    }

    /// The byte range of a chunk: (offset within the region, length). The
    /// last chunk of a region may be shorter than the chunk size; a chunk or
    /// region that does not exist gives `(0, 0)`.
    pub fn chunk_range(&self, region: usize, chunk: u64) -> (u64, u64) {
        match self.regions.get(region) {
            Some(r) if chunk < r.size.div_ceil(self.chunk_size) => {
                let start = chunk * self.chunk_size;
                (start, (r.size - start).min(self.chunk_size))
            }
            _ => (0, 0),
        }
    }

    /// The number of pages in `region` (0 for a region that does not exist).
    pub fn pages(&self, region: usize) -> u64 {
        self.regions
            .get(region)
            .map_or(0, |r| r.size / u64::from(self.page_size))
    }

    /// Where the checksum table starts.
    pub fn checksum_table_offset(&self) -> u64 {
        self.checksum_table_offset
    }

    /// The checksum table's length: 4 bytes per chunk.
    pub fn checksum_table_len(&self) -> u64 {
        self.total_chunks() * 4
    }

    /// Where the device state starts (the file is this long before the
    /// device state is written).
    pub fn device_state_offset(&self) -> u64 {
        self.device_state_offset
    }

    /// Index of a chunk in the checksum table; `Err` if out of range.
    pub(crate) fn global_chunk(&self, region: usize, chunk: u64) -> Result<usize, FixedRamError> {
        let chunks = self.chunks(region);
        if region >= self.regions.len() || chunk >= chunks {
            return Err(FixedRamError::BadArgument(format!(
                "chunk {chunk} of region {region} does not exist (the image has {} regions; that region has {chunks} chunks)",
                self.regions.len()
            )));
        }
        usize::try_from(self.chunk_base[region] + chunk)
            .map_err(|_| FixedRamError::BadArgument("chunk index overflows usize".into()))
    }
}
