//! One memory slot's dirty pages as a bitmap (bit `i` = page `i` of the slot).

/// Size of the pages a bitmap counts (KVM logs host pages; x86_64 uses 4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// The dirty pages of one memory slot, as fetched by
/// [`DirtyLog::fetch_and_clear`](crate::DirtyLog::fetch_and_clear).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    guest_phys_addr: u64,
    pages: u64,
    words: Vec<u64>,
}

/// Number of u64 words that hold one bit per page of `pages` pages.
pub(crate) fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap for a slot at `guest_phys_addr` of `pages` pages.
    pub fn new(guest_phys_addr: u64, pages: u64) -> Self {
        DirtyBitmap {
            guest_phys_addr,
            pages,
            words: vec![0; words_for(pages)],
        }
    }

    /// A bitmap from KVM's words; bits past `pages` are dropped.
    pub(crate) fn from_words(guest_phys_addr: u64, pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(words_for(pages), 0);
        let tail = pages % 64;
        if tail != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        DirtyBitmap {
            guest_phys_addr,
            pages,
            words,
        }
    }

    /// Guest-physical address of the slot's first page.
    pub fn guest_phys_addr(&self) -> u64 {
        self.guest_phys_addr
    }

    /// Number of pages the slot has.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Whether page `page` (index in the slot) is dirty; false out of range.
    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Marks page `page` dirty (ignored out of range).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Adds the dirty pages of `other` (same slot shape) to this one.
    /// Returns false and changes nothing when the shapes differ.
    pub fn merge(&mut self, other: &DirtyBitmap) -> bool {
        if other.guest_phys_addr != self.guest_phys_addr || other.pages != self.pages {
            return false;
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        true
    }

    /// The dirty pages as indexes in the slot, ascending.
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }

    /// The dirty pages as runs of guest-physical `(address, length)` in bytes,
    /// ascending, adjacent pages joined.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for page in self.iter_dirty() {
            let addr = self.guest_phys_addr + page * PAGE_SIZE;
            match out.last_mut() {
                Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
                _ => out.push((addr, PAGE_SIZE)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_iterate() {
        let mut b = DirtyBitmap::new(0x10_0000, 130);
        assert!(b.is_clean());
        for p in [0, 1, 63, 64, 129, 130, 1000] {
            b.set(p);
        }
        assert_eq!(b.count(), 5);
        assert!(b.is_dirty(63) && b.is_dirty(129) && !b.is_dirty(130));
        assert_eq!(b.iter_dirty().collect::<Vec<_>>(), vec![0, 1, 63, 64, 129]);
        assert_eq!(
            b.dirty_ranges(),
            vec![
                (0x10_0000, 2 * PAGE_SIZE),
                (0x10_0000 + 63 * PAGE_SIZE, 2 * PAGE_SIZE),
                (0x10_0000 + 129 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
    }

    #[test]
    fn from_words_drops_bits_past_the_end() {
        let b = DirtyBitmap::from_words(0, 70, vec![u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(b.words().len(), 2);
        assert_eq!(b.count(), 70);
    }

    #[test]
    fn merge_needs_the_same_shape() {
        let mut a = DirtyBitmap::new(0, 128);
        let mut b = DirtyBitmap::new(0, 128);
        b.set(5);
        assert!(a.merge(&b));
        assert!(a.is_dirty(5));
        assert!(!a.merge(&DirtyBitmap::new(4096, 128)));
        assert!(!a.merge(&DirtyBitmap::new(0, 64)));
    }
}
