//! Feeds arbitrary bytes to the fixed-ram header parser: it must never
//! panic, never hang, and never allocate by an unchecked number.
//!
//! Input: a file length (u64, little-endian), then the header bytes. Each
//! input is parsed as it is, then with the header CRC recomputed and the file
//! length the header itself describes, so that mutations get past the CRC
//! and file-length checks into the layout validation.
#![no_main]

use fixed_ram::{Header, Image, HEADER_FIXED_LEN, REGION_ENTRY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (file_len, bytes) = match data.split_first_chunk::<8>() {
        Some((len, rest)) => (u64::from_le_bytes(*len), rest),
        None => (data.len() as u64, data),
    };
    check(bytes, file_len);
    check(bytes, bytes.len() as u64);
    if let Some((fixed, described_len)) = fix(bytes) {
        check(&fixed, file_len);
        check(&fixed, described_len);
    }
});

fn check(bytes: &[u8], file_len: u64) {
    let Ok(h) = Image::parse_header(bytes, file_len) else {
        return;
    };
    // A header that parses re-encodes to the same bytes and describes a file
    // of exactly `file_len` bytes with every area inside it.
    assert_eq!(h.to_bytes(), bytes[..h.encoded_len()]);
    assert_eq!(h.file_len(), file_len);
    check_areas(&h, file_len);
}

fn check_areas(h: &Header, file_len: u64) {
    for r in &h.regions {
        assert!(r.bitmap_offset + r.bitmap_len <= file_len);
        assert!(r.pages_offset + r.size <= file_len);
    }
    assert!(h.checksum_table_offset + h.checksum_table_len <= file_len);
}

/// The header with its CRC recomputed, and the file length it describes
/// (device-state offset + length), if the bytes hold a whole header.
fn fix(bytes: &[u8]) -> Option<(Vec<u8>, u64)> {
    let count = u32::from_le_bytes(bytes.get(28..32)?.try_into().ok()?) as usize;
    let len = HEADER_FIXED_LEN.checked_add(count.checked_mul(REGION_ENTRY_LEN)?)?;
    let mut b = bytes.get(..len.checked_add(4)?)?.to_vec();
    let crc = crc32c::crc32c(&b[..len]);
    b[len..].copy_from_slice(&crc.to_le_bytes());
    let dso = u64::from_le_bytes(b[32..40].try_into().ok()?);
    let dsl = u64::from_le_bytes(b[40..48].try_into().ok()?);
    Some((b, dso.wrapping_add(dsl)))
}
