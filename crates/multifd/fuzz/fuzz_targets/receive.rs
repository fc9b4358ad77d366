//! Runs the whole receiver on hostile connections: the input is a list of
//! (u32 length, bytes) records, the main connection's bytes first, then the
//! data connections'. The receiver must never panic, never hang, never
//! allocate by an unchecked number, and return Ok only for a complete,
//! consistent transfer.
//!
//! Each input is also tried with every CRC recomputed, so that mutations
//! reach the checks behind the checksums.
#![no_main]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io::{self, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use multifd::{
    parse_main_header, parse_packet_header, receive, MemRegion, HELLO_LEN, MAIN_HEADER_LEN,
    PACKET_HEADER_LEN,
};

/// Guest memory the fuzzer may ask for, in all.
const MAX_MEMORY: u64 = 4 << 20;

struct Mem(Cursor<Vec<u8>>);

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn split(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while out.len() < 9 && pos + 4 <= data.len() {
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        pos += 4;
        let end = pos.saturating_add(len).min(data.len());
        out.push(data[pos..end].to_vec());
        pos = end;
    }
    out
}

fn fix_hello(b: &mut [u8]) {
    if b.len() >= HELLO_LEN {
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
    }
}

fn fix_main(b: &mut [u8]) {
    fix_hello(b);
    let mut pos = HELLO_LEN;
    while pos < b.len() {
        let Ok(h) = parse_main_header(&b[pos..]) else {
            break;
        };
        let end = pos + MAIN_HEADER_LEN + h.len as usize;
        if b.len() < end + 4 {
            break;
        }
        let crc = crc32c::crc32c(&b[pos..end]);
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        pos = end + 4;
    }
}

fn fix_data(b: &mut [u8]) {
    fix_hello(b);
    let mut pos = HELLO_LEN;
    while pos + PACKET_HEADER_LEN <= b.len() {
        let crc = crc32c::crc32c(&b[pos..pos + 36]);
        b[pos + 36..pos + 40].copy_from_slice(&crc.to_le_bytes());
        let Ok(h) = parse_packet_header(&b[pos..]) else {
            break;
        };
        let end = pos + PACKET_HEADER_LEN + h.runs_len() + h.payload_len as usize;
        if b.len() < end + 4 {
            break;
        }
        let crc = crc32c::crc32c(&b[pos..end]);
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        pos = end + 4;
    }
}

fn run(streams: Vec<Vec<u8>>) {
    let mut conns = streams.into_iter().map(|s| Mem(Cursor::new(s)));
    let mut allocated: Vec<(*mut u8, Layout)> = Vec::new();
    let r = receive(
        &mut || {
            conns
                .next()
                .ok_or_else(|| io::Error::other("no more connections"))
        },
        &mut |layout| {
            let total = layout.iter().try_fold(0u64, |t, &(_, s)| t.checked_add(s));
            if total.is_none_or(|t| t > MAX_MEMORY) {
                return Err("too much memory".into());
            }
            let mut out = Vec::new();
            for &(g, s) in layout {
                let l = Layout::from_size_align(s as usize, 4096).map_err(|e| e.to_string())?;
                // SAFETY: s > 0 (the parser refuses empty regions).
                let p = unsafe { alloc_zeroed(l) };
                assert!(!p.is_null());
                allocated.push((p, l));
                // SAFETY: a fresh zeroed allocation of s bytes, 4096-aligned,
                // freed only after `receive` returns.
                out.push(unsafe { MemRegion::new(g, p, s) });
            }
            Ok(out)
        },
    );
    if let Ok((state, stats)) = r {
        assert!(state.len() <= multifd::MAX_DEVICE_STATE as usize);
        assert!(stats.present_pages * 4096 <= MAX_MEMORY);
    }
    for (p, l) in allocated {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(p, l) };
    }
}

fuzz_target!(|data: &[u8]| {
    let streams = split(data);
    if streams.is_empty() {
        return;
    }
    run(streams.clone());
    let mut fixed = streams.clone();
    if let Some((main, rest)) = fixed.split_first_mut() {
        fix_main(main);
        for d in rest {
            fix_data(d);
        }
    }
    if fixed != streams {
        run(fixed);
    }
});
