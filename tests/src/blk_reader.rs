//! The test kernel's disk reader (`cryo.blk=SLOTS`, docs/test-kernel.md):
//! the disk it expects and its reports. vCPU 0 reads 4 KiB blocks of the
//! first virtio disk into a ring of slots, every pass other blocks into each
//! slot, and keeps re-verifying each slot against the block it read there:
//! a page the device wrote that a copy of guest memory missed shows up as
//! `MISMATCH blk` once the copy runs.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{num, Guest};

/// Writes the disk the reader checks: `blocks` blocks of
/// [`cryo_test_kernel::reader_block`].
pub fn write_reader_disk(path: &Path, blocks: u64) {
    cryo_test_kernel::write_reader_disk(path, blocks).expect("write the reader's disk");
}

/// One `BLK reads=.. pass=.. verified=.. errors=..` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkReport {
    /// Blocks read (and checked as they arrived).
    pub reads: u64,
    /// Passes over the slots completed.
    pub pass: u64,
    /// Slot verifications, fresh and kept.
    pub verified: u64,
    /// Verifications that failed.
    pub errors: u64,
}

impl BlkReport {
    /// Parses a report line.
    pub fn parse(line: &str) -> Option<BlkReport> {
        let rest = line.strip_prefix("BLK reads=")?;
        let line = format!("reads={rest}");
        Some(BlkReport {
            reads: num(&line, "reads")?,
            pass: num(&line, "pass")?,
            verified: num(&line, "verified")?,
            errors: num(&line, "errors")?,
        })
    }
}

/// The last report in a guest's console output so far.
pub fn last_report(g: &Guest) -> Option<BlkReport> {
    g.output().iter().rev().find_map(|l| BlkReport::parse(l))
}

/// Follows the console until a report shows at least `reads` reads and
/// `verified` verifications with no error; panics on `MISMATCH`, `ERROR`,
/// `PANIC`, a report with errors, or a timeout. Returns that report.
pub fn follow_reader(g: &mut Guest, reads: u64, verified: u64, timeout: Duration) -> BlkReport {
    let start = Instant::now();
    let mut bad = None;
    let mut last = None;
    let found = g.wait_for(timeout, |l| {
        if ["MISMATCH", "ERROR", "PANIC"]
            .iter()
            .any(|k| l.starts_with(k))
        {
            bad = Some(l.to_string());
            return true;
        }
        let Some(r) = BlkReport::parse(l) else {
            return false;
        };
        last = Some(r);
        if r.errors > 0 {
            bad = Some(l.to_string());
            return true;
        }
        r.reads >= reads && r.verified >= verified
    });
    assert!(
        bad.is_none(),
        "the disk reader failed: {}\n{}",
        bad.unwrap_or_default(),
        g.transcript()
    );
    assert!(
        found.is_some(),
        "the disk reader did not reach {reads} reads in {:?} (last report {last:?})\n{}",
        start.elapsed(),
        g.transcript()
    );
    last.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse() {
        let r = BlkReport::parse("BLK reads=12 pass=3 verified=40 errors=0").unwrap();
        assert_eq!(
            r,
            BlkReport {
                reads: 12,
                pass: 3,
                verified: 40,
                errors: 0
            }
        );
        assert!(BlkReport::parse("HB cpu=0 seq=1").is_none());
        assert!(BlkReport::parse("BLK ready slots=4 blocks=8 base=0x400000").is_none());
    }
}
