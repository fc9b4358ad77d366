//! The ranges cut into blocks, numbered globally across ranges; and a set of
//! blocks that several threads mark at once.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::MemRange;

/// The ranges' blocks: block `g` (global) is block `b` of range `r`.
#[derive(Debug)]
pub(crate) struct Blocks {
    ranges: Vec<MemRange>,
    /// Global index of each range's first block.
    first: Vec<u64>,
    size: usize,
    total: u64,
}

impl Blocks {
    /// `ranges` (already validated) cut into blocks of `size` bytes.
    pub(crate) fn new(ranges: &[MemRange], size: usize) -> Blocks {
        let mut first = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for r in ranges {
            first.push(total);
            total += r.len().div_ceil(size) as u64;
        }
        Blocks {
            ranges: ranges.to_vec(),
            first,
            size,
            total,
        }
    }

    /// The ranges.
    pub(crate) fn ranges(&self) -> &[MemRange] {
        &self.ranges
    }

    /// The block size.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Number of blocks in all ranges.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// (range index, block index in range, address, length) of global block `g`.
    pub(crate) fn locate(&self, g: u64) -> (usize, u64, usize, usize) {
        let r = self.first.partition_point(|&f| f <= g) - 1;
        let b = g - self.first[r];
        let range = &self.ranges[r];
        let off = b as usize * self.size;
        let len = self.size.min(range.len() - off);
        (r, b, range.addr() + off, len)
    }

    /// The global block holding `addr`, if `addr` is in one of the ranges.
    pub(crate) fn block_of(&self, addr: usize) -> Option<u64> {
        self.ranges.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.addr() && addr - r.addr() < r.len())
                .then(|| self.first[i] + ((addr - r.addr()) / self.size) as u64)
        })
    }

    /// The aligned run of `run` bytes (a power of two, at most the block
    /// size) of block `g` that holds `addr` (which must lie in the block):
    /// its address and length (shorter at a range's end).
    pub(crate) fn run_at(&self, g: u64, addr: usize, run: usize) -> (usize, usize) {
        let (_, _, start, len) = self.locate(g);
        let off = (addr - start) / run * run;
        (start + off, run.min(len - off))
    }

    /// The address spans of `blocks` (increasing global numbers), adjacent
    /// blocks of one range merged into one span.
    pub(crate) fn spans(&self, blocks: &[u64]) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for &g in blocks {
            let (_, _, addr, len) = self.locate(g);
            match spans.last_mut() {
                Some((start, l)) if *start + *l == addr => *l += len,
                _ => spans.push((addr, len)),
            }
        }
        spans
    }
}

/// A set of global block numbers, marked by one thread while another takes
/// what has been marked so far.
#[derive(Debug)]
pub(crate) struct BlockSet(Vec<AtomicU64>);

impl BlockSet {
    /// An empty set able to hold blocks `0..total`.
    pub(crate) fn new(total: u64) -> BlockSet {
        BlockSet((0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Adds block `g`.
    pub(crate) fn mark(&self, g: u64) {
        self.0[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::SeqCst);
    }

    /// Removes and returns every marked block, in increasing order. A block
    /// marked while this runs is either returned now or left for the next take.
    pub(crate) fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in self.0.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(addr: usize, len: usize) -> MemRange {
        // SAFETY: never dereferenced; these tests only compute block numbers.
        unsafe { MemRange::new(addr as *mut u8, len) }
    }

    #[test]
    fn numbering_across_ranges() {
        let b = Blocks::new(&[range(0x10000, 0x5000), range(0x40000, 0x2000)], 0x2000);
        assert_eq!(b.total(), 4);
        assert_eq!(b.locate(2), (0, 2, 0x14000, 0x1000));
        assert_eq!(b.locate(3), (1, 0, 0x40000, 0x2000));
        assert_eq!(b.block_of(0x13fff), Some(1));
        assert_eq!(b.block_of(0x41fff), Some(3));
        assert_eq!(b.block_of(0x15000), None);
        // Blocks 2 and 3 are consecutive numbers but not adjacent in memory.
        assert_eq!(
            b.spans(&[0, 1, 2, 3]),
            vec![(0x10000, 0x5000), (0x40000, 0x2000)]
        );
        assert_eq!(b.spans(&[0, 2]), vec![(0x10000, 0x2000), (0x14000, 0x1000)]);
        assert_eq!(b.run_at(1, 0x13fff, 0x1000), (0x13000, 0x1000));
        assert_eq!(b.run_at(2, 0x14abc, 0x2000), (0x14000, 0x1000));
        assert_eq!(b.run_at(3, 0x41000, 0x2000), (0x40000, 0x2000));
    }

    #[test]
    fn set_take_empties_it() {
        let s = BlockSet::new(130);
        for g in [129, 0, 64, 63, 0] {
            s.mark(g);
        }
        assert_eq!(s.take(), vec![0, 63, 64, 129]);
        assert!(s.take().is_empty());
    }
}
