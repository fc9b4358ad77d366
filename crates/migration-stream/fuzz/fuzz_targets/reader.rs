//! Feeds arbitrary bytes to the stream reader: it must never panic, never
//! hang, and never allocate much more than the input.
//!
//! Each input is read twice: as it is (exercising the header and CRC
//! checks), and with every CRC recomputed (so that mutations reach the
//! payload parsers instead of stopping at a checksum mismatch).
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_stream::{summarize, ReaderLimits, StreamReader};

fuzz_target!(|data: &[u8]| {
    run(data);
    let fixed = fix_crcs(data);
    if fixed != data {
        run(&fixed);
    }
});

fn run(data: &[u8]) {
    let _ = summarize(data);
    for limit in [u32::MAX, 64] {
        let Ok(mut r) = StreamReader::with_limits(data, ReaderLimits { max_payload: limit }) else {
            return;
        };
        let mut n = 0u64;
        loop {
            match r.next_record() {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(_) => {
                    // A failed reader stays failed.
                    assert!(r.next_record().is_err());
                    break;
                }
            }
            // Each record is at least 12 bytes.
            assert!(n <= data.len() as u64 / 12 + 1);
        }
        assert!(r.offset() <= data.len() as u64);
    }
}

/// Rewrites the header CRC and each record's CRC to match, following the
/// record lengths as far as the input goes.
fn fix_crcs(data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    if d.len() < 20 {
        return d;
    }
    let crc = crc32c::crc32c(&d[..16]);
    d[16..20].copy_from_slice(&crc.to_le_bytes());
    let mut pos = 20usize;
    while pos + 8 <= d.len() {
        let len = u32::from_le_bytes([d[pos + 4], d[pos + 5], d[pos + 6], d[pos + 7]]) as usize;
        let end = match pos.checked_add(8 + len) {
            Some(end) if end + 4 <= d.len() => end,
            _ => break,
        };
        let crc = crc32c::crc32c(&d[pos..end]);
        d[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        pos = end + 4;
    }
    d
}
