//! Constants and checks shared by the writer and the reader. See
//! `docs/stream-format.md` for the specification.

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"CRYOSTRM";
/// The format version this crate writes, and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the stream header in bytes.
pub const HEADER_LEN: usize = 20;
/// Size of a record header (type, flags, payload length) in bytes.
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest payload a record may have (64 MiB); a reader may set a lower limit.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Most regions a RAM layout may have.
pub const MAX_REGIONS: u32 = 1024;
/// Smallest page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest page size (2 MiB).
pub const MAX_PAGE_SIZE: u32 = 2 << 20;
/// Longest device section name in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most raw page bytes the writer puts in one record (at least one page is
/// always written per record).
pub const RAW_PAGES_PER_RECORD_BYTES: usize = 1 << 20;

pub(crate) const REC_SECTION: u16 = 1;
pub(crate) const REC_RAM_LAYOUT: u16 = 2;
pub(crate) const REC_PAGES: u16 = 3;
pub(crate) const REC_SYNC: u16 = 4;
pub(crate) const REC_END: u16 = 5;

pub(crate) const ENC_RAW: u8 = 0;
pub(crate) const ENC_ZERO: u8 = 1;

/// Size of the fixed part of a RAM pages payload.
pub(crate) const PAGES_HEADER_LEN: usize = 17;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RamRegion {
    /// Guest physical address of the first byte (a multiple of the page size).
    pub guest_addr: u64,
    /// Size in bytes (a nonzero multiple of the page size).
    pub size: u64,
}

pub(crate) fn check_page_size(page_size: u32) -> Result<(), String> {
    if page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(())
    } else {
        Err(format!(
            "page size {page_size} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
        ))
    }
}

pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name length {} is not in 1..={MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(pos) = name.iter().position(|b| !(0x20..=0x7e).contains(b)) {
        return Err(format!(
            "name byte {pos} is {:#04x}; names are printable ASCII (0x20..=0x7e)",
            name[pos]
        ));
    }
    Ok(())
}

pub(crate) fn check_layout(regions: &[RamRegion], page_size: u32) -> Result<(), String> {
    if regions.len() > MAX_REGIONS as usize {
        return Err(format!(
            "{} regions, at most {MAX_REGIONS} are allowed",
            regions.len()
        ));
    }
    let ps = u64::from(page_size);
    let mut prev_end: Option<u64> = None;
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0 {
            return Err(format!("region {i} has size 0"));
        }
        if !r.guest_addr.is_multiple_of(ps) || !r.size.is_multiple_of(ps) {
            return Err(format!(
                "region {i} ({:#x}, size {:#x}) is not aligned to the page size {ps:#x}",
                r.guest_addr, r.size
            ));
        }
        let Some(end) = r.guest_addr.checked_add(r.size) else {
            return Err(format!(
                "region {i} ({:#x}, size {:#x}) ends beyond the 64-bit address space",
                r.guest_addr, r.size
            ));
        };
        if let Some(prev_end) = prev_end {
            if r.guest_addr < prev_end {
                return Err(format!(
                    "region {i} starts at {:#x}, before the end of region {} at {prev_end:#x} (regions must be sorted and must not overlap)",
                    r.guest_addr,
                    i - 1
                ));
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// Checks that `count` pages from `first_page` lie inside region `region` of
/// `layout`; the error is the reason text.
pub(crate) fn check_pages(
    layout: &[RamRegion],
    page_size: u32,
    region: u32,
    first_page: u64,
    count: u64,
) -> Result<(), String> {
    if count == 0 {
        return Err("the page count is 0".to_string());
    }
    let Some(r) = layout.get(region as usize) else {
        return Err(format!("the RAM layout has {} regions", layout.len()));
    };
    let pages = r.size / u64::from(page_size);
    match first_page.checked_add(count) {
        Some(end) if end <= pages => Ok(()),
        _ => Err(format!("region {region} has {pages} pages")),
    }
}

/// A little-endian cursor over a payload; every read is bounds-checked.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}
