//! Feeds arbitrary bytes to the wire parsers (hello, data packet header and
//! whole packets, main-connection messages) and to the payload decoders:
//! they must never panic and never allocate by an unchecked number.
//!
//! Each input is also tried with its CRCs recomputed (as a packet and as a
//! main message) so that mutations reach the checks behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multifd::{
    decode_payload, parse_hello, parse_main_header, parse_main_message, parse_packet,
    parse_packet_header, Encoding, MAIN_HEADER_LEN, PACKET_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    run(data);
    for fixed in [fix_packet(data), fix_main(data)] {
        if fixed != data {
            run(&fixed);
        }
    }
});

fn run(data: &[u8]) {
    let _ = parse_hello(data);
    let _ = parse_packet_header(data);
    for (ps, regions) in [
        (4096, &[4u64, 256, 1 << 20][..]),
        (65536, &[1u64][..]),
        (4096, &[][..]),
    ] {
        if let Ok((p, n)) = parse_packet(data, ps, regions) {
            assert!(n <= data.len());
            assert!(p.runs.len() <= 256);
            // A whole packet always decodes into exactly its pages, or fails.
            if !p.header.sync {
                let mut out = vec![0u8; p.header.page_count as usize * ps as usize];
                let _ = decode_payload(p.header.encoding, p.payload, &mut out);
            }
        }
    }
    let mut pos = 0;
    while let Ok((_, n)) = parse_main_message(&data[pos..], 4096) {
        assert!(n >= MAIN_HEADER_LEN + 4);
        pos += n;
    }
    if data.len() > 3 {
        if let Some(enc) = Encoding::from_code(data[0] % 3) {
            let len = usize::from(u16::from_le_bytes([data[1], data[2]])) * 16;
            let mut out = vec![0u8; len];
            let _ = decode_payload(enc, &data[3..], &mut out);
        }
    }
}

/// Recomputes the header CRC (bytes 36..40, also a hello's) and the packet CRC.
fn fix_packet(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() < PACKET_HEADER_LEN {
        return b;
    }
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    if let Ok(h) = parse_packet_header(&b) {
        let end = PACKET_HEADER_LEN + h.runs_len() + h.payload_len as usize;
        if b.len() >= end + 4 {
            let crc = crc32c::crc32c(&b[..end]);
            b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    b
}

/// Recomputes the CRCs of a sequence of main messages.
fn fix_main(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let mut pos = 0;
    while let Ok(h) = parse_main_header(&b[pos..]) {
        let end = pos + MAIN_HEADER_LEN + h.len as usize;
        if b.len() < end + 4 {
            break;
        }
        let crc = crc32c::crc32c(&b[pos..end]);
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        pos = end + 4;
    }
    b
}
