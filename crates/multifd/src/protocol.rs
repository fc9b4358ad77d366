//! The wire protocol of the socket channels (`docs/multifd-protocol.md`):
//! connection hellos, main-connection messages and data packets, with
//! encoders and hostile-input parsers.

use crate::MultifdError;

/// The magic at the start of every connection hello.
pub const HELLO_MAGIC: [u8; 8] = *b"CRYOMFD1";
/// Protocol version 1: one round (a stopped VM). [`send`](crate::send) speaks it.
pub const PROTOCOL_VERSION: u16 = 1;
/// Protocol version 2: several rounds of pages (a running VM, live
/// migration). [`LiveSender`](crate::LiveSender) speaks it; [`receive`](crate::receive)
/// reads both.
pub const LIVE_PROTOCOL_VERSION: u16 = 2;
/// Protocol version 3: version 2 plus the receiver's `ROUND_RECEIVED`
/// reports, which let the sender wait for the receiver to catch up before
/// it pauses the VM. [`LiveSender`](crate::LiveSender) speaks it, and
/// version 2 to a receiver that does not know it; [`receive`](crate::receive)
/// reads versions 1 to 3.
pub const PROGRESS_PROTOCOL_VERSION: u16 = 3;
/// Whether a transfer of protocol `version` moves a running VM in rounds
/// (versions 2 and 3).
pub(crate) fn is_live(version: u16) -> bool {
    version >= LIVE_PROTOCOL_VERSION
}

/// Length of a connection hello.
pub const HELLO_LEN: usize = 40;
/// The magic at the start of every data packet (`MFDP`).
pub const PACKET_MAGIC: u32 = u32::from_le_bytes(*b"MFDP");
/// Length of a data packet header.
pub const PACKET_HEADER_LEN: usize = 40;
/// Length of one run entry in a data packet.
pub const RUN_LEN: usize = 12;
/// Length of a main-connection message header.
pub const MAIN_HEADER_LEN: usize = 8;
/// The most data connections of one transfer.
pub const MAX_DATA_CHANNELS: u16 = 64;
/// The most pages one data packet carries.
pub const MAX_PAGES_PER_PACKET: u32 = 256;
/// The most RAM regions in a layout.
pub const MAX_REGIONS: u32 = 4096;
/// The largest device state blob.
pub const MAX_DEVICE_STATE: u32 = 64 << 20;
/// The longest error message.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// The largest main-connection message payload.
pub const MAX_MAIN_PAYLOAD: u32 = 64 << 20;
/// The smallest page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// The largest page size.
pub const MAX_PAGE_SIZE: u32 = 65536;
/// The page size senders of this version use.
pub const PAGE_SIZE: u32 = 4096;
/// The most strays (connections with another session id) a receiver skips.
pub const MAX_STRAYS: usize = 16;

/// Data packet flag: a sync packet (end of a round on a channel).
pub const FLAG_SYNC: u8 = 1;
/// Data packet flag (version 2, sync packets only): the last round.
pub const FLAG_LAST: u8 = 2;

const fn proto(msg: String) -> MultifdError {
    MultifdError::Protocol(msg)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Per-packet compression of the socket channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Pages are sent raw.
    None,
    /// zstd at the given level (1 is fast; negative levels are faster still).
    Zstd(i32),
    /// lz4 (block format).
    Lz4,
}

/// How a packet's payload (or a connection's pages) is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Raw page bytes (code 0).
    Raw,
    /// zstd (code 1).
    Zstd,
    /// lz4 block format (code 2).
    Lz4,
}

impl Encoding {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
            Encoding::Lz4 => 2,
        }
    }

    /// The encoding of a wire code.
    pub fn from_code(code: u8) -> Option<Encoding> {
        match code {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            2 => Some(Encoding::Lz4),
            _ => None,
        }
    }
}

impl From<Compression> for Encoding {
    fn from(c: Compression) -> Encoding {
        match c {
            Compression::None => Encoding::Raw,
            Compression::Zstd(_) => Encoding::Zstd,
            Compression::Lz4 => Encoding::Lz4,
        }
    }
}

/// The role of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main (control) connection.
    Main,
    /// A data connection.
    Data,
}

/// A connection hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version ([`PROTOCOL_VERSION`], [`LIVE_PROTOCOL_VERSION`]
    /// or [`PROGRESS_PROTOCOL_VERSION`]).
    pub version: u16,
    /// Main or data.
    pub role: Role,
    /// The transfer's compression.
    pub compression: Encoding,
    /// The data channel index (0 for the main connection).
    pub channel: u16,
    /// The number of data connections.
    pub channels: u16,
    /// The sender's random session id.
    pub session: u64,
    /// The page size.
    pub page_size: u32,
}

impl Hello {
    /// The 40 bytes on the wire.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = match self.role {
            Role::Main => 0,
            Role::Data => 1,
        };
        b[11] = self.compression.code();
        b[12..14].copy_from_slice(&self.channel.to_le_bytes());
        b[14..16].copy_from_slice(&self.channels.to_le_bytes());
        b[16..24].copy_from_slice(&self.session.to_le_bytes());
        b[24..28].copy_from_slice(&self.page_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

fn check_page_size(ps: u32) -> Result<(), MultifdError> {
    if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
        return Err(proto(format!(
            "page size {ps}: must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
        )));
    }
    Ok(())
}

/// Parses and checks a connection hello (its first [`HELLO_LEN`] bytes).
pub fn parse_hello(bytes: &[u8]) -> Result<Hello, MultifdError> {
    if bytes.len() < HELLO_LEN {
        return Err(proto(format!(
            "hello too short: {} bytes, expected {HELLO_LEN}",
            bytes.len()
        )));
    }
    let b = &bytes[..HELLO_LEN];
    if b[0..8] != HELLO_MAGIC {
        return Err(proto(format!(
            "not a multifd connection: the first 8 bytes are {:02x?}, expected \"CRYOMFD1\"",
            &b[0..8]
        )));
    }
    let version = u16_at(b, 8);
    if !(PROTOCOL_VERSION..=PROGRESS_PROTOCOL_VERSION).contains(&version) {
        return Err(proto(format!(
            "multifd protocol version {version} is not supported: this cryo speaks versions {PROTOCOL_VERSION} to {PROGRESS_PROTOCOL_VERSION}"
        )));
    }
    let stored = u32_at(b, 36);
    let computed = crc32c::crc32c(&b[..36]);
    if stored != computed {
        return Err(MultifdError::Checksum(format!(
            "connection hello: stored {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let role = match b[10] {
        0 => Role::Main,
        1 => Role::Data,
        r => return Err(proto(format!("hello: unknown role {r}"))),
    };
    let compression = Encoding::from_code(b[11])
        .ok_or_else(|| proto(format!("hello: unknown compression {}", b[11])))?;
    let channel = u16_at(b, 12);
    let channels = u16_at(b, 14);
    let session = u64_at(b, 16);
    let page_size = u32_at(b, 24);
    if u32_at(b, 28) != 0 || u32_at(b, 32) != 0 {
        return Err(proto("hello: reserved flags or bytes are set".into()));
    }
    if channels == 0 || channels > MAX_DATA_CHANNELS {
        return Err(proto(format!(
            "hello: {channels} data channels, must be 1 to {MAX_DATA_CHANNELS}"
        )));
    }
    match role {
        Role::Main if channel != 0 => {
            return Err(proto(format!(
                "hello: main connection with channel index {channel}"
            )))
        }
        Role::Data if channel >= channels => {
            return Err(proto(format!(
                "hello: data channel index {channel} out of range (channel count {channels})"
            )))
        }
        _ => {}
    }
    check_page_size(page_size)?;
    Ok(Hello {
        version,
        role,
        compression,
        channel,
        channels,
        session,
        page_size,
    })
}

/// Per data channel counts in a `ROUND_DONE` message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelCount {
    /// Data packets sent (sync packets not counted).
    pub packets: u64,
    /// Pages sent.
    pub pages: u64,
}

/// A main-connection message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MainMessage {
    /// The RAM layout: (guest address, size) per region.
    RamLayout(Vec<(u64, u64)>),
    /// The receiver has allocated the memory and waits for data connections.
    Ready,
    /// All data channels finished a round.
    RoundDone {
        /// The round number (0 in version 1).
        round: u32,
        /// Counts per data channel.
        channels: Vec<ChannelCount>,
    },
    /// The device state blob.
    DeviceState(Vec<u8>),
    /// The sender has sent everything.
    End,
    /// The receiver loaded everything.
    Ack,
    /// Version 3: the receiver has every page of rounds up to this one in
    /// its memory.
    RoundReceived {
        /// The round number.
        round: u32,
    },
    /// The peer gave up.
    Error(String),
}

const T_RAM_LAYOUT: u16 = 1;
const T_READY: u16 = 2;
const T_ROUND_DONE: u16 = 3;
const T_DEVICE_STATE: u16 = 4;
const T_END: u16 = 5;
const T_ACK: u16 = 6;
const T_ERROR: u16 = 7;
const T_ROUND_RECEIVED: u16 = 8;

impl MainMessage {
    fn type_code(&self) -> u16 {
        match self {
            MainMessage::RamLayout(_) => T_RAM_LAYOUT,
            MainMessage::Ready => T_READY,
            MainMessage::RoundDone { .. } => T_ROUND_DONE,
            MainMessage::DeviceState(_) => T_DEVICE_STATE,
            MainMessage::End => T_END,
            MainMessage::Ack => T_ACK,
            MainMessage::Error(_) => T_ERROR,
            MainMessage::RoundReceived { .. } => T_ROUND_RECEIVED,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        type_name(self.type_code())
    }

    /// The bytes on the wire (header, payload, CRC). Error messages are cut
    /// to [`MAX_ERROR_MESSAGE`] bytes (at a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            MainMessage::RamLayout(regions) => {
                p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for (a, s) in regions {
                    p.extend_from_slice(&a.to_le_bytes());
                    p.extend_from_slice(&s.to_le_bytes());
                }
            }
            MainMessage::RoundDone { round, channels } => {
                p.extend_from_slice(&round.to_le_bytes());
                p.extend_from_slice(&(channels.len() as u16).to_le_bytes());
                p.extend_from_slice(&0u16.to_le_bytes());
                for c in channels {
                    p.extend_from_slice(&c.packets.to_le_bytes());
                    p.extend_from_slice(&c.pages.to_le_bytes());
                }
            }
            MainMessage::DeviceState(d) => p.extend_from_slice(d),
            MainMessage::RoundReceived { round } => p.extend_from_slice(&round.to_le_bytes()),
            MainMessage::Error(m) => {
                let mut end = m.len().min(MAX_ERROR_MESSAGE);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                let m = if end == 0 { "error" } else { &m[..end] };
                p.extend_from_slice(m.as_bytes());
            }
            MainMessage::Ready | MainMessage::End | MainMessage::Ack => {}
        }
        let mut b = Vec::with_capacity(MAIN_HEADER_LEN + p.len() + 4);
        b.extend_from_slice(&self.type_code().to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(&p);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }
}

fn type_name(t: u16) -> &'static str {
    match t {
        T_RAM_LAYOUT => "RAM_LAYOUT",
        T_READY => "READY",
        T_ROUND_DONE => "ROUND_DONE",
        T_DEVICE_STATE => "DEVICE_STATE",
        T_END => "END",
        T_ACK => "ACK",
        T_ERROR => "ERROR",
        T_ROUND_RECEIVED => "ROUND_RECEIVED",
        _ => "unknown",
    }
}

/// A checked main-message header: its type and payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MainHeader {
    /// The message type code.
    pub kind: u16,
    /// The payload length (within the type's bound).
    pub len: u32,
}

/// Parses a main-message header (the first [`MAIN_HEADER_LEN`] bytes):
/// known type, zero flags, payload length within the type's bound.
pub fn parse_main_header(bytes: &[u8]) -> Result<MainHeader, MultifdError> {
    if bytes.len() < MAIN_HEADER_LEN {
        return Err(proto(format!(
            "main message header too short: {} bytes",
            bytes.len()
        )));
    }
    let kind = u16_at(bytes, 0);
    let flags = u16_at(bytes, 2);
    let len = u32_at(bytes, 4);
    let (min, max) = match kind {
        T_RAM_LAYOUT => (4 + 16, 4 + 16 * MAX_REGIONS),
        T_READY | T_END | T_ACK => (0, 0),
        T_ROUND_DONE => (8 + 16, 8 + 16 * u32::from(MAX_DATA_CHANNELS)),
        T_DEVICE_STATE => (0, MAX_DEVICE_STATE),
        T_ERROR => (1, MAX_ERROR_MESSAGE as u32),
        T_ROUND_RECEIVED => (4, 4),
        _ => return Err(proto(format!("unknown main message type {kind}"))),
    };
    if flags != 0 {
        return Err(proto(format!(
            "{} message with reserved flags {flags:#x}",
            type_name(kind)
        )));
    }
    if len < min || len > max.min(MAX_MAIN_PAYLOAD) {
        return Err(proto(format!(
            "{} message with payload length {len}, allowed {min} to {max}",
            type_name(kind)
        )));
    }
    Ok(MainHeader { kind, len })
}

/// Decodes the payload of a main message whose header (`h`) and CRC were checked.
pub fn decode_main_payload(
    h: MainHeader,
    p: &[u8],
    page_size: u32,
) -> Result<MainMessage, MultifdError> {
    if p.len() != h.len as usize {
        return Err(proto(format!(
            "{} message: payload of {} bytes, header says {}",
            type_name(h.kind),
            p.len(),
            h.len
        )));
    }
    Ok(match h.kind {
        T_RAM_LAYOUT => {
            let count = u32_at(p, 0);
            if count == 0 || count > MAX_REGIONS || p.len() != 4 + 16 * count as usize {
                return Err(proto(format!(
                    "RAM_LAYOUT: {count} regions in {} bytes (at most {MAX_REGIONS} regions, 16 bytes each)",
                    p.len()
                )));
            }
            let ps = u64::from(page_size);
            let mut regions = Vec::with_capacity(count as usize);
            for i in 0..count as usize {
                let a = u64_at(p, 4 + 16 * i);
                let s = u64_at(p, 12 + 16 * i);
                if s == 0
                    || !s.is_multiple_of(ps)
                    || !a.is_multiple_of(ps)
                    || a.checked_add(s).is_none()
                {
                    return Err(proto(format!(
                        "RAM_LAYOUT: region {i} (guest {a:#x}, {s:#x} bytes) is empty, not aligned to the page size {ps} or overflows"
                    )));
                }
                regions.push((a, s));
            }
            MainMessage::RamLayout(regions)
        }
        T_READY => MainMessage::Ready,
        T_END => MainMessage::End,
        T_ACK => MainMessage::Ack,
        T_ROUND_DONE => {
            let round = u32_at(p, 0);
            let count = u16_at(p, 4);
            if u16_at(p, 6) != 0 {
                return Err(proto("ROUND_DONE: reserved bytes are set".into()));
            }
            if count == 0 || count > MAX_DATA_CHANNELS || p.len() != 8 + 16 * count as usize {
                return Err(proto(format!(
                    "ROUND_DONE: {count} channels in {} bytes",
                    p.len()
                )));
            }
            let channels = (0..count as usize)
                .map(|i| ChannelCount {
                    packets: u64_at(p, 8 + 16 * i),
                    pages: u64_at(p, 16 + 16 * i),
                })
                .collect();
            MainMessage::RoundDone { round, channels }
        }
        T_DEVICE_STATE => MainMessage::DeviceState(p.to_vec()),
        T_ERROR => MainMessage::Error(String::from_utf8_lossy(p).into_owned()),
        T_ROUND_RECEIVED => MainMessage::RoundReceived {
            round: u32_at(p, 0),
        },
        _ => return Err(proto(format!("unknown main message type {}", h.kind))),
    })
}

/// Checks a main message's CRC: `header` is its 8 header bytes, `payload`
/// its payload, `stored` the CRC read after it.
pub fn check_main_crc(header: &[u8], payload: &[u8], stored: u32) -> Result<(), MultifdError> {
    let computed = crc32c::crc32c_append(crc32c::crc32c(header), payload);
    if stored != computed {
        return Err(MultifdError::Checksum(format!(
            "{} message on the main connection: stored {stored:#010x}, computed {computed:#010x}",
            type_name(u16_at(header, 0))
        )));
    }
    Ok(())
}

/// Parses one complete main message at the start of `bytes`; returns it and
/// the number of bytes it took. `page_size` checks a RAM layout.
pub fn parse_main_message(
    bytes: &[u8],
    page_size: u32,
) -> Result<(MainMessage, usize), MultifdError> {
    let h = parse_main_header(bytes)?;
    let end = MAIN_HEADER_LEN + h.len as usize;
    if bytes.len() < end + 4 {
        return Err(proto(format!(
            "{} message truncated: {} bytes of {}",
            type_name(h.kind),
            bytes.len(),
            end + 4
        )));
    }
    check_main_crc(
        &bytes[..MAIN_HEADER_LEN],
        &bytes[MAIN_HEADER_LEN..end],
        u32_at(bytes, end),
    )?;
    let m = decode_main_payload(h, &bytes[MAIN_HEADER_LEN..end], page_size)?;
    Ok((m, end + 4))
}

/// A data packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// The channel index.
    pub channel: u16,
    /// The packet's sequence number on its channel.
    pub sequence: u64,
    /// The region number.
    pub region: u32,
    /// Pages carried.
    pub page_count: u32,
    /// Runs in the run list.
    pub run_count: u32,
    /// The payload's encoding.
    pub encoding: Encoding,
    /// A sync packet (end of the round on this channel).
    pub sync: bool,
    /// On a sync packet of a version 2 transfer: the round it ends is the last.
    pub last: bool,
    /// Payload bytes on the wire.
    pub payload_len: u32,
}

impl PacketHeader {
    /// A sync packet header.
    pub fn sync(channel: u16, sequence: u64) -> PacketHeader {
        PacketHeader {
            channel,
            sequence,
            region: 0,
            page_count: 0,
            run_count: 0,
            encoding: Encoding::Raw,
            sync: true,
            last: false,
            payload_len: 0,
        }
    }

    /// The 40 bytes on the wire (with the header CRC).
    pub fn encode(&self) -> [u8; PACKET_HEADER_LEN] {
        let mut b = [0u8; PACKET_HEADER_LEN];
        b[0..4].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.channel.to_le_bytes());
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..20].copy_from_slice(&self.region.to_le_bytes());
        b[20..24].copy_from_slice(&self.page_count.to_le_bytes());
        b[24..28].copy_from_slice(&self.run_count.to_le_bytes());
        b[28] = self.encoding.code();
        b[29] = if self.sync { FLAG_SYNC } else { 0 } | if self.last { FLAG_LAST } else { 0 };
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Bytes of the run list.
    pub fn runs_len(&self) -> usize {
        self.run_count as usize * RUN_LEN
    }

    /// Checks the payload length against the page size: exactly the pages
    /// for a raw packet, less than that (and not 0) for a compressed one.
    pub fn check_payload(&self, page_size: u32) -> Result<(), MultifdError> {
        let raw = u64::from(self.page_count) * u64::from(page_size);
        let len = u64::from(self.payload_len);
        let ok = match self.encoding {
            Encoding::Raw => len == raw,
            Encoding::Zstd | Encoding::Lz4 => len >= 1 && len < raw,
        };
        if !ok {
            return Err(proto(format!(
                "data channel {} packet {}: payload length {len} for {} pages of {page_size} bytes ({:?})",
                self.channel, self.sequence, self.page_count, self.encoding
            )));
        }
        Ok(())
    }
}

/// Parses and checks a data packet header (its first [`PACKET_HEADER_LEN`]
/// bytes): CRC, magic, version, flags, counts and (without the page size)
/// lengths. [`PacketHeader::check_payload`] checks the payload length
/// against the page size.
pub fn parse_packet_header(bytes: &[u8]) -> Result<PacketHeader, MultifdError> {
    if bytes.len() < PACKET_HEADER_LEN {
        return Err(proto(format!(
            "packet header too short: {} bytes, expected {PACKET_HEADER_LEN}",
            bytes.len()
        )));
    }
    let b = &bytes[..PACKET_HEADER_LEN];
    let magic = u32_at(b, 0);
    if magic != PACKET_MAGIC {
        return Err(proto(format!(
            "not a data packet: magic {magic:#010x}, expected {PACKET_MAGIC:#010x} (\"MFDP\")"
        )));
    }
    let stored = u32_at(b, 36);
    let computed = crc32c::crc32c(&b[..36]);
    if stored != computed {
        return Err(MultifdError::Checksum(format!(
            "data packet header: stored {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let version = u16_at(b, 4);
    if version != PROTOCOL_VERSION {
        return Err(proto(format!(
            "data packet version {version}, expected {PROTOCOL_VERSION}"
        )));
    }
    let h = PacketHeader {
        channel: u16_at(b, 6),
        sequence: u64_at(b, 8),
        region: u32_at(b, 16),
        page_count: u32_at(b, 20),
        run_count: u32_at(b, 24),
        encoding: Encoding::from_code(b[28])
            .ok_or_else(|| proto(format!("data packet: unknown encoding {}", b[28])))?,
        sync: b[29] & FLAG_SYNC != 0,
        last: b[29] & FLAG_LAST != 0,
        payload_len: u32_at(b, 32),
    };
    let what = || format!("data channel {} packet {}", h.channel, h.sequence);
    if b[29] & !(FLAG_SYNC | FLAG_LAST) != 0 || u16_at(b, 30) != 0 || (h.last && !h.sync) {
        return Err(proto(format!(
            "{}: reserved flags or bytes are set",
            what()
        )));
    }
    if h.sync {
        if h.region != 0
            || h.page_count != 0
            || h.run_count != 0
            || h.encoding != Encoding::Raw
            || h.payload_len != 0
        {
            return Err(proto(format!("{}: a sync packet with contents", what())));
        }
        return Ok(h);
    }
    if h.page_count == 0 || h.page_count > MAX_PAGES_PER_PACKET {
        return Err(proto(format!(
            "{}: {} pages, must be 1 to {MAX_PAGES_PER_PACKET}",
            what(),
            h.page_count
        )));
    }
    if h.run_count == 0 || h.run_count > h.page_count {
        return Err(proto(format!(
            "{}: {} runs for {} pages",
            what(),
            h.run_count,
            h.page_count
        )));
    }
    if h.payload_len == 0
        || u64::from(h.payload_len) > u64::from(h.page_count) * u64::from(MAX_PAGE_SIZE)
    {
        return Err(proto(format!(
            "{}: payload length {}",
            what(),
            h.payload_len
        )));
    }
    Ok(h)
}

/// A run of pages in a data packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The first page (index within the region).
    pub first_page: u64,
    /// Pages in the run (at least 1).
    pub count: u32,
}

impl Run {
    /// The 12 bytes on the wire.
    pub fn encode(&self) -> [u8; RUN_LEN] {
        let mut b = [0u8; RUN_LEN];
        b[0..8].copy_from_slice(&self.first_page.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b
    }
}

/// Parses and checks the run list of a packet with header `h` into `out`:
/// `h.run_count` runs, sorted, not overlapping, adding up to `h.page_count`,
/// inside a region of `region_pages` pages.
pub fn parse_runs_into(
    h: &PacketHeader,
    bytes: &[u8],
    region_pages: u64,
    out: &mut Vec<Run>,
) -> Result<(), MultifdError> {
    out.clear();
    if bytes.len() < h.runs_len() {
        return Err(proto(format!(
            "data channel {} packet {}: run list truncated",
            h.channel, h.sequence
        )));
    }
    let mut next = 0u64;
    let mut total = 0u64;
    for i in 0..h.run_count as usize {
        let first_page = u64_at(bytes, i * RUN_LEN);
        let count = u32_at(bytes, i * RUN_LEN + 8);
        let end = first_page.checked_add(u64::from(count));
        if count == 0 || first_page < next || end.is_none_or(|e| e > region_pages) {
            return Err(proto(format!(
                "data channel {} packet {} (region {}): run {i} (pages {first_page}+{count}) is empty, out of order or outside the region's {region_pages} pages",
                h.channel, h.sequence, h.region
            )));
        }
        next = end.unwrap_or(u64::MAX);
        total += u64::from(count);
        out.push(Run { first_page, count });
    }
    if total != u64::from(h.page_count) {
        return Err(proto(format!(
            "data channel {} packet {}: runs add up to {total} pages, the header says {}",
            h.channel, h.sequence, h.page_count
        )));
    }
    Ok(())
}

/// Decodes a packet payload into `out`, which must come out exactly full.
pub fn decode_payload(
    encoding: Encoding,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), MultifdError> {
    let n = match encoding {
        Encoding::Raw => {
            if payload.len() == out.len() {
                out.copy_from_slice(payload);
            }
            payload.len()
        }
        Encoding::Zstd => zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(payload, out))
            .map_err(|e| proto(format!("zstd payload does not decode: {e}")))?,
        Encoding::Lz4 => lz4_flex::block::decompress_into(payload, out)
            .map_err(|e| proto(format!("lz4 payload does not decode: {e}")))?,
    };
    if n != out.len() {
        return Err(proto(format!(
            "{encoding:?} payload decodes to {n} bytes, expected {}",
            out.len()
        )));
    }
    Ok(())
}

/// A whole data packet parsed from memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The header.
    pub header: PacketHeader,
    /// The runs (empty for a sync packet).
    pub runs: Vec<Run>,
    /// The payload as sent.
    pub payload: &'a [u8],
}

/// Parses and checks one complete data packet at the start of `bytes`
/// (header, runs against `region_pages[header.region]`, payload length,
/// packet CRC); returns it and the number of bytes it took.
pub fn parse_packet<'a>(
    bytes: &'a [u8],
    page_size: u32,
    region_pages: &[u64],
) -> Result<(Packet<'a>, usize), MultifdError> {
    check_page_size(page_size)?;
    let header = parse_packet_header(bytes)?;
    let mut runs = Vec::new();
    let mut pos = PACKET_HEADER_LEN;
    if !header.sync {
        header.check_payload(page_size)?;
        let pages = *region_pages.get(header.region as usize).ok_or_else(|| {
            proto(format!(
                "data channel {} packet {}: region {} does not exist ({} regions)",
                header.channel,
                header.sequence,
                header.region,
                region_pages.len()
            ))
        })?;
        parse_runs_into(&header, &bytes[pos..], pages, &mut runs)?;
        pos += header.runs_len();
    }
    let end = pos + header.payload_len as usize;
    if bytes.len() < end + 4 {
        return Err(proto(format!(
            "data channel {} packet {} truncated",
            header.channel, header.sequence
        )));
    }
    let stored = u32_at(bytes, end);
    let computed = crc32c::crc32c(&bytes[..end]);
    if stored != computed {
        return Err(MultifdError::Checksum(format!(
            "data channel {} packet {}: stored {stored:#010x}, computed {computed:#010x}",
            header.channel, header.sequence
        )));
    }
    Ok((
        Packet {
            header,
            runs,
            payload: &bytes[pos..end],
        },
        end + 4,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role: Role::Data,
            compression: Encoding::Lz4,
            channel: 3,
            channels: 4,
            session: 0x1234_5678_9abc_def0,
            page_size: 4096,
        }
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn hello_round_trip_and_checks() {
        let h = hello();
        let b = h.encode();
        assert_eq!(&b[..8], b"CRYOMFD1");
        assert_eq!(parse_hello(&b).unwrap(), h);
        assert!(parse_hello(&b[..39]).is_err());
        // Every single-bit flip is caught.
        for i in 0..HELLO_LEN * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert!(parse_hello(&c).is_err(), "bit {i}");
        }
        let mut v = b;
        v[8] = 4;
        let e = parse_hello(&v).unwrap_err().to_string();
        assert!(e.contains("version 4"), "{e}");
        let live = Hello {
            version: LIVE_PROTOCOL_VERSION,
            ..h
        };
        assert_eq!(parse_hello(&live.encode()).unwrap(), live);
        let progress = Hello {
            version: PROGRESS_PROTOCOL_VERSION,
            ..h
        };
        assert_eq!(parse_hello(&progress.encode()).unwrap(), progress);
        for bad in [
            Hello { channel: 4, ..h },
            Hello { channels: 0, ..h },
            Hello {
                channels: 65,
                channel: 0,
                ..h
            },
            Hello {
                page_size: 8192 + 4096,
                ..h
            },
            Hello {
                page_size: 1 << 17,
                ..h
            },
            Hello {
                role: Role::Main,
                ..h
            },
        ] {
            assert!(parse_hello(&bad.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn main_messages_round_trip() {
        let msgs = [
            MainMessage::RamLayout(vec![(0, 1 << 20), (1 << 32, 4096)]),
            MainMessage::Ready,
            MainMessage::RoundDone {
                round: 0,
                channels: vec![
                    ChannelCount {
                        packets: 1,
                        pages: 2,
                    },
                    ChannelCount {
                        packets: 3,
                        pages: 4,
                    },
                ],
            },
            MainMessage::DeviceState(vec![1, 2, 3]),
            MainMessage::DeviceState(vec![]),
            MainMessage::End,
            MainMessage::Ack,
            MainMessage::Error("boom".into()),
            MainMessage::RoundReceived { round: 7 },
        ];
        let mut all = Vec::new();
        for m in &msgs {
            let b = m.encode();
            let (p, n) = parse_main_message(&b, 4096).unwrap();
            assert_eq!((&p, n), (m, b.len()));
            assert!(parse_main_message(&b[..b.len() - 1], 4096).is_err());
            let mut c = b.clone();
            let last = c.len() - 1;
            c[last] ^= 1;
            assert!(matches!(
                parse_main_message(&c, 4096),
                Err(MultifdError::Checksum(_))
            ));
            all.extend_from_slice(&b);
        }
        let mut pos = 0;
        for m in &msgs {
            let (p, n) = parse_main_message(&all[pos..], 4096).unwrap();
            assert_eq!(&p, m);
            pos += n;
        }
        // A long error message is cut at a character boundary.
        let long = "é".repeat(3000);
        let (p, _) = parse_main_message(&MainMessage::Error(long).encode(), 4096).unwrap();
        assert!(
            matches!(p, MainMessage::Error(m) if m.len() <= MAX_ERROR_MESSAGE && m.starts_with('é'))
        );
    }

    #[test]
    fn main_message_bounds() {
        for bad in [
            MainMessage::RamLayout(vec![]),
            MainMessage::RamLayout(vec![(0, 4097)]),
            MainMessage::RamLayout(vec![(100, 4096)]),
            MainMessage::RamLayout(vec![(u64::MAX - 4095, 8192)]),
            MainMessage::RoundDone {
                round: 0,
                channels: vec![],
            },
        ] {
            assert!(parse_main_message(&bad.encode(), 4096).is_err(), "{bad:?}");
        }
        // Lengths over the type's bound are refused from the header alone.
        let mut h = [0u8; 8];
        h[0] = 4; // DEVICE_STATE
        h[4..8].copy_from_slice(&(MAX_DEVICE_STATE + 1).to_le_bytes());
        assert!(parse_main_header(&h).is_err());
        h[0] = 2; // READY with a payload
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_main_header(&h).is_err());
        h[0] = 8; // ROUND_RECEIVED with 1 byte instead of 4
        assert!(parse_main_header(&h).is_err());
        h[0] = 99;
        assert!(parse_main_header(&h).is_err());
    }

    fn packet(runs: &[Run], enc: Encoding, payload: &[u8]) -> Vec<u8> {
        let h = PacketHeader {
            channel: 1,
            sequence: 7,
            region: 1,
            page_count: runs.iter().map(|r| r.count).sum(),
            run_count: runs.len() as u32,
            encoding: enc,
            sync: false,
            last: false,
            payload_len: payload.len() as u32,
        };
        let mut b = h.encode().to_vec();
        for r in runs {
            b.extend_from_slice(&r.encode());
        }
        b.extend_from_slice(payload);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn packets_round_trip_and_checks() {
        let runs = [
            Run {
                first_page: 2,
                count: 2,
            },
            Run {
                first_page: 6,
                count: 1,
            },
        ];
        let payload = vec![0xab; 3 * 4096];
        let b = packet(&runs, Encoding::Raw, &payload);
        let (p, n) = parse_packet(&b, 4096, &[1, 8]).unwrap();
        assert_eq!(n, b.len());
        assert_eq!(p.runs, runs);
        assert_eq!(p.payload, &payload[..]);
        // Region too small, region missing, truncated, CRC.
        assert!(parse_packet(&b, 4096, &[1, 6]).is_err());
        assert!(parse_packet(&b, 4096, &[1]).is_err());
        assert!(parse_packet(&b[..b.len() - 1], 4096, &[1, 8]).is_err());
        let mut c = b.clone();
        c[100] ^= 1;
        assert!(matches!(
            parse_packet(&c, 4096, &[1, 8]),
            Err(MultifdError::Checksum(_))
        ));
        // Overlapping and unsorted runs; counts that do not add up.
        for bad in [
            vec![
                Run {
                    first_page: 2,
                    count: 2,
                },
                Run {
                    first_page: 3,
                    count: 1,
                },
            ],
            vec![
                Run {
                    first_page: 6,
                    count: 1,
                },
                Run {
                    first_page: 2,
                    count: 2,
                },
            ],
            vec![
                Run {
                    first_page: 2,
                    count: 0,
                },
                Run {
                    first_page: 3,
                    count: 3,
                },
            ],
        ] {
            let b = packet(&bad, Encoding::Raw, &payload);
            assert!(parse_packet(&b, 4096, &[1, 8]).is_err(), "{bad:?}");
        }
        // Raw payload of the wrong size; compressed payload not smaller.
        assert!(parse_packet(&packet(&runs, Encoding::Raw, &payload[1..]), 4096, &[1, 8]).is_err());
        assert!(parse_packet(&packet(&runs, Encoding::Lz4, &payload), 4096, &[1, 8]).is_err());
        // Sync packets.
        let mut s = PacketHeader::sync(2, 9).encode().to_vec();
        let crc = crc32c::crc32c(&s);
        s.extend_from_slice(&crc.to_le_bytes());
        let (p, n) = parse_packet(&s, 4096, &[]).unwrap();
        assert!(p.header.sync && n == 44 && p.header.sequence == 9);
        let mut bad = PacketHeader::sync(2, 9);
        bad.page_count = 1;
        assert!(parse_packet_header(&bad.encode()).is_err());
    }

    #[test]
    fn decode_payloads() {
        let mut data = vec![0u8; 8192];
        data[5] = 1;
        data[5000] = 9;
        let z = zstd::bulk::compress(&data, 1).unwrap();
        let l = lz4_flex::block::compress(&data);
        let mut out = vec![0u8; 8192];
        decode_payload(Encoding::Zstd, &z, &mut out).unwrap();
        assert_eq!(out, data);
        out.fill(0);
        decode_payload(Encoding::Lz4, &l, &mut out).unwrap();
        assert_eq!(out, data);
        // Wrong sizes and garbage are errors, never panics.
        let mut small = vec![0u8; 4096];
        assert!(decode_payload(Encoding::Zstd, &z, &mut small).is_err());
        assert!(decode_payload(Encoding::Lz4, &l, &mut small).is_err());
        let mut big = vec![0u8; 12288];
        assert!(decode_payload(Encoding::Zstd, &z, &mut big).is_err());
        assert!(decode_payload(Encoding::Lz4, &l, &mut big).is_err());
        assert!(decode_payload(Encoding::Lz4, &[0xff; 100], &mut out).is_err());
        assert!(decode_payload(Encoding::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 0, 0], &mut out).is_err());
    }
}
