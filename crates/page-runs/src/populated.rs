//! Finding memory that was never populated, so that a save or a snapshot
//! records it as zeros without reading it (reading it would fault every
//! page in, and scan and checksum zeros).
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
pub fn never_populated(entry: u64) -> bool {
    if entry & PM_PRESENT != 0 {
        return false;
    }
    if entry & PM_SWAP == 0 {
        return true;
    }
    let frame = entry & PM_FRAME;
    frame & SWP_PTE_MARKER == SWP_PTE_MARKER && frame >> SWP_TYPE_BITS == PTE_MARKER_UFFD_WP
}

/// Whether every mapping under `[addr, addr + len)` is private anonymous
/// memory (`rw-p`, inode 0, no file name: unnamed, `[heap]` or
/// `[anon:...]`) and together they cover it. `maps` is the text of
/// `/proc/self/maps`. Only there does a never-populated page read as zeros.
pub fn private_anonymous(maps: &str, addr: usize, len: usize) -> bool {
    let (start, end) = (addr, addr.saturating_add(len));
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

/// This process's `/proc/self/pagemap`, read for runs of pages. Shared by
/// threads: each read is one `pread`.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens it; `None` where it cannot be read (then nothing is skipped).
    pub fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap")
            .ok()
            .map(|file| Pagemap { file })
    }

    /// For each page of `page_size` bytes from `addr` up to `addr + len`,
    /// whether it was never populated; on a read error, every page counts
    /// as populated.
    pub fn unpopulated_pages(
        &self,
        addr: usize,
        len: usize,
        page_size: usize,
        out: &mut Vec<bool>,
    ) {
        self.unpopulated_blocks(addr, len, page_size, page_size, out);
    }

    /// For each block of `block_size` bytes (a multiple of `page_size`)
    /// from `addr` (the last one may be shorter) up to `addr + len`, whether
    /// all its pages were never populated; on a read error, every block
    /// counts as populated.
    pub fn unpopulated_blocks(
        &self,
        addr: usize,
        len: usize,
        block_size: usize,
        page_size: usize,
        out: &mut Vec<bool>,
    ) {
        let page = page_size.max(1);
        let mut entries = vec![0u8; len / page * 8];
        let off = (addr / page * 8) as u64;
        out.clear();
        if self.file.read_exact_at(&mut entries, off).is_err() {
            out.resize(len.div_ceil(block_size.max(1)), false);
            return;
        }
        let per_block = (block_size / page).max(1) * 8;
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

    #[test]
    fn only_private_anonymous_mappings_qualify() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 \n\
3000-4000 rw-p 00000000 00:00 0                          [anon:guest]\n\
4000-5000 rw-s 00000000 00:01 1234                       /memfd:ram (deleted)\n\
5000-6000 rw-p 00000000 00:00 0                          [heap]\n\
7000-8000 rw-p 00001000 08:01 99                         /var/lib/ram\n";
        assert!(private_anonymous(maps, 0x1000, 0x3000));
        assert!(private_anonymous(maps, 0x2000, 0x1000));
        assert!(private_anonymous(maps, 0x5000, 0x1000));
        assert!(!private_anonymous(maps, 0x3000, 0x2000), "shared memfd");
        assert!(!private_anonymous(maps, 0x5000, 0x2000), "a gap");
        assert!(!private_anonymous(maps, 0x7000, 0x1000), "a file");
        assert!(!private_anonymous(maps, 0x9000, 0x1000), "unmapped");
        assert!(!private_anonymous("garbage\n", 0x1000, 0x1000));
    }
}

#[cfg(test)]
mod pagemap_tests {
    use super::*;

    #[test]
    fn untouched_anonymous_memory_is_unpopulated_until_written() {
        let Some(pagemap) = Pagemap::open() else {
            return;
        };
        let page = 4096;
        let len = 16 * page;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let addr = ptr as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(private_anonymous(&maps, addr, len));
        // SAFETY: page 3 lies inside the mapping.
        unsafe { *(ptr.cast::<u8>().add(3 * page)) = 1 };
        let mut out = Vec::new();
        pagemap.unpopulated_pages(addr, len, page, &mut out);
        assert_eq!(out.len(), 16);
        assert!(!out[3], "the written page is populated");
        assert!(out[0] && out[15], "{out:?}");
        pagemap.unpopulated_blocks(addr, len, 8 * page, page, &mut out);
        assert_eq!(out, [false, true]);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(ptr, len) };
    }
}
