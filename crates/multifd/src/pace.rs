//! Bandwidth limits: one channel's pacing and the page-set checks shared by
//! socket rounds and file passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{MemRegion, MultifdError, PageSet};

/// The longest single sleep, so that a stop request is seen promptly.
const SLICE: Duration = Duration::from_millis(20);

/// Holds one channel to `rate` bytes per second from its start: after each
/// write it sleeps until the bytes so far are due.
pub(crate) struct Pace {
    start: Instant,
    rate: Option<u64>,
    bytes: u64,
}

impl Pace {
    /// A pacer for `rate` bytes per second (None: no limit).
    pub(crate) fn new(rate: Option<u64>) -> Pace {
        Pace {
            start: Instant::now(),
            rate: rate.filter(|r| *r > 0),
            bytes: 0,
        }
    }

    /// Counts `bytes` written and waits until they are due, or until `stop`.
    pub(crate) fn wrote(&mut self, bytes: u64, stop: &AtomicBool) {
        self.bytes += bytes;
        let Some(rate) = self.rate else {
            return;
        };
        let due = self.start + Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        while !stop.load(Ordering::Relaxed) {
            let Some(wait) = due.checked_duration_since(Instant::now()) else {
                return;
            };
            std::thread::sleep(wait.min(SLICE));
        }
    }
}

/// Each channel's share of a limit for all channels together.
pub(crate) fn per_channel(max_bytes_per_s: Option<u64>, channels: usize) -> Option<u64> {
    max_bytes_per_s
        .filter(|b| *b > 0)
        .map(|b| (b / channels.max(1) as u64).max(1))
}

/// Whether a chunk of `n` pages from `first` has a dirty page in `map`.
pub(crate) fn any_dirty(map: &[u64], first: u64, n: u64) -> bool {
    let (lo, hi) = ((first / 64) as usize, (first + n).div_ceil(64) as usize);
    map.get(lo..hi.min(map.len()))
        .is_some_and(|w| w.iter().any(|w| *w != 0))
}

/// Whether page `page`'s bit is set in `map` (a page past the map is not).
pub(crate) fn is_dirty(map: &[u64], page: u64) -> bool {
    map.get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Err unless `pages` has one bitmap per region, each covering its region.
pub(crate) fn check_page_set(
    pages: PageSet<'_>,
    regions: &[MemRegion],
    page_size: u64,
) -> Result<(), MultifdError> {
    let PageSet::Dirty(maps) = pages else {
        return Ok(());
    };
    let fits = maps.len() == regions.len()
        && maps
            .iter()
            .zip(regions)
            .all(|(m, r)| m.len() as u64 >= (r.len() / page_size).div_ceil(64));
    if fits {
        Ok(())
    } else {
        Err(MultifdError::InvalidArgument(format!(
            "{} dirty bitmaps for {} regions, or a bitmap shorter than its region",
            maps.len(),
            regions.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_dirty_looks_only_at_the_chunk_words() {
        let map = [0u64, 1 << 3, 0];
        assert!(!any_dirty(&map, 0, 64));
        assert!(any_dirty(&map, 64, 64));
        assert!(any_dirty(&map, 60, 8));
        assert!(!any_dirty(&map, 128, 64));
        // Past the end of a short map: nothing dirty, no panic.
        assert!(!any_dirty(&map, 256, 64));
        assert!(is_dirty(&map, 67) && !is_dirty(&map, 66) && !is_dirty(&map, 1000));
    }

    #[test]
    fn per_channel_splits_and_never_reaches_zero() {
        assert_eq!(per_channel(None, 4), None);
        assert_eq!(per_channel(Some(0), 4), None);
        assert_eq!(per_channel(Some(4_000_000), 4), Some(1_000_000));
        assert_eq!(per_channel(Some(3), 4), Some(1));
    }

    #[test]
    fn pace_waits_until_the_bytes_are_due() {
        let stop = AtomicBool::new(false);
        let mut p = Pace::new(Some(1_000_000));
        let t = Instant::now();
        p.wrote(50_000, &stop);
        assert!(t.elapsed() >= Duration::from_millis(45));
        let mut free = Pace::new(None);
        free.wrote(u64::MAX / 2, &stop);
    }

    #[test]
    fn pace_returns_at_once_when_stopped() {
        let stop = AtomicBool::new(true);
        let mut p = Pace::new(Some(1));
        let t = Instant::now();
        p.wrote(1_000_000, &stop);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
