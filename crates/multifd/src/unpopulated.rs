//! Never-populated guest memory, taken for zeros without reading it.
//!
//! Private anonymous memory that was never touched has no content: reading
//! it would fault every page in, and then scan (and checksum) zeros. A guest
//! that used 1 GiB of 16 has 15 GiB of such pages. A stopped save skips them
//! unread; so does the first round of a live transfer, whose dirty log is
//! already on, so that a page the guest populates after it was skipped is
//! sent again by a later round.

use page_runs::populated::{self, Pagemap};

use crate::{sys, MemRegion};

/// Which regions qualify, and the pagemap that tells their pages.
pub(crate) struct Unpopulated {
    pagemap: Pagemap,
    /// Per region: private anonymous memory, in pages this pagemap can tell.
    regions: Vec<bool>,
}

impl Unpopulated {
    /// For `regions` with pages of `page_size` bytes; None where no region
    /// qualifies or the pagemap cannot be read (then every page is read).
    pub(crate) fn find(regions: &[MemRegion], page_size: u64) -> Option<Unpopulated> {
        let host_page = sys::host_page_size();
        if host_page == 0 || !page_size.is_multiple_of(host_page) {
            return None;
        }
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        let regions: Vec<bool> = regions
            .iter()
            .map(|r| populated::private_anonymous(&maps, r.as_ptr() as usize, r.len() as usize))
            .collect();
        if !regions.contains(&true) {
            return None;
        }
        Some(Unpopulated {
            pagemap: Pagemap::open()?,
            regions,
        })
    }

    /// For each page of `page_size` bytes of region `region` from `addr` up
    /// to `addr + len`, whether it was never populated, into `out`; `out` is
    /// left empty where the region does not qualify (read every page).
    pub(crate) fn pages(
        &self,
        region: usize,
        addr: usize,
        len: usize,
        page_size: usize,
        out: &mut Vec<bool>,
    ) {
        out.clear();
        if self.regions.get(region) == Some(&true) {
            self.pagemap.unpopulated_blocks(
                addr,
                len,
                page_size,
                sys::host_page_size() as usize,
                out,
            );
        }
    }
}
