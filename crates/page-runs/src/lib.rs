//! The page vocabulary cryo's image and transfer crates share, in one place:
//! the zero-page scan ([`is_zero`]), the CRC32C of zeros without reading
//! them ([`crc32c_append_zeros`]), pages grouped into runs ([`PageRun`],
//! [`push_page`], [`push_page_joining`], [`spans`]), "the first error wins and stops the others"
//! ([`FirstError`]), the allocated size of a sparse file
//! ([`allocated_bytes`]) and memory that was never populated, which reads
//! as zeros without being read ([`populated`]). See the README for an
//! example.
#![deny(missing_docs)]

pub mod populated;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// True when every byte of `buf` is zero. Scans 256 bytes at a time with an
/// OR reduction the compiler turns into vector instructions, so a page with
/// data is usually rejected after its first block.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Zero bytes the CRC of zeros is built from.
const ZERO_BLOCK: usize = 4096;

/// Extends the CRC32C `crc` over `len` zero bytes, as
/// `crc32c::crc32c_append(crc, &[0; len])` would, without reading most of
/// them. Images checksum every chunk, zero pages as zeros, and a chunk of
/// never-touched memory is megabytes of them. Up to [`ZERO_APPEND_MAX`]
/// bytes are checksummed directly (the hardware CRC of 4 KiB takes about
/// 0.2 µs); beyond that, runs of zero blocks doubling in length, whose CRCs
/// are computed once, are added with `crc32c_combine` (about 12-20 µs each
/// here, whatever the length): a 4 MiB chunk of zeros in one combine
/// instead of a 4 MiB checksum (about 300 µs). A whole chunk of zeros (from
/// 0, the same length as the thread's last one) is answered from a cache.
pub fn crc32c_append_zeros(crc: u32, len: u64) -> u32 {
    // A chunk that is all zeros starts from 0 and has the chunk's length:
    // the same answer chunk after chunk, so the last one is kept.
    thread_local! {
        static LAST_FROM_ZERO: std::cell::Cell<(u64, u32)> = const { std::cell::Cell::new((0, 0)) };
    }
    if crc == 0 {
        let (last_len, last_crc) = LAST_FROM_ZERO.get();
        if last_len == len {
            return last_crc;
        }
        let computed = zeros_after(0, len);
        LAST_FROM_ZERO.set((len, computed));
        return computed;
    }
    zeros_after(crc, len)
}

/// [`crc32c_append_zeros`] without the cache.
fn zeros_after(crc: u32, len: u64) -> u32 {
    static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
    // Entry k: the CRC32C of ZERO_BLOCK << k zero bytes.
    static DOUBLINGS: std::sync::OnceLock<[u32; 48]> = std::sync::OnceLock::new();
    let direct = len % ZERO_APPEND_MAX;
    let mut crc = crc;
    let blocks = (len - direct) / ZERO_BLOCK as u64;
    if blocks > 0 {
        let doublings = DOUBLINGS.get_or_init(|| {
            let mut table = [0u32; 48];
            table[0] = crc32c::crc32c(&ZEROS);
            for k in 1..table.len() {
                table[k] =
                    crc32c::crc32c_combine(table[k - 1], table[k - 1], ZERO_BLOCK << (k - 1));
            }
            table
        });
        for (k, piece) in doublings.iter().enumerate() {
            if blocks >> k == 0 {
                break;
            }
            if (blocks >> k) & 1 == 1 {
                crc = crc32c::crc32c_combine(crc, *piece, ZERO_BLOCK << k);
            }
        }
    }
    let mut left = direct as usize;
    while left > 0 {
        let n = left.min(ZERO_BLOCK);
        crc = crc32c::crc32c_append(crc, &ZEROS[..n]);
        left -= n;
    }
    crc
}

/// Zero runs up to this many bytes are checksummed directly by
/// [`crc32c_append_zeros`]: below it that is cheaper than combining.
const ZERO_APPEND_MAX: u64 = 256 << 10;

/// Consecutive pages `start..end` (page numbers, end exclusive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRun {
    /// First page.
    pub start: u64,
    /// One past the last page.
    pub end: u64,
}

impl PageRun {
    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the run holds no page.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Adds `page` to `runs`: extends the last run when `page` directly follows
/// it, else starts a new run. Pages must come in increasing order.
pub fn push_page(runs: &mut Vec<PageRun>, page: u64) {
    match runs.last_mut() {
        Some(run) if run.end == page => run.end += 1,
        _ => runs.push(PageRun {
            start: page,
            end: page + 1,
        }),
    }
}

/// Adds `page` to `runs` like [`push_page`], but also extends the last run
/// over a gap of up to `max_gap` pages, as long as that run starts at or
/// after `floor`: one larger write instead of many small ones, where the
/// pages in the gap may be written too (e.g. a chunk rewritten from a copy
/// of it, so the gap holds the chunk's current bytes). Pages must come in
/// increasing order.
pub fn push_page_joining(runs: &mut Vec<PageRun>, page: u64, max_gap: u64, floor: u64) {
    match runs.last_mut() {
        Some(run) if run.start >= floor && run.end <= page && page - run.end <= max_gap => {
            run.end = page + 1
        }
        _ => push_page(runs, page),
    }
}

/// Pages `0..count` split into maximal runs over which `pred` gives the same
/// answer, in order, with that answer: see [`spans`].
pub struct Spans<F> {
    pred: F,
    next: u64,
    count: u64,
    pending: Option<bool>,
}

/// Splits pages `0..count` into maximal runs over which `pred(page)` is the
/// same, each with its value (e.g. runs of present and absent pages). `pred`
/// is called once per page, in order.
pub fn spans<F: FnMut(u64) -> bool>(count: u64, pred: F) -> Spans<F> {
    Spans {
        pred,
        next: 0,
        count,
        pending: None,
    }
}

impl<F: FnMut(u64) -> bool> Iterator for Spans<F> {
    type Item = (PageRun, bool);

    fn next(&mut self) -> Option<(PageRun, bool)> {
        if self.next >= self.count {
            return None;
        }
        let start = self.next;
        let value = match self.pending.take() {
            Some(v) => v,
            None => (self.pred)(start),
        };
        let mut end = start + 1;
        while end < self.count {
            let v = (self.pred)(end);
            if v != value {
                self.pending = Some(v);
                break;
            }
            end += 1;
        }
        self.next = end;
        Some((PageRun { start, end }, value))
    }
}

/// "The first error wins and stops the others": worker threads share one,
/// check [`stopped`](FirstError::stopped) between units of work, and report
/// with [`fail`](FirstError::fail); only the first error is kept.
#[derive(Debug)]
pub struct FirstError<E> {
    stop: AtomicBool,
    error: Mutex<Option<E>>,
}

impl<E> Default for FirstError<E> {
    fn default() -> Self {
        FirstError {
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }
}

impl<E> FirstError<E> {
    /// Nothing failed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `e` unless an error was recorded before, and stops the others.
    pub fn fail(&self, e: E) {
        self.stop.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// Stops the others without an error (e.g. on cancel).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether the workers should stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Takes the first error, if any (the stop flag stays set).
    pub fn take(&self) -> Option<E> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The first error, if any.
    pub fn into_inner(self) -> Option<E> {
        self.error.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err` with the first error, or `Ok` if none was recorded.
    pub fn into_result(self) -> Result<(), E> {
        self.into_inner().map_or(Ok(()), Err)
    }
}

/// Bytes `file` occupies on disk (`st_blocks * 512`; 0 if its metadata
/// cannot be read). For a sparse file this is less than its length.
pub fn allocated_bytes(file: &File) -> u64 {
    file.metadata().map_or(0, |m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_crc_of_zeros_is_the_crc_of_the_bytes() {
        for &len in &[
            0u64,
            1,
            4095,
            4096,
            4097,
            3 * 4096 + 5,
            64 << 10,
            256 << 10,
            (256 << 10) + 4096,
            (4 << 20) - 4096,
            (4 << 20) + 12,
            5 << 20,
        ] {
            let zeros = vec![0u8; len as usize];
            for &start in &[0u32, 7, 0xdead_beef] {
                assert_eq!(
                    crc32c_append_zeros(start, len),
                    crc32c::crc32c_append(start, &zeros),
                    "len {len} from {start:#x}"
                );
            }
            // Again from 0: the cached answer.
            assert_eq!(crc32c_append_zeros(0, len), crc32c::crc32c(&zeros));
        }
    }

    #[test]
    fn joining_bridges_small_gaps_but_not_the_floor() {
        let mut runs = Vec::new();
        for p in [3, 4, 6, 10, 11, 30] {
            super::push_page_joining(&mut runs, p, 4, 0);
        }
        // 4 -> 6 and 6 -> 10 bridge (gaps of 1 and 3), 11 -> 30 does not.
        let want = [
            PageRun { start: 3, end: 12 },
            PageRun { start: 30, end: 31 },
        ];
        assert_eq!(runs, want);
        // A run that starts before the floor (another chunk) stays as it is.
        super::push_page_joining(&mut runs, 33, 4, 32);
        super::push_page_joining(&mut runs, 35, 4, 32);
        assert_eq!(runs[2..], [PageRun { start: 33, end: 36 }]);
        // Adjacent pages join whatever the floor.
        super::push_page_joining(&mut runs, 36, 0, 1000);
        assert_eq!(runs[2], PageRun { start: 33, end: 37 });
    }

    use super::*;

    #[test]
    fn zero_scan() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        assert!(is_zero(&[]));
        for at in [0, 7, 255, 256, 4000, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "{at}");
            page[at] = 0;
        }
        // Lengths that are not a multiple of the block.
        assert!(is_zero(&[0; 300]));
        assert!(!is_zero(&[0, 0, 0, 9]));
    }

    #[test]
    fn runs_of_pages() {
        let mut runs = Vec::new();
        for p in [1, 2, 3, 7, 9, 10] {
            push_page(&mut runs, p);
        }
        assert_eq!(
            runs,
            [
                PageRun { start: 1, end: 4 },
                PageRun { start: 7, end: 8 },
                PageRun { start: 9, end: 11 },
            ]
        );
        assert_eq!(runs[0].len(), 3);
        assert!(!runs[0].is_empty());
    }

    #[test]
    fn spans_split_by_value() {
        let present = [true, true, false, true, false, false];
        let mut calls = 0;
        let s: Vec<_> = spans(6, |p| {
            calls += 1;
            present[p as usize]
        })
        .collect();
        assert_eq!(
            s,
            [
                (PageRun { start: 0, end: 2 }, true),
                (PageRun { start: 2, end: 3 }, false),
                (PageRun { start: 3, end: 4 }, true),
                (PageRun { start: 4, end: 6 }, false),
            ]
        );
        assert_eq!(calls, 6);
        assert_eq!(spans(0, |_| true).count(), 0);
        assert_eq!(spans(3, |_| false).collect::<Vec<_>>().len(), 1);
    }

    #[test]
    fn first_error_wins() {
        let f = FirstError::new();
        assert!(!f.stopped());
        f.fail(1);
        f.fail(2);
        assert!(f.stopped());
        assert_eq!(f.into_result(), Err(1));
        let g: FirstError<u8> = FirstError::new();
        g.stop();
        assert!(g.stopped());
        assert_eq!(g.into_result(), Ok(()));
        let h = FirstError::new();
        h.fail("x");
        assert_eq!(h.take(), Some("x"));
        assert_eq!(h.take(), None);
    }

    #[test]
    fn allocated_size_of_a_sparse_file() {
        let path = std::env::temp_dir().join(format!("page-runs-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(allocated_bytes(&f) < 64 << 20);
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
}

/// Compiles and runs the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
