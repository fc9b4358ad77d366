//! The on-disk header: encoding and the validating parser.

use std::fmt;

use crate::layout::METADATA_CRC_VERSION;
use crate::layout::{
    bitmap_len_for, check_alignment, check_chunk_size, check_region_specs, chunk_bases,
    is_valid_page_size, HEADER_FIXED_LEN, REGION_ENTRY_LEN,
};
use crate::{FixedRamError, Layout, RegionLayout, FORMAT_VERSION, MAGIC, MAX_REGIONS};

/// A validated image header (see `docs/fixed-ram-format.md` §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The format version (1 or 2).
    pub format_version: u32,
    /// The page size in bytes.
    pub page_size: u32,
    /// The alignment of every area in bytes.
    pub alignment: u32,
    /// The checksum granularity in bytes.
    pub chunk_size: u32,
    /// The region table.
    pub regions: Vec<RegionLayout>,
    /// Where the device-state blob starts.
    pub device_state_offset: u64,
    /// The device-state blob's length.
    pub device_state_len: u64,
    /// CRC32C of the device-state blob.
    pub device_state_crc: u32,
    /// Where the checksum table starts.
    pub checksum_table_offset: u64,
    /// The checksum table's length (4 bytes per chunk).
    pub checksum_table_len: u64,
    /// CRC32C of every bitmap (in region order) followed by the checksum
    /// table; `None` in version 1, which had none.
    pub metadata_crc: Option<u32>,
}

/// The encoded length of a version-`version` header with `regions` regions:
/// `72 + 40 N` in version 1, `76 + 40 N` from version 2 (the metadata CRC).
pub(crate) fn header_len(version: u32, regions: usize) -> usize {
    let metadata_crc = if version >= METADATA_CRC_VERSION {
        4
    } else {
        0
    };
    HEADER_FIXED_LEN + REGION_ENTRY_LEN * regions + metadata_crc + 4
}

fn rd_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// A named area of the file, for error messages.
#[derive(Clone, Copy)]
enum Area {
    Header,
    Bitmap(usize),
    Pages(usize),
    Checksums,
    DeviceState,
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Area::Header => write!(f, "the header area"),
            Area::Bitmap(r) => write!(f, "the bitmap of region {r}"),
            Area::Pages(r) => write!(f, "the page area of region {r}"),
            Area::Checksums => write!(f, "the checksum table"),
            Area::DeviceState => write!(f, "the device state"),
        }
    }
}

impl Header {
    /// The header that [`ImageWriter::commit`](crate::ImageWriter::commit)
    /// writes for `layout` and a device state of `device_state_len` bytes
    /// with CRC32C `device_state_crc`, and bitmaps and checksum table with
    /// CRC32C `metadata_crc`.
    pub fn from_layout(
        layout: &Layout,
        device_state_len: u64,
        device_state_crc: u32,
        metadata_crc: u32,
    ) -> Header {
        Header {
            format_version: FORMAT_VERSION,
            page_size: layout.page_size,
            // Both were checked to be at most 1 GiB by `Layout::with_params`.
            alignment: u32::try_from(layout.alignment).unwrap_or(u32::MAX),
            chunk_size: u32::try_from(layout.chunk_size).unwrap_or(u32::MAX),
            regions: layout.regions.clone(),
            device_state_offset: layout.device_state_offset,
            device_state_len,
            device_state_crc,
            checksum_table_offset: layout.checksum_table_offset,
            checksum_table_len: layout.checksum_table_len(),
            metadata_crc: Some(metadata_crc),
        }
    }

    /// The header's encoded length: `76 + 40 * regions` (`72 + 40 * regions`
    /// in version 1).
    pub fn encoded_len(&self) -> usize {
        header_len(self.format_version, self.regions.len())
    }

    /// Encodes the header in its `format_version`'s layout, CRC included
    /// (flags are always 0; the metadata CRC is written from version 2 on,
    /// as 0 if `metadata_crc` is `None`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.format_version.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.alignment.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        let count = u32::try_from(self.regions.len()).unwrap_or(u32::MAX);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&self.device_state_offset.to_le_bytes());
        b.extend_from_slice(&self.device_state_len.to_le_bytes());
        b.extend_from_slice(&self.device_state_crc.to_le_bytes());
        b.extend_from_slice(&self.checksum_table_offset.to_le_bytes());
        b.extend_from_slice(&self.checksum_table_len.to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.guest_addr.to_le_bytes());
            b.extend_from_slice(&r.size.to_le_bytes());
            b.extend_from_slice(&r.bitmap_offset.to_le_bytes());
            b.extend_from_slice(&r.bitmap_len.to_le_bytes());
            b.extend_from_slice(&r.pages_offset.to_le_bytes());
        }
        if self.format_version >= METADATA_CRC_VERSION {
            b.extend_from_slice(&self.metadata_crc.unwrap_or(0).to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// The file length the header describes: device-state offset + length.
    pub fn file_len(&self) -> u64 {
        self.device_state_offset
            .saturating_add(self.device_state_len)
    }

    /// The layout of a validated header.
    pub(crate) fn layout(&self) -> Result<Layout, FixedRamError> {
        let chunk_size = u64::from(self.chunk_size);
        let chunk_base = chunk_bases(&self.regions, chunk_size).ok_or_else(|| {
            FixedRamError::BadArgument("the chunk count overflows 64 bits".into())
        })?;
        Ok(Layout {
            page_size: self.page_size,
            alignment: u64::from(self.alignment),
            chunk_size,
            regions: self.regions.clone(),
            chunk_base,
            checksum_table_offset: self.checksum_table_offset,
            device_state_offset: self.device_state_offset,
        })
    }

    /// Parses and validates a header; see `docs/fixed-ram-format.md` §6 for
    /// the checks and their order.
    pub(crate) fn parse(bytes: &[u8], file_len: u64) -> Result<Header, FixedRamError> {
        // 1. Never committed: empty, or the magic is zero.
        let magic_part = &bytes[..bytes.len().min(MAGIC.len())];
        if (bytes.is_empty() && file_len == 0)
            || (!bytes.is_empty() && magic_part.iter().all(|&b| b == 0))
        {
            return Err(FixedRamError::NotCommitted);
        }
        // 2. Magic.
        if magic_part != MAGIC {
            return Err(FixedRamError::BadMagic);
        }
        let avail = (bytes.len() as u64).min(file_len);
        let short = |needed: usize| FixedRamError::OutOfFile {
            what: "the header".into(),
            offset: 0,
            len: needed as u64,
            file_len: avail,
        };
        if avail < HEADER_FIXED_LEN as u64 {
            return Err(short(HEADER_FIXED_LEN + 4));
        }
        // 3. Version.
        let format_version = rd_u32(bytes, 8);
        if format_version == 0 || format_version > FORMAT_VERSION {
            return Err(FixedRamError::UnsupportedVersion {
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        // 4. Region count and whole header present.
        let count = rd_u32(bytes, 28);
        if count == 0 || count > MAX_REGIONS {
            return Err(FixedRamError::RegionCount(count));
        }
        let n = count as usize;
        let hlen = header_len(format_version, n);
        if avail < hlen as u64 {
            return Err(short(hlen));
        }
        // 5. CRC.
        let stored = rd_u32(bytes, hlen - 4);
        let computed = crc32c::crc32c(&bytes[..hlen - 4]);
        if stored != computed {
            return Err(FixedRamError::HeaderChecksum { stored, computed });
        }
        // 6. Flags, page size, alignment, chunk size.
        let flags = rd_u32(bytes, 12);
        if flags != 0 {
            return Err(FixedRamError::UnknownFlags(flags));
        }
        let page_size = rd_u32(bytes, 16);
        if !is_valid_page_size(page_size) {
            return Err(FixedRamError::BadPageSize(page_size));
        }
        let alignment = rd_u32(bytes, 20);
        let align = u64::from(alignment);
        check_alignment(align, page_size)?;
        if (hlen as u64) > align {
            return Err(FixedRamError::BadAlignment {
                alignment: align,
                reason: format!("the {hlen}-byte header of {n} regions does not fit in it"),
            });
        }
        let chunk_size = rd_u32(bytes, 24);
        check_chunk_size(u64::from(chunk_size), page_size)?;

        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let e = HEADER_FIXED_LEN + REGION_ENTRY_LEN * i;
            regions.push(RegionLayout {
                guest_addr: rd_u64(bytes, e),
                size: rd_u64(bytes, e + 8),
                bitmap_offset: rd_u64(bytes, e + 16),
                bitmap_len: rd_u64(bytes, e + 24),
                pages_offset: rd_u64(bytes, e + 32),
            });
        }
        let header = Header {
            format_version,
            page_size,
            alignment,
            chunk_size,
            regions,
            device_state_offset: rd_u64(bytes, 32),
            device_state_len: rd_u64(bytes, 40),
            device_state_crc: rd_u32(bytes, 48),
            checksum_table_offset: rd_u64(bytes, 52),
            checksum_table_len: rd_u64(bytes, 60),
            metadata_crc: (format_version >= METADATA_CRC_VERSION)
                .then(|| rd_u32(bytes, HEADER_FIXED_LEN + REGION_ENTRY_LEN * n)),
        };
        header.validate_areas(file_len)?;
        Ok(header)
    }

    /// Steps 7 to 11: regions, alignment, bounds, checksum table, overlap,
    /// file length.
    fn validate_areas(&self, file_len: u64) -> Result<(), FixedRamError> {
        let ps = u64::from(self.page_size);
        let align = u64::from(self.alignment);
        // 7. Regions in guest space and their bitmap lengths.
        check_region_specs(
            self.page_size,
            self.regions.iter().map(|r| (r.guest_addr, r.size)),
        )?;
        for (i, r) in self.regions.iter().enumerate() {
            let expected = bitmap_len_for(r.size / ps);
            if r.bitmap_len != expected {
                return Err(FixedRamError::BadBitmap {
                    region: i,
                    reason: format!(
                        "length {} bytes, expected {expected} for {} pages",
                        r.bitmap_len,
                        r.size / ps
                    ),
                });
            }
        }
        // 8. Alignment and bounds of every area.
        let mut areas: Vec<(u64, u64, Area)> = Vec::with_capacity(2 * self.regions.len() + 3);
        areas.push((0, align, Area::Header));
        for (i, r) in self.regions.iter().enumerate() {
            areas.push((r.bitmap_offset, r.bitmap_len, Area::Bitmap(i)));
            areas.push((r.pages_offset, r.size, Area::Pages(i)));
        }
        areas.push((
            self.checksum_table_offset,
            self.checksum_table_len,
            Area::Checksums,
        ));
        areas.push((
            self.device_state_offset,
            self.device_state_len,
            Area::DeviceState,
        ));
        for &(offset, len, area) in &areas {
            if offset % align != 0 {
                return Err(FixedRamError::Misaligned {
                    what: area.to_string(),
                    offset,
                    alignment: align,
                });
            }
            match offset.checked_add(len) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(FixedRamError::OutOfFile {
                        what: area.to_string(),
                        offset,
                        len,
                        file_len,
                    })
                }
            }
        }
        // 9. Checksum-table length.
        let chunk_size = u64::from(self.chunk_size);
        let expected = chunk_bases(&self.regions, chunk_size)
            .and_then(|b| b.last().copied())
            .and_then(|total| total.checked_mul(4));
        if expected != Some(self.checksum_table_len) {
            return Err(FixedRamError::BadChecksumTable {
                expected: expected.unwrap_or(u64::MAX),
                found: self.checksum_table_len,
            });
        }
        // 10. No overlap (ends cannot overflow: checked in step 8).
        areas.retain(|&(_, len, _)| len > 0);
        areas.sort_by_key(|&(offset, _, _)| offset);
        for pair in areas.windows(2) {
            let (a_off, a_len, a) = pair[0];
            let (b_off, b_len, b) = pair[1];
            if a_off + a_len > b_off {
                return Err(FixedRamError::Overlap {
                    a: format!("{a} ({a_off:#x}..{:#x})", a_off + a_len),
                    b: format!("{b} ({b_off:#x}..{:#x})", b_off + b_len),
                });
            }
        }
        // 11. Exact file length.
        let expected = self.device_state_offset + self.device_state_len;
        if expected != file_len {
            return Err(FixedRamError::FileLength {
                expected,
                found: file_len,
            });
        }
        Ok(())
    }
}
