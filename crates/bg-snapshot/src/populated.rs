//! Finding blocks whose memory was never populated, so that the snapshot
//! records them as zeros without reading them (`docs/bg-snapshot.md`,
//! "Never-populated memory").
//!
//! Only private anonymous memory qualifies: there a page table entry that is
//! empty or holds only a uffd-wp marker (what `WP_UNPOPULATED` leaves on a
//! never-touched page) means the page has no content, i.e. it reads as zeros.
//! Shared memory can hold pages in its file that this mapping never faulted
//! in, so its markers say nothing about the content.
//!
//! `/proc/self/pagemap` shows a marker as a swap entry of type
//! `SWP_PTE_MARKER` (the highest of the 5-bit swap types) whose offset is
//! `PTE_MARKER_UFFD_WP`. The swap type and offset are shown only to a process
//! with `CAP_SYS_ADMIN`; without it they read as zero, which is classified as
//! populated (nothing is skipped, nothing is lost).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::sys;
use crate::MemRange;

/// Bit 63 of a pagemap entry: the page is present.
const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: the entry is a swap entry (real swap, migration, or a marker).
const PM_SWAP: u64 = 1 << 62;
/// Bits 0-54: the PFN, or for a swap entry the type (bits 0-4) and offset.
const PM_FRAME: u64 = (1 << 55) - 1;
/// Width of the swap type in a pagemap swap entry (`MAX_SWAPFILES_SHIFT`).
const SWP_TYPE_BITS: u32 = 5;
/// `SWP_PTE_MARKER`: the last swap type.
const SWP_PTE_MARKER: u64 = (1 << SWP_TYPE_BITS) - 1;
/// `PTE_MARKER_UFFD_WP`: the marker's only bit when it records write protection.
const PTE_MARKER_UFFD_WP: u64 = 1;

/// Whether a pagemap entry says the page has never been populated: no page,
/// or only a uffd-wp marker. Anything else (present, swapped, migrating,
/// another marker, or a swap entry whose type is hidden) counts as populated.
pub(crate) fn never_populated(entry: u64) -> bool {
    if entry & PM_PRESENT != 0 {
        return false;
    }
    if entry & PM_SWAP == 0 {
        return true;
    }
    let frame = entry & PM_FRAME;
    frame & SWP_PTE_MARKER == SWP_PTE_MARKER && frame >> SWP_TYPE_BITS == PTE_MARKER_UFFD_WP
}

/// Whether every mapping under `r` is private anonymous memory (`rw-p`,
/// inode 0, no file name: unnamed, `[heap]` or `[anon:...]`) and together
/// they cover it. `maps` is the text of `/proc/self/maps`.
pub(crate) fn private_anonymous(maps: &str, r: &MemRange) -> bool {
    let (start, end) = (r.addr(), r.addr() + r.len());
    let mut covered = start;
    for line in maps.lines() {
        let Some((lo, hi, anon)) = parse_maps_line(line) else {
            continue;
        };
        if hi <= covered || lo >= end {
            continue;
        }
        if lo > covered || !anon {
            return false;
        }
        covered = hi;
        if covered >= end {
            return true;
        }
    }
    false
}

/// `(start, end, private anonymous)` of one `/proc/self/maps` line.
fn parse_maps_line(line: &str) -> Option<(usize, usize, bool)> {
    let mut fields = line.split_whitespace();
    let (lo, hi) = fields.next()?.split_once('-')?;
    let lo = usize::from_str_radix(lo, 16).ok()?;
    let hi = usize::from_str_radix(hi, 16).ok()?;
    let perms = fields.next()?;
    let inode = fields.nth(2)?;
    let name = fields.next().unwrap_or("");
    let anon = perms.as_bytes().get(3) == Some(&b'p')
        && inode == "0"
        && (name.is_empty() || name == "[heap]" || name.starts_with("[anon:"));
    Some((lo, hi, anon))
}

/// `/proc/self/pagemap`, read for runs of blocks.
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens it; `None` where it cannot be read (then nothing is skipped).
    pub(crate) fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap")
            .ok()
            .map(|file| Pagemap { file })
    }

    /// For each block of `block_size` bytes from `addr` (the last one may be
    /// shorter) up to `addr + len`, whether all its pages were never
    /// populated; on a read error, every block counts as populated.
    pub(crate) fn unpopulated_blocks(
        &self,
        addr: usize,
        len: usize,
        block_size: usize,
        out: &mut Vec<bool>,
    ) {
        let page = sys::page_size();
        let mut entries = vec![0u8; len / page * 8];
        let off = (addr / page * 8) as u64;
        out.clear();
        if self.file.read_exact_at(&mut entries, off).is_err() {
            out.resize(len.div_ceil(block_size), false);
            return;
        }
        let per_block = block_size / page * 8;
        out.extend(entries.chunks(per_block).map(|block| {
            block.chunks_exact(8).all(|e| {
                let mut word = [0u8; 8];
                word.copy_from_slice(e);
                never_populated(u64::from_ne_bytes(word))
            })
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_pagemap_entries() {
        // Seen on Linux 6.18 for a never-touched page under WP_UNPOPULATED.
        assert!(never_populated(0x4200_0000_0000_003f));
        assert!(never_populated(0));
        // Present (with or without the uffd-wp bit).
        assert!(!never_populated(PM_PRESENT | 0x1234));
        assert!(!never_populated(PM_PRESENT | (1 << 57)));
        // Swapped out (type 0, offset 7), and a swap entry whose type and
        // offset are hidden (no CAP_SYS_ADMIN).
        assert!(!never_populated(PM_SWAP | (7 << 5)));
        assert!(!never_populated(PM_SWAP | (1 << 57)));
        // A migration entry (type 29), and other markers (poison, guard).
        assert!(!never_populated(PM_SWAP | (5 << 5) | 29));
        assert!(!never_populated(PM_SWAP | (2 << 5) | 31));
        assert!(!never_populated(PM_SWAP | (4 << 5) | 31));
    }

    fn range(addr: usize, len: usize) -> MemRange {
        // SAFETY: never dereferenced.
        unsafe { MemRange::new(addr as *mut u8, len) }
    }

    #[test]
    fn only_private_anonymous_mappings_qualify() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 \n\
3000-4000 rw-p 00000000 00:00 0                          [anon:guest]\n\
4000-5000 rw-s 00000000 00:01 1234                       /memfd:ram (deleted)\n\
5000-6000 rw-p 00000000 00:00 0                          [heap]\n\
7000-8000 rw-p 00001000 08:01 99                         /var/lib/ram\n";
        assert!(private_anonymous(maps, &range(0x1000, 0x3000)));
        assert!(private_anonymous(maps, &range(0x2000, 0x1000)));
        assert!(private_anonymous(maps, &range(0x5000, 0x1000)));
        assert!(
            !private_anonymous(maps, &range(0x3000, 0x2000)),
            "shared memfd"
        );
        assert!(!private_anonymous(maps, &range(0x5000, 0x2000)), "a gap");
        assert!(!private_anonymous(maps, &range(0x7000, 0x1000)), "a file");
        assert!(!private_anonymous(maps, &range(0x9000, 0x1000)), "unmapped");
        assert!(!private_anonymous("garbage\n", &range(0x1000, 0x1000)));
    }
}
