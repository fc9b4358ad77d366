//! Fault copies of single pages, kept until a walker copies their block.
//!
//! A write fault on a block not yet copied copies only the faulting run of
//! pages (its T0 content) into page buffers here, then un-protects just that
//! run. The walker that later copies the block takes these pages instead of
//! reading memory that the writer may have changed since, and never reads
//! those pages from memory. The buffers come from a bounded pool: when it
//! is empty, the fault thread copies the whole block itself (the fallback).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

/// One page buffer taken from the pool, to fill and then [`PageStore::insert`].
pub(crate) type PageBuf = Box<[u8]>;

/// A block's page copies: (page index in the block, T0 content).
pub(crate) type PageCopies = Vec<(usize, PageBuf)>;

/// The T0 copies of pages of blocks not yet walked, per block, and the
/// order in which blocks got their first copy (walkers take those first).
pub(crate) struct PageStore {
    page: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Copied pages per global block: (page index in the block, content).
    by_block: HashMap<u64, PageCopies>,
    /// Blocks with copied pages, oldest first (a block may repeat: a
    /// walker skips one already taken).
    hot: VecDeque<u64>,
    free: Vec<Box<[u8]>>,
    /// Buffers that may still be allocated beyond `free`.
    may_allocate: usize,
    held: usize,
    peak: usize,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PageStore {
    /// A pool of at most `cap` page buffers of `page` bytes, `prealloc` of
    /// them allocated (and touched) now so that faults do not pay for them.
    pub(crate) fn new(page: usize, cap: usize, prealloc: usize) -> PageStore {
        let prealloc = prealloc.min(cap);
        let free = (0..prealloc)
            .map(|_| vec![0xa5u8; page].into_boxed_slice())
            .collect();
        PageStore {
            page,
            inner: Mutex::new(Inner {
                by_block: HashMap::new(),
                hot: VecDeque::new(),
                free,
                may_allocate: cap - prealloc,
                held: 0,
                peak: 0,
            }),
        }
    }

    /// `n` page buffers, or none if the pool cannot give that many.
    pub(crate) fn take_buffers(&self, n: usize) -> Option<Vec<PageBuf>> {
        let mut s = lock(&self.inner);
        if s.free.len() + s.may_allocate < n {
            return None;
        }
        let from_free = n.min(s.free.len());
        let at = s.free.len() - from_free;
        let mut bufs: Vec<PageBuf> = s.free.split_off(at);
        s.may_allocate -= n - from_free;
        drop(s);
        bufs.extend((from_free..n).map(|_| vec![0u8; self.page].into_boxed_slice()));
        Some(bufs)
    }

    /// Whether page `page` of block `g` has a copy here.
    pub(crate) fn has(&self, g: u64, page: usize) -> bool {
        lock(&self.inner)
            .by_block
            .get(&g)
            .is_some_and(|v| v.iter().any(|(p, _)| *p == page))
    }

    /// Records the copies of pages `first..` of block `g` (one buffer per
    /// page, in order); the block joins the walkers' hot list on its first
    /// copy.
    pub(crate) fn insert(&self, g: u64, first: usize, bufs: Vec<PageBuf>) {
        let mut s = lock(&self.inner);
        s.held += bufs.len();
        s.peak = s.peak.max(s.held);
        let entry = s.by_block.entry(g).or_default();
        let fresh = entry.is_empty();
        entry.extend(bufs.into_iter().enumerate().map(|(i, b)| (first + i, b)));
        if fresh {
            s.hot.push_back(g);
        }
    }

    /// Removes and returns block `g`'s copies (sorted by page), which the
    /// caller (the block's only claimer) uses instead of memory.
    pub(crate) fn take_block(&self, g: u64) -> PageCopies {
        let mut v = lock(&self.inner).by_block.remove(&g).unwrap_or_default();
        v.sort_unstable_by_key(|(p, _)| *p);
        v
    }

    /// Gives page buffers back to the pool.
    pub(crate) fn recycle(&self, pages: impl IntoIterator<Item = PageBuf>) {
        let mut s = lock(&self.inner);
        let before = s.free.len();
        s.free.extend(pages);
        let n = s.free.len() - before;
        s.held = s.held.saturating_sub(n);
    }

    /// The oldest block that got a fault copy and may still wait for a walker.
    pub(crate) fn next_hot(&self) -> Option<u64> {
        lock(&self.inner).hot.pop_front()
    }

    /// Most pages held at once.
    pub(crate) fn peak(&self) -> usize {
        lock(&self.inner).peak
    }
}

/// Copies block memory at `src` (`len` bytes) into `out`, taking the pages
/// in `copies` (page index, T0 content) from there instead of memory: those
/// pages are not read from memory at all (a writer may have changed them).
///
/// # Safety
/// `src` must be valid for reads of `len` bytes, and the pages not in
/// `copies` must not be written meanwhile (still write-protected and
/// claimed by the caller). `out` must be `len` bytes and not overlap `src`.
pub(crate) unsafe fn assemble(
    src: *const u8,
    len: usize,
    page: usize,
    copies: &[(usize, PageBuf)],
    out: &mut [u8],
) {
    let mut next = 0; // first page not yet filled
    let pages = len.div_ceil(page);
    let copy_mem = |from: usize, to: usize, out: &mut [u8]| {
        if from < to {
            let (a, b) = (from * page, (to * page).min(len));
            // SAFETY: `a..b` lies within the block (caller's contract); these
            // pages have no copy, so they are still protected and unchanged.
            unsafe { std::ptr::copy_nonoverlapping(src.add(a), out[a..b].as_mut_ptr(), b - a) };
        }
    };
    for (p, buf) in copies.iter().filter(|(p, _)| *p < pages) {
        copy_mem(next, *p, out);
        let a = p * page;
        let b = (a + page).min(len);
        out[a..b].copy_from_slice(&buf[..b - a]);
        next = p + 1;
    }
    copy_mem(next, pages, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_and_recycled() {
        let s = PageStore::new(16, 3, 1);
        let a = s.take_buffers(2).unwrap();
        assert!(s.take_buffers(2).is_none(), "only one left");
        s.insert(7, 4, a);
        assert!(s.has(7, 5) && !s.has(7, 6) && !s.has(8, 4));
        assert_eq!(s.next_hot(), Some(7));
        assert_eq!(s.next_hot(), None);
        let b = s.take_buffers(1).unwrap();
        s.insert(7, 0, b);
        assert_eq!(s.next_hot(), None, "block 7 was hot already");
        assert_eq!(s.peak(), 3);
        let got = s.take_block(7);
        assert_eq!(got.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [0, 4, 5]);
        s.recycle(got.into_iter().map(|(_, b)| b));
        assert!(s.take_buffers(3).is_some(), "all three are back");
    }

    #[test]
    fn assemble_takes_copies_instead_of_memory() {
        let page = 8;
        let mem: Vec<u8> = (0..36u8).collect(); // 4.5 pages
        let copies: PageCopies = vec![
            (1, vec![0xee; page].into_boxed_slice()),
            (4, vec![0xdd; page].into_boxed_slice()),
        ];
        let mut out = vec![0u8; mem.len()];
        // SAFETY: `mem` is ours, readable and not written; `out` is separate.
        unsafe { assemble(mem.as_ptr(), mem.len(), page, &copies, &mut out) };
        let mut want = mem.clone();
        want[8..16].fill(0xee);
        want[32..36].fill(0xdd);
        assert_eq!(out, want);
    }
}
