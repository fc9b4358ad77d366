//! Hand-made protocol streams for hostile-input tests and fuzz seeds.
#![allow(dead_code)]

use std::io::{self, Cursor, Read, Write};

use multifd::{ChannelCount, Encoding, Hello, MainMessage, PacketHeader, Role, Run};

pub const SESSION: u64 = 0x5eed;

pub fn hello(role: Role, channel: u16, channels: u16, compression: Encoding) -> Vec<u8> {
    hello_v(
        multifd::PROTOCOL_VERSION,
        role,
        channel,
        channels,
        compression,
    )
}

pub fn hello_v(
    version: u16,
    role: Role,
    channel: u16,
    channels: u16,
    compression: Encoding,
) -> Vec<u8> {
    Hello {
        version,
        role,
        compression,
        channel,
        channels,
        session: SESSION,
        page_size: 4096,
    }
    .encode()
    .to_vec()
}

pub fn packet(
    ch: u16,
    seq: u64,
    region: u32,
    runs: &[(u64, u32)],
    enc: Encoding,
    payload: &[u8],
) -> Vec<u8> {
    let h = PacketHeader {
        channel: ch,
        sequence: seq,
        region,
        page_count: runs.iter().map(|r| r.1).sum(),
        run_count: runs.len() as u32,
        encoding: enc,
        sync: false,
        last: false,
        payload_len: payload.len() as u32,
    };
    let mut b = h.encode().to_vec();
    for &(first_page, count) in runs {
        b.extend_from_slice(&Run { first_page, count }.encode());
    }
    b.extend_from_slice(payload);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn sync(ch: u16, seq: u64) -> Vec<u8> {
    let mut b = PacketHeader::sync(ch, seq).encode().to_vec();
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// A version 2 sync packet that ends the last round.
pub fn sync_last(ch: u16, seq: u64) -> Vec<u8> {
    let mut h = PacketHeader::sync(ch, seq);
    h.last = true;
    let mut b = h.encode().to_vec();
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn round_done(counts: &[(u64, u64)]) -> Vec<u8> {
    round_done_n(0, counts)
}

pub fn round_done_n(round: u32, counts: &[(u64, u64)]) -> Vec<u8> {
    MainMessage::RoundDone {
        round,
        channels: counts
            .iter()
            .map(|&(packets, pages)| ChannelCount { packets, pages })
            .collect(),
    }
    .encode()
}

pub fn page(fill: u8) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    p[0] = fill;
    p[4095] = fill.wrapping_add(1);
    p
}

/// A valid transfer: one region of 16 pages and one of 4, two channels with
/// lz4 allowed; returns (main stream, data streams).
pub fn valid(state: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut main = hello(Role::Main, 0, 2, Encoding::Lz4);
    main.extend(MainMessage::RamLayout(vec![(0, 16 * 4096), (1 << 20, 4 * 4096)]).encode());
    main.extend(round_done(&[(2, 4), (1, 3)]));
    main.extend(MainMessage::DeviceState(state.to_vec()).encode());
    main.extend(MainMessage::End.encode());

    let mut d0 = hello(Role::Data, 0, 2, Encoding::Lz4);
    let pages: Vec<u8> = [page(1), page(2), page(3)].concat();
    d0.extend(packet(0, 0, 0, &[(0, 2), (5, 1)], Encoding::Raw, &pages));
    d0.extend(packet(0, 1, 1, &[(3, 1)], Encoding::Raw, &page(9)));
    d0.extend(sync(0, 2));

    let mut d1 = hello(Role::Data, 1, 2, Encoding::Lz4);
    let raw: Vec<u8> = [page(4), page(4), page(5)].concat();
    d1.extend(packet(
        1,
        0,
        0,
        &[(10, 2), (15, 1)],
        Encoding::Lz4,
        &lz4_flex::block::compress(&raw),
    ));
    d1.extend(sync(1, 1));
    (main, vec![d0, d1])
}

/// A valid live transfer (version 2), same layout as [`valid`]: two rounds;
/// round 1 sends region 0 page 1 again with new contents (`page(7)`).
/// Chunk 0 (region 0) is channel 0's, chunk 1 (region 1) channel 1's.
pub fn valid_live(state: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    valid_live_v(multifd::LIVE_PROTOCOL_VERSION, state)
}

/// [`valid_live`] in protocol version `v` (2 or 3: the streams from the
/// sender are the same).
pub fn valid_live_v(v: u16, state: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut main = hello_v(v, Role::Main, 0, 2, Encoding::Raw);
    main.extend(MainMessage::RamLayout(vec![(0, 16 * 4096), (1 << 20, 4 * 4096)]).encode());
    main.extend(round_done_n(0, &[(1, 2), (1, 1)]));
    main.extend(round_done_n(1, &[(2, 3), (1, 1)]));
    main.extend(MainMessage::DeviceState(state.to_vec()).encode());
    main.extend(MainMessage::End.encode());

    let mut d0 = hello_v(v, Role::Data, 0, 2, Encoding::Raw);
    let pages: Vec<u8> = [page(1), page(2)].concat();
    d0.extend(packet(0, 0, 0, &[(0, 2)], Encoding::Raw, &pages));
    d0.extend(sync(0, 1));
    d0.extend(packet(0, 1, 0, &[(1, 1)], Encoding::Raw, &page(7)));
    d0.extend(sync_last(0, 2));

    let mut d1 = hello_v(v, Role::Data, 1, 2, Encoding::Raw);
    d1.extend(packet(1, 0, 1, &[(3, 1)], Encoding::Raw, &page(9)));
    d1.extend(sync(1, 1));
    d1.extend(sync_last(1, 1));
    (main, vec![d0, d1])
}

/// The fuzz target's input format: (u32 length, bytes) records, the main
/// stream first, then the data streams.
pub fn pack(main: &[u8], data: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in std::iter::once(main).chain(data.iter().map(|d| d.as_slice())) {
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s);
    }
    b
}

/// An in-memory connection: reads from its bytes, discards what is written.
pub struct Mem(pub Cursor<Vec<u8>>);

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
