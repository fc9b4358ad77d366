//! Socket channels: a stopped VM's memory and device state between two
//! processes, over a main connection and N data connections
//! (`docs/multifd-protocol.md`).

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{
    decode_main_payload, decode_payload, is_live, parse_hello, parse_main_header,
    parse_packet_header, parse_runs_into, ChannelCount, Compression, Encoding, Hello, MainMessage,
    PacketHeader, Role, Run, HELLO_LEN, MAIN_HEADER_LEN, MAX_DATA_CHANNELS, MAX_DEVICE_STATE,
    MAX_PAGES_PER_PACKET, MAX_REGIONS, MAX_STRAYS, PACKET_HEADER_LEN, PAGE_SIZE,
    PROGRESS_PROTOCOL_VERSION, PROTOCOL_VERSION, RUN_LEN,
};
use crate::unpopulated::Unpopulated;
use crate::{sys, CallerError, Channel, MemRegion, MultifdError, TransferStats};
use page_runs::FirstError;

/// Options for [`send`].
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// Number of data connections (1 to 64).
    pub channels: usize,
    /// Per-packet compression.
    pub compression: Compression,
}

/// First-error-wins bookkeeping shared by the threads of one side.
pub(crate) type Fail = FirstError<MultifdError>;

/// Maps an I/O error on a connection: a closed or reset connection becomes
/// [`MultifdError::PeerDisconnected`].
pub(crate) fn conn_err(channel: Channel, during: impl Into<String>, e: io::Error) -> MultifdError {
    use io::ErrorKind::*;
    let during = during.into();
    match e.kind() {
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected => {
            let why = if e.kind() == UnexpectedEof {
                "end of stream".to_string()
            } else {
                e.to_string()
            };
            MultifdError::PeerDisconnected {
                channel,
                during: format!("{during} ({why})"),
            }
        }
        _ => MultifdError::io(format!("{channel}: {during}"), e),
    }
}

pub(crate) fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one main message (header, payload, CRC). Returns it and its size on the wire.
pub(crate) fn read_main<R: Read + ?Sized>(
    r: &mut R,
    page_size: u32,
    during: &str,
) -> Result<(MainMessage, u64), MultifdError> {
    let err = |e| conn_err(Channel::Main, during, e);
    let mut hb = [0u8; MAIN_HEADER_LEN];
    r.read_exact(&mut hb).map_err(err)?;
    let h = parse_main_header(&hb)?;
    // Read incrementally: the buffer grows as bytes arrive, never by the
    // announced length alone.
    let mut payload = Vec::new();
    r.take(u64::from(h.len))
        .read_to_end(&mut payload)
        .map_err(err)?;
    if payload.len() != h.len as usize {
        return Err(err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed inside a message",
        )));
    }
    let mut cb = [0u8; 4];
    r.read_exact(&mut cb).map_err(err)?;
    crate::protocol::check_main_crc(&hb, &payload, u32::from_le_bytes(cb))?;
    let m = decode_main_payload(h, &payload, page_size)?;
    Ok((m, (MAIN_HEADER_LEN + payload.len() + 4) as u64))
}

pub(crate) fn write_main<W: Write + ?Sized>(
    w: &mut W,
    m: &MainMessage,
    during: &str,
) -> Result<u64, MultifdError> {
    let b = m.encode();
    w.write_all(&b)
        .and_then(|_| w.flush())
        .map_err(|e| conn_err(Channel::Main, during, e))?;
    Ok(b.len() as u64)
}

/// Best effort: tells the peer why this side gives up.
pub(crate) fn send_error<W: Write + ?Sized>(w: &mut W, e: &MultifdError) {
    let _ = write_main(w, &MainMessage::Error(e.to_string()), "sending an error");
}

/// Chunks of guest RAM of one packet each: `MAX_PAGES_PER_PACKET` pages of one region.
pub(crate) struct Chunks {
    /// Index of the first chunk of each region, plus the total.
    start: Vec<u64>,
}

impl Chunks {
    pub(crate) fn new(pages: &[u64]) -> Chunks {
        let mut start = Vec::with_capacity(pages.len() + 1);
        let mut t = 0;
        for p in pages {
            start.push(t);
            t += p.div_ceil(u64::from(MAX_PAGES_PER_PACKET));
        }
        start.push(t);
        Chunks { start }
    }

    pub(crate) fn total(&self) -> u64 {
        self.start.last().copied().unwrap_or(0)
    }

    /// Chunk `idx` as (region, first page).
    pub(crate) fn get(&self, idx: u64) -> (usize, u64) {
        let r = self.start.partition_point(|&s| s <= idx) - 1;
        (r, (idx - self.start[r]) * u64::from(MAX_PAGES_PER_PACKET))
    }

    /// The chunk holding page `page` of region `region`.
    pub(crate) fn index_of(&self, region: usize, page: u64) -> u64 {
        self.start[region] + page / u64::from(MAX_PAGES_PER_PACKET)
    }
}

/// Sends `regions` and `device_state` to a receiver.
///
/// `connect` makes a new connection to the receiver; it is called
/// `opts.channels + 1` times, the main connection first. Zero pages are not
/// sent (the receiver's memory is fresh and zero). The transfer is done only
/// when the receiver acknowledges that it loaded everything: any other
/// outcome (an error, the peer gone before its ACK) is an error, and the
/// caller keeps its VM. The memory must not change during the transfer (a
/// stopped VM).
pub fn send<S: Read + Write + Send>(
    connect: &mut dyn FnMut() -> io::Result<S>,
    regions: &[MemRegion],
    device_state: &[u8],
    opts: &SocketOptions,
) -> Result<TransferStats, MultifdError> {
    let start = Instant::now();
    check_send_args(regions, device_state, opts)?;
    let n = opts.channels;
    let ps = u64::from(PAGE_SIZE);
    let Session {
        mut main,
        conns,
        wire: opened,
    } = open_session(connect, regions, opts, PROTOCOL_VERSION)?;
    let mut wire = opened;

    // 4. Data channels.
    let pages: Vec<u64> = regions.iter().map(|r| r.len() / ps).collect();
    let total_pages: u64 = pages.iter().sum();
    let shared = SendShared {
        regions,
        chunks: Chunks::new(&pages),
        cursor: AtomicU64::new(0),
        fail: Fail::new(),
        compression: opts.compression,
        unpopulated: Unpopulated::find(regions, ps),
    };
    let results = run_send_channels(&shared, conns);
    if let Some(e) = shared.fail.take() {
        return Err(sender_failed(&mut main, e));
    }

    // 5. ROUND_DONE, DEVICE_STATE, END.
    let counts: Vec<ChannelCount> = results.iter().map(|c| c.count).collect();
    let sent_pages: u64 = counts.iter().map(|c| c.pages).sum();
    wire += results.iter().map(|c| c.bytes).sum::<u64>();
    wire += send_finish(&mut main, counts, device_state)?;

    // 6. ACK.
    let (m, w) = read_main(&mut main, PAGE_SIZE, "waiting for the receiver's ACK")?;
    wire += w;
    expect_reply(m, "ACK", |m| matches!(m, MainMessage::Ack))?;
    let stats = TransferStats {
        bytes: wire,
        present_pages: sent_pages,
        zero_pages: total_pages - sent_pages,
        elapsed: start.elapsed(),
        direct_io: false,
        channels: n,
    };
    log::info!(
        "multifd: sent {} pages ({} zero pages skipped) and {} bytes of device state as {} bytes over {n} channels ({:?}) in {:.1} ms ({:.0} MB/s)",
        stats.present_pages,
        stats.zero_pages,
        device_state.len(),
        stats.bytes,
        opts.compression,
        stats.elapsed.as_secs_f64() * 1e3,
        stats.mb_per_s()
    );
    Ok(stats)
}

/// The connections of a transfer, set up: hellos sent, layout agreed.
pub(crate) struct Session<S> {
    pub(crate) main: S,
    pub(crate) conns: Vec<S>,
    /// Bytes on the wire so far.
    pub(crate) wire: u64,
}

/// Steps 1 to 3 of a transfer (protocol `version`): the main connection,
/// its hello, `RAM_LAYOUT`, `READY`, then the data connections with theirs.
pub(crate) fn open_session<S: Read + Write>(
    connect: &mut dyn FnMut() -> io::Result<S>,
    regions: &[MemRegion],
    opts: &SocketOptions,
    version: u16,
) -> Result<Session<S>, MultifdError> {
    let n = opts.channels;
    let session = sys::random_u64();
    let hello = |role, channel| Hello {
        version,
        role,
        compression: opts.compression.into(),
        channel,
        channels: n as u16,
        session,
        page_size: PAGE_SIZE,
    };
    let mut wire = 0u64;
    let mut main = connect().map_err(|e| MultifdError::io("connecting the main connection", e))?;
    main.write_all(&hello(Role::Main, 0).encode())
        .map_err(|e| conn_err(Channel::Main, "sending the hello", e))?;
    wire += HELLO_LEN as u64;
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr(), r.len())).collect();
    wire += write_main(
        &mut main,
        &MainMessage::RamLayout(layout),
        "sending the RAM layout",
    )?;
    let (m, w) = read_main(&mut main, PAGE_SIZE, "waiting for READY")?;
    wire += w;
    expect_reply(m, "READY", |m| matches!(m, MainMessage::Ready))?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let r = connect()
            .map_err(|e| MultifdError::io(format!("connecting data channel {i}"), e))
            .and_then(|mut s| {
                s.write_all(&hello(Role::Data, i as u16).encode())
                    .map_err(|e| conn_err(Channel::Data(i as u16), "sending the hello", e))?;
                Ok(s)
            });
        match r {
            Ok(s) => conns.push(s),
            Err(e) => {
                send_error(&mut main, &e);
                return Err(e);
            }
        }
        wire += HELLO_LEN as u64;
    }
    Ok(Session { main, conns, wire })
}

/// Checks `send`'s arguments: channel count, compression level, regions,
/// device-state size.
pub(crate) fn check_send_args(
    regions: &[MemRegion],
    device_state: &[u8],
    opts: &SocketOptions,
) -> Result<(), MultifdError> {
    let n = opts.channels;
    if n == 0 || n > usize::from(MAX_DATA_CHANNELS) {
        return Err(MultifdError::InvalidArgument(format!(
            "{n} channels: the channel count must be 1 to {MAX_DATA_CHANNELS}"
        )));
    }
    if let Compression::Zstd(level) = opts.compression {
        let range = zstd::compression_level_range();
        if !range.contains(&level) {
            return Err(MultifdError::InvalidArgument(format!(
                "zstd level {level}: must be {} to {}",
                range.start(),
                range.end()
            )));
        }
    }
    if regions.is_empty() || regions.len() > MAX_REGIONS as usize {
        return Err(MultifdError::InvalidArgument(format!(
            "{} memory regions: must be 1 to {MAX_REGIONS}",
            regions.len()
        )));
    }
    if device_state.len() > MAX_DEVICE_STATE as usize {
        return Err(MultifdError::InvalidArgument(format!(
            "device state of {} bytes: at most {MAX_DEVICE_STATE}",
            device_state.len()
        )));
    }
    let ps = u64::from(PAGE_SIZE);
    for (i, r) in regions.iter().enumerate() {
        r.check(i, ps)?;
        if r.is_empty() || r.guest_addr() % ps != 0 || r.guest_addr().checked_add(r.len()).is_none()
        {
            return Err(MultifdError::Layout(format!(
                "memory region {i} (guest {:#x}, {} bytes) is empty, not page aligned or overflows",
                r.guest_addr(),
                r.len()
            )));
        }
    }
    Ok(())
}

/// The receiver's reply on the main connection must be `expected` (`is`);
/// its ERROR is [`MultifdError::Remote`], anything else a protocol error.
pub(crate) fn expect_reply(
    m: MainMessage,
    expected: &str,
    is: impl Fn(&MainMessage) -> bool,
) -> Result<(), MultifdError> {
    match m {
        m if is(&m) => Ok(()),
        MainMessage::Error(msg) => Err(MultifdError::Remote(msg)),
        other => Err(MultifdError::Protocol(format!(
            "expected {expected} from the receiver, got {}",
            other.name()
        ))),
    }
}

/// Runs one sending thread per data connection until every chunk is sent
/// or one fails (the first error is in `shared.fail`).
fn run_send_channels<S: Read + Write + Send>(
    shared: &SendShared<'_>,
    conns: Vec<S>,
) -> Vec<SendCounts> {
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                std::thread::Builder::new()
                    .name(format!("multifd-send-{i}"))
                    .spawn_scoped(s, move || {
                        let mut conn = conn;
                        // Record a failure before the connection closes, so
                        // that it is the first error this side reports.
                        let r = send_channel(shared, i as u16, &mut conn).unwrap_or_else(|e| {
                            shared.fail.fail(e);
                            SendCounts::default()
                        });
                        drop(conn);
                        r
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    shared
                        .fail
                        .fail(MultifdError::Aborted("a channel thread panicked".into()));
                    SendCounts::default()
                }),
                Err(e) => {
                    shared
                        .fail
                        .fail(MultifdError::io("starting a channel thread", e));
                    SendCounts::default()
                }
            })
            .collect()
    })
}

/// A data channel failed with `e`: tells the receiver, then returns the
/// receiver's own reason if it has one (e.g. a checksum mismatch that made
/// it close a data connection), else `e`.
pub(crate) fn sender_failed<S: Read + Write>(main: &mut S, e: MultifdError) -> MultifdError {
    send_error(main, &e);
    if matches!(
        e,
        MultifdError::PeerDisconnected { .. } | MultifdError::Io { .. }
    ) {
        if let Ok((MainMessage::Error(msg), _)) =
            read_main(main, PAGE_SIZE, "reading the receiver's error")
        {
            return MultifdError::Remote(format!("{msg} (here: {e})"));
        }
    }
    e
}

/// Sends ROUND_DONE with the channels' counts, the device state and END;
/// returns the bytes written.
fn send_finish<S: Read + Write>(
    main: &mut S,
    counts: Vec<ChannelCount>,
    device_state: &[u8],
) -> Result<u64, MultifdError> {
    let round = MainMessage::RoundDone {
        round: 0,
        channels: counts,
    };
    send_main_messages(
        main,
        vec![
            (round, "sending ROUND_DONE"),
            (
                MainMessage::DeviceState(device_state.to_vec()),
                "sending the device state",
            ),
            (MainMessage::End, "sending END"),
        ],
    )
}

/// Sends `messages` on the main connection; on a failed write, the
/// receiver's ERROR (if it sent one) is the error. Returns the bytes written.
pub(crate) fn send_main_messages<S: Read + Write>(
    main: &mut S,
    messages: Vec<(MainMessage, &'static str)>,
) -> Result<u64, MultifdError> {
    let mut wire = 0;
    for (m, during) in &messages {
        match write_main(main, m, during) {
            Ok(w) => wire += w,
            Err(e) => {
                // The receiver may have given up and said why.
                if let Ok((MainMessage::Error(msg), _)) =
                    read_main(main, PAGE_SIZE, "reading the receiver's error")
                {
                    return Err(MultifdError::Remote(format!("{msg} (here: {e})")));
                }
                return Err(e);
            }
        }
    }
    Ok(wire)
}

struct SendShared<'a> {
    regions: &'a [MemRegion],
    chunks: Chunks,
    cursor: AtomicU64,
    fail: Fail,
    compression: Compression,
    /// Never-populated memory, sent as nothing and left unread.
    unpopulated: Option<Unpopulated>,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct SendCounts {
    pub(crate) count: ChannelCount,
    pub(crate) bytes: u64,
}

pub(crate) enum Compressor {
    None,
    Zstd(Box<zstd::bulk::Compressor<'static>>),
    Lz4,
}

impl Compressor {
    pub(crate) fn new(c: Compression) -> Result<Compressor, MultifdError> {
        Ok(match c {
            Compression::None => Compressor::None,
            Compression::Zstd(level) => Compressor::Zstd(Box::new(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| MultifdError::io("creating a zstd compressor", e))?,
            )),
            Compression::Lz4 => Compressor::Lz4,
        })
    }

    /// Room for the worst case of either compressor on a full packet.
    pub(crate) fn out_len() -> usize {
        let max_raw = MAX_PAGES_PER_PACKET as usize * PAGE_SIZE as usize;
        lz4_flex::block::get_maximum_output_size(max_raw)
            .max(zstd::zstd_safe::compress_bound(max_raw))
    }

    /// Compresses `src` into `out`: the encoding and length, or None when
    /// not compressing or when that would not make it smaller (sent raw).
    pub(crate) fn compress(&mut self, src: &[u8], out: &mut [u8]) -> Option<(Encoding, usize)> {
        let r = match self {
            Compressor::Zstd(z) => z
                .compress_to_buffer(src, out)
                .ok()
                .map(|n| (Encoding::Zstd, n)),
            Compressor::Lz4 => lz4_flex::block::compress_into(src, out)
                .ok()
                .map(|n| (Encoding::Lz4, n)),
            Compressor::None => None,
        };
        r.filter(|&(_, n)| n > 0 && n < src.len())
    }
}

fn send_channel<S: Write + ?Sized>(
    sh: &SendShared<'_>,
    ch: u16,
    mut conn: &mut S,
) -> Result<SendCounts, MultifdError> {
    let ps = PAGE_SIZE as usize;
    let max_raw = MAX_PAGES_PER_PACKET as usize * ps;
    let mut compressor = Compressor::new(sh.compression)?;
    let compressing = !matches!(compressor, Compressor::None);
    let mut gather = if compressing {
        vec![0u8; max_raw]
    } else {
        Vec::new()
    };
    let mut out = if compressing {
        vec![0u8; Compressor::out_len()]
    } else {
        Vec::new()
    };
    let mut present: Vec<page_runs::PageRun> = Vec::with_capacity(MAX_PAGES_PER_PACKET as usize);
    let mut unpopulated: Vec<bool> = Vec::with_capacity(MAX_PAGES_PER_PACKET as usize);
    let mut runs: Vec<Run> = Vec::with_capacity(MAX_PAGES_PER_PACKET as usize);
    let mut head: Vec<u8> =
        Vec::with_capacity(PACKET_HEADER_LEN + RUN_LEN * MAX_PAGES_PER_PACKET as usize);
    let mut c = SendCounts::default();
    loop {
        if sh.fail.stopped() {
            return Err(MultifdError::Aborted(format!(
                "data channel {ch} stopped: another channel failed"
            )));
        }
        let idx = sh.cursor.fetch_add(1, Ordering::Relaxed);
        if idx >= sh.chunks.total() {
            break;
        }
        let (r, first) = sh.chunks.get(idx);
        let region = &sh.regions[r];
        let region_pages = region.len() / ps as u64;
        let n = (region_pages - first).min(u64::from(MAX_PAGES_PER_PACKET));
        // Runs of non-zero pages; never-populated ones are zeros, unread.
        present.clear();
        unpopulated.clear();
        if let Some(u) = &sh.unpopulated {
            let addr = region.as_ptr() as usize + first as usize * ps;
            u.pages(r, addr, n as usize * ps, ps, &mut unpopulated);
        }
        for p in first..first + n {
            if unpopulated.get((p - first) as usize) == Some(&true) {
                continue;
            }
            // SAFETY: p < region_pages, so the page is inside the region,
            // which the MemRegion contract keeps readable while we run.
            let page =
                unsafe { std::slice::from_raw_parts(region.as_ptr().add(p as usize * ps), ps) };
            if !page_runs::is_zero(page) {
                page_runs::push_page(&mut present, p);
            }
        }
        // At most MAX_PAGES_PER_PACKET pages: counts fit in u32.
        runs.clear();
        runs.extend(present.iter().map(|r| Run {
            first_page: r.start,
            count: r.len() as u32,
        }));
        let page_count: u32 = runs.iter().map(|r| r.count).sum();
        if runs.is_empty() {
            continue;
        }
        let raw_len = page_count as usize * ps;
        let run_slice = |run: &Run| -> &[u8] {
            // SAFETY: the run lies inside the region (its pages were scanned
            // above), which stays readable and unchanged during the transfer.
            unsafe {
                std::slice::from_raw_parts(
                    region.as_ptr().add(run.first_page as usize * ps),
                    run.count as usize * ps,
                )
            }
        };
        // Compress when asked; send raw when that does not make it smaller.
        let mut compressed: Option<(Encoding, usize)> = None;
        if compressing {
            let src: &[u8] = if runs.len() == 1 {
                run_slice(&runs[0])
            } else {
                let mut o = 0;
                for run in &runs {
                    let s = run_slice(run);
                    gather[o..o + s.len()].copy_from_slice(s);
                    o += s.len();
                }
                &gather[..raw_len]
            };
            compressed = compressor.compress(src, &mut out);
        }
        let (encoding, payload_len) = compressed.unwrap_or((Encoding::Raw, raw_len));
        let h = PacketHeader {
            channel: ch,
            sequence: c.count.packets,
            region: r as u32,
            page_count,
            run_count: runs.len() as u32,
            encoding,
            sync: false,
            last: false,
            payload_len: payload_len as u32,
        };
        head.clear();
        head.extend_from_slice(&h.encode());
        for run in &runs {
            head.extend_from_slice(&run.encode());
        }
        let mut crc = crc32c::crc32c(&head);
        let crc_bytes;
        let err = |e| {
            conn_err(
                Channel::Data(ch),
                format!(
                    "sending packet {} (region {r}, pages from {first})",
                    h.sequence
                ),
                e,
            )
        };
        if encoding == Encoding::Raw {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(runs.len() + 2);
            iov.push(IoSlice::new(&head));
            for run in &runs {
                let s = run_slice(run);
                crc = crc32c::crc32c_append(crc, s);
                iov.push(IoSlice::new(s));
            }
            crc_bytes = crc.to_le_bytes();
            iov.push(IoSlice::new(&crc_bytes));
            write_all_vectored(&mut conn, &mut iov).map_err(err)?;
        } else {
            let payload = &out[..payload_len];
            crc = crc32c::crc32c_append(crc, payload);
            crc_bytes = crc.to_le_bytes();
            let mut iov = [
                IoSlice::new(&head),
                IoSlice::new(payload),
                IoSlice::new(&crc_bytes),
            ];
            write_all_vectored(&mut conn, &mut iov).map_err(err)?;
        }
        c.bytes += (head.len() + payload_len + 4) as u64;
        c.count.packets += 1;
        c.count.pages += u64::from(page_count);
    }
    let sync = PacketHeader::sync(ch, c.count.packets).encode();
    let crc = crc32c::crc32c(&sync).to_le_bytes();
    let mut iov = [IoSlice::new(&sync), IoSlice::new(&crc)];
    write_all_vectored(&mut conn, &mut iov)
        .and_then(|_| conn.flush())
        .map_err(|e| conn_err(Channel::Data(ch), "sending the sync packet", e))?;
    c.bytes += (PACKET_HEADER_LEN + 4) as u64;
    Ok(c)
}

/// Receives a VM's memory and device state from a sender.
///
/// `accept` yields connections: the main connection first, then the data
/// connections in any order (connections with another session id are
/// dropped and another is accepted, at most 16 times). `alloc` is called
/// once with the RAM layout ((guest address, size) per region) and returns
/// the memory to fill, fresh and zeroed, one region per layout entry with the
/// same size. Returns the device state once the whole transfer is verified
/// (every packet checked, every channel's counts matching the sender's),
/// after sending the final ACK. On any error the memory is partly written and
/// must not be used; the sender is told why (best effort).
#[allow(clippy::type_complexity)]
pub fn receive<S: Read + Write + Send>(
    accept: &mut dyn FnMut() -> io::Result<S>,
    alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
) -> Result<(Vec<u8>, TransferStats), MultifdError> {
    receive_checked(accept, alloc, &mut |_| Ok(()))
}

/// [`receive`], with `check_state` called on the verified device state
/// before the ACK is sent. An error from it fails the transfer as any
/// other receive error does ([`MultifdError::Caller`]): the sender is told
/// why and, having no ACK, keeps its VM. A receiver uses it to refuse what
/// it could not run (a disk it cannot open) while the sender still can.
#[allow(clippy::type_complexity)]
pub fn receive_checked<S: Read + Write + Send>(
    accept: &mut dyn FnMut() -> io::Result<S>,
    alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
    check_state: &mut dyn FnMut(&[u8]) -> Result<(), CallerError>,
) -> Result<(Vec<u8>, TransferStats), MultifdError> {
    let start = Instant::now();
    let (mut main, hello) = accept_main(accept)?;
    let mut wire = HELLO_LEN as u64;
    let received = receive_main(&mut main, &hello, accept, alloc, &mut wire).and_then(|r| {
        check_state(&r.0).map_err(|source| MultifdError::Caller {
            context: "the receiver refused the device state".into(),
            source,
        })?;
        Ok(r)
    });
    match received {
        Ok((state, mut stats)) => {
            // Send the ACK; only a successful send makes the transfer done here.
            stats.bytes = wire + write_main(&mut main, &MainMessage::Ack, "sending the ACK")?;
            stats.elapsed = start.elapsed();
            log::info!(
                "multifd: received {} pages ({} zero pages not sent) and {} bytes of device state as {} bytes over {} channels in {:.1} ms ({:.0} MB/s)",
                stats.present_pages,
                stats.zero_pages,
                state.len(),
                stats.bytes,
                stats.channels,
                stats.elapsed.as_secs_f64() * 1e3,
                stats.mb_per_s()
            );
            Ok((state, stats))
        }
        Err(e) => {
            if !matches!(e, MultifdError::Remote(_)) {
                send_error(&mut main, &e);
            }
            Err(e)
        }
    }
}

/// Accepts the main connection: the first one that opens with a main
/// hello. A connection that closes or sends anything else first (a
/// connect-and-close readiness probe, a stray client) is dropped and the
/// next one accepted, at most [`MAX_STRAYS`] times.
fn accept_main<S: Read>(
    accept: &mut dyn FnMut() -> io::Result<S>,
) -> Result<(S, Hello), MultifdError> {
    for _ in 0..=MAX_STRAYS {
        let mut main =
            accept().map_err(|e| MultifdError::io("accepting the main connection", e))?;
        let mut hb = [0u8; HELLO_LEN];
        let why = match main.read_exact(&mut hb) {
            Err(e) => format!("closed before its hello ({e})"),
            Ok(()) => match parse_hello(&hb) {
                Ok(h) if h.role == Role::Main => return Ok((main, h)),
                Ok(_) => "a data connection before the main one".to_string(),
                Err(e) => e.to_string(),
            },
        };
        log::warn!("multifd: dropping a connection that is not a migration: {why}");
    }
    Err(MultifdError::Protocol(format!(
        "more than {MAX_STRAYS} connections that were not a migration"
    )))
}

struct RecvShared<'a> {
    regions: &'a [MemRegion],
    /// The protocol version of the transfer.
    version: u16,
    /// Version 2: chunk `i` travels on data channel `i % channels` only.
    chunks: Chunks,
    channels: u64,
    /// Version 1: per region, one bit per page: received already.
    claimed: Vec<Vec<AtomicU64>>,
    page_size: u32,
    compression: Encoding,
    fail: Fail,
    /// The rounds each data channel has taken in full.
    taken: Taken,
}

/// How many rounds each data channel has taken in full (its sync packets
/// seen, every page before them in memory), for version 3's
/// `ROUND_RECEIVED` reports.
struct Taken {
    rounds: Mutex<Vec<u64>>,
    changed: Condvar,
}

impl Taken {
    fn new(channels: usize) -> Taken {
        Taken {
            rounds: Mutex::new(vec![0; channels]),
            changed: Condvar::new(),
        }
    }

    /// Data channel `ch` has taken one more round.
    fn one_more(&self, ch: usize) {
        if let Ok(mut r) = self.rounds.lock() {
            if let Some(r) = r.get_mut(ch) {
                *r += 1;
            }
        }
        self.changed.notify_all();
    }

    /// Waits until every data channel has taken `rounds` rounds (true), or
    /// the transfer failed (false).
    fn wait_all(&self, rounds: u64, fail: &Fail) -> bool {
        let Ok(mut r) = self.rounds.lock() else {
            return false;
        };
        loop {
            if r.iter().all(|&n| n >= rounds) {
                return true;
            }
            if fail.stopped() {
                return false;
            }
            // A failing channel does not notify: look at `fail` now and then.
            r = match self.changed.wait_timeout(r, Duration::from_millis(50)) {
                Ok((r, _)) => r,
                Err(_) => return false,
            };
        }
    }
}

#[derive(Default, Clone, Copy)]
struct RecvCounts {
    count: ChannelCount,
    bytes: u64,
    /// Sync packets seen (one per round).
    syncs: u64,
    synced: bool,
}

#[allow(clippy::type_complexity)]
fn receive_main<S: Read + Write + Send>(
    main: &mut S,
    hello: &Hello,
    accept: &mut dyn FnMut() -> io::Result<S>,
    alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
    wire: &mut u64,
) -> Result<(Vec<u8>, TransferStats), MultifdError> {
    let ps = hello.page_size;
    let n = hello.channels as usize;
    let (layout, regions) = receive_layout(main, ps, alloc, wire)?;
    let pages: Vec<u64> = layout.iter().map(|&(_, s)| s / u64::from(ps)).collect();
    let total_pages: u64 = pages.iter().sum();
    let live = is_live(hello.version);
    let shared = RecvShared {
        regions: &regions,
        version: hello.version,
        chunks: Chunks::new(&pages),
        channels: n as u64,
        // Version 2 pages come again in later rounds: no claim bitmap.
        claimed: pages
            .iter()
            .map(|p| {
                let words = if live { 0 } else { p.div_ceil(64) };
                (0..words).map(|_| AtomicU64::new(0)).collect()
            })
            .collect(),
        page_size: ps,
        compression: hello.compression,
        fail: Fail::new(),
        taken: Taken::new(n),
    };
    *wire += write_main(main, &MainMessage::Ready, "sending READY")?;

    let (results, round, state) = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(n);
        let mut seen = vec![false; n];
        let mut strays = 0;
        // Accept the data connections.
        while handles.len() < n && !shared.fail.stopped() {
            let mut conn = match accept() {
                Ok(c) => c,
                Err(e) => {
                    shared.fail.fail(MultifdError::io(
                        format!("accepting data connection {} of {n}", handles.len() + 1),
                        e,
                    ));
                    break;
                }
            };
            let i = match data_hello(&mut conn, hello, &mut seen, &mut strays) {
                Ok(Some(i)) => i,
                Ok(None) => continue,
                Err(e) => {
                    shared.fail.fail(e);
                    break;
                }
            };
            *wire += HELLO_LEN as u64;
            let shared = &shared;
            let spawned = std::thread::Builder::new()
                .name(format!("multifd-recv-{i}"))
                .spawn_scoped(s, move || {
                    let mut conn = conn;
                    // Record a failure before the connection closes (which
                    // makes the sender give up and report its own error).
                    let r = recv_channel(shared, i as u16, &mut conn).unwrap_or_else(|e| {
                        shared.fail.fail(e);
                        RecvCounts::default()
                    });
                    drop(conn);
                    r
                });
            match spawned {
                Ok(h) => handles.push((i, h)),
                Err(e) => {
                    shared
                        .fail
                        .fail(MultifdError::io("starting a channel thread", e));
                    break;
                }
            }
        }
        // Meanwhile on the main connection: ROUND_DONE, DEVICE_STATE, END.
        let (round, state) = receive_main_tail(main, hello, &shared, wire);
        let mut results = vec![RecvCounts::default(); n];
        for (i, h) in handles {
            match h.join() {
                Ok(c) => results[i] = c,
                Err(_) => shared
                    .fail
                    .fail(MultifdError::Aborted("a channel thread panicked".into())),
            }
        }
        (results, round, state)
    });
    if let Some(e) = shared.fail.take() {
        return Err(e);
    }
    let (Some((last_round, round)), Some(state)) = (round, state) else {
        return Err(MultifdError::Protocol("the transfer ended early".into()));
    };
    let present = check_counts(&results, u64::from(last_round) + 1, &round, wire)?;
    Ok((
        state,
        TransferStats {
            bytes: 0,
            present_pages: present,
            zero_pages: total_pages.saturating_sub(present),
            elapsed: Default::default(),
            direct_io: false,
            channels: n,
        },
    ))
}

/// Reads the RAM layout on the main connection and allocates the memory
/// for it through `alloc`, checking what it returns against the layout.
#[allow(clippy::type_complexity)]
fn receive_layout<S: Read + Write>(
    main: &mut S,
    ps: u32,
    alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
    wire: &mut u64,
) -> Result<(Vec<(u64, u64)>, Vec<MemRegion>), MultifdError> {
    let (m, w) = read_main(main, ps, "reading the RAM layout")?;
    *wire += w;
    let layout = match m {
        MainMessage::RamLayout(l) => l,
        MainMessage::Error(msg) => return Err(MultifdError::Remote(msg)),
        other => {
            return Err(MultifdError::Protocol(format!(
                "expected RAM_LAYOUT, got {}",
                other.name()
            )))
        }
    };
    let regions = alloc(&layout).map_err(|source| MultifdError::Caller {
        context: format!("allocating the guest memory ({} regions)", layout.len()),
        source,
    })?;
    if regions.len() != layout.len() {
        return Err(MultifdError::Layout(format!(
            "the allocator returned {} regions for a layout of {}",
            regions.len(),
            layout.len()
        )));
    }
    for (i, (r, &(addr, size))) in regions.iter().zip(&layout).enumerate() {
        r.check(i, u64::from(ps))?;
        if r.len() != size {
            return Err(MultifdError::Layout(format!(
                "the allocator returned {} bytes for region {i} (guest {addr:#x}), the layout says {size}",
                r.len()
            )));
        }
    }
    Ok((layout, regions))
}

/// Reads and checks a data connection's hello: `Some(channel)`, `None` for
/// a stray connection to drop (another session, or garbage; at most
/// [`MAX_STRAYS`]), an error for a hello that breaks the protocol.
fn data_hello<S: Read>(
    conn: &mut S,
    hello: &Hello,
    seen: &mut [bool],
    strays: &mut usize,
) -> Result<Option<usize>, MultifdError> {
    let mut hb = [0u8; HELLO_LEN];
    let h = conn
        .read_exact(&mut hb)
        .map_err(|e| MultifdError::io("reading a data connection's hello", e))
        .and_then(|_| parse_hello(&hb));
    let h = match h {
        Ok(h) if h.session == hello.session => h,
        other => {
            *strays += 1;
            let why = match other {
                Ok(_) => "another session id".to_string(),
                Err(e) => e.to_string(),
            };
            log::warn!("multifd: dropping a stray connection: {why}");
            if *strays > MAX_STRAYS {
                return Err(MultifdError::Protocol(format!(
                    "more than {MAX_STRAYS} stray connections (last: {why})"
                )));
            }
            return Ok(None);
        }
    };
    let i = usize::from(h.channel);
    if h.role != Role::Data
        || h.version != hello.version
        || h.channels != hello.channels
        || h.page_size != hello.page_size
        || h.compression != hello.compression
        || seen[i]
    {
        return Err(MultifdError::Protocol(format!(
            "data connection hello for channel {i} does not match the main hello or repeats a channel: {h:?}"
        )));
    }
    seen[i] = true;
    Ok(Some(i))
}

/// Follows the main connection to its END while the data channels run:
/// ROUND_DONE (the channels' counts; versions 2 and 3: once per round,
/// numbered from 0, counts so far), DEVICE_STATE, END. Version 3: after
/// each ROUND_DONE, once every data channel has taken that round, sends
/// ROUND_RECEIVED. Returns the last round's number and counts, and the
/// device state. A failure goes to `shared.fail`, and ends the wait.
#[allow(clippy::type_complexity)]
fn receive_main_tail<S: Read + Write>(
    main: &mut S,
    hello: &Hello,
    shared: &RecvShared<'_>,
    wire: &mut u64,
) -> (Option<(u32, Vec<ChannelCount>)>, Option<Vec<u8>>) {
    let fail = &shared.fail;
    let n = usize::from(hello.channels);
    let live = is_live(hello.version);
    let mut round: Option<(u32, Vec<ChannelCount>)> = None;
    let mut state: Option<Vec<u8>> = None;
    while !fail.stopped() {
        let during = if round.is_none() {
            "waiting for ROUND_DONE"
        } else if state.is_none() {
            "waiting for the device state"
        } else {
            "waiting for END"
        };
        let m = match read_main(main, hello.page_size, during) {
            Ok((m, w)) => {
                *wire += w;
                m
            }
            Err(e) => {
                fail.fail(e);
                break;
            }
        };
        let bad = |what: &str| MultifdError::Protocol(format!("unexpected {what} while {during}"));
        match m {
            MainMessage::RoundDone { round: r, channels } => {
                let next = round.as_ref().map_or(0, |(last, _)| last + 1);
                let fits = if live {
                    state.is_none()
                } else {
                    round.is_none()
                };
                if !fits || r != next || channels.len() != n {
                    fail.fail(MultifdError::Protocol(format!(
                        "ROUND_DONE for round {r} with {} channels (expected round {next}, {n} channels, before the device state{})",
                        channels.len(),
                        if live { "" } else { ", once" }
                    )));
                    break;
                }
                round = Some((r, channels));
                if hello.version == PROGRESS_PROTOCOL_VERSION {
                    if !shared.taken.wait_all(u64::from(r) + 1, fail) {
                        break;
                    }
                    let received = MainMessage::RoundReceived { round: r };
                    match write_main(main, &received, "sending ROUND_RECEIVED") {
                        Ok(w) => *wire += w,
                        Err(e) => {
                            fail.fail(e);
                            break;
                        }
                    }
                }
            }
            MainMessage::DeviceState(d) if round.is_some() && state.is_none() => state = Some(d),
            MainMessage::End if state.is_some() => break,
            MainMessage::Error(msg) => {
                fail.fail(MultifdError::Remote(msg));
                break;
            }
            other => {
                fail.fail(bad(other.name()));
                break;
            }
        }
    }
    (round, state)
}

/// Checks each data channel's counts against the sender's last ROUND_DONE
/// (and its sync packets against the rounds); returns the pages received,
/// adding the channels' bytes to `wire`.
fn check_counts(
    results: &[RecvCounts],
    rounds: u64,
    round: &[ChannelCount],
    wire: &mut u64,
) -> Result<u64, MultifdError> {
    let mut present = 0;
    for (i, (got, want)) in results.iter().zip(round).enumerate() {
        if !got.synced || got.count != *want || got.syncs != rounds {
            return Err(MultifdError::Protocol(format!(
                "data channel {i}: received {} packets and {} pages in {} rounds, the sender says {} and {} in {rounds}",
                got.count.packets, got.count.pages, got.syncs, want.packets, want.pages
            )));
        }
        present += got.count.pages;
        *wire += got.bytes;
    }
    Ok(present)
}

/// Marks pages `first..first+count` of a region received; false if any was already.
fn claim(bits: &[AtomicU64], first: u64, count: u64) -> bool {
    let mut p = first;
    let end = first + count;
    while p < end {
        let w = (p / 64) as usize;
        let lo = p % 64;
        let hi = (end - w as u64 * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        let prev = bits[w].fetch_or(mask, Ordering::Relaxed);
        if prev & mask != 0 {
            return false;
        }
        p = w as u64 * 64 + hi;
    }
    true
}

fn recv_channel<S: Read + ?Sized>(
    sh: &RecvShared<'_>,
    ch: u16,
    conn: &mut S,
) -> Result<RecvCounts, MultifdError> {
    let ps = sh.page_size as usize;
    let max_raw = MAX_PAGES_PER_PACKET as usize * ps;
    let compressed = sh.compression != Encoding::Raw;
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    if compressed {
        payload.reserve(max_raw);
        scratch.resize(max_raw, 0);
    }
    let mut r = BufReader::with_capacity(256 << 10, conn);
    let mut runs: Vec<Run> = Vec::with_capacity(MAX_PAGES_PER_PACKET as usize);
    let mut rb = vec![0u8; RUN_LEN * MAX_PAGES_PER_PACKET as usize];
    let mut c = RecvCounts::default();
    let chan = Channel::Data(ch);
    loop {
        if sh.fail.stopped() {
            return Err(MultifdError::Aborted(format!(
                "data channel {ch} stopped: another channel failed"
            )));
        }
        let seq = c.count.packets;
        let during = |what: &str| format!("reading packet {seq} ({what})");
        let mut hb = [0u8; PACKET_HEADER_LEN];
        r.read_exact(&mut hb)
            .map_err(|e| conn_err(chan, during("header"), e))?;
        let h = parse_packet_header(&hb)?;
        if h.channel != ch || h.sequence != seq {
            return Err(MultifdError::Protocol(format!(
                "data channel {ch}: packet for channel {} with sequence {}, expected sequence {seq}",
                h.channel, h.sequence
            )));
        }
        let mut crc = crc32c::crc32c(&hb);
        let mut cb = [0u8; 4];
        if h.sync {
            r.read_exact(&mut cb)
                .map_err(|e| conn_err(chan, during("sync CRC"), e))?;
            check_packet_crc(ch, &h, crc, cb)?;
            c.bytes += (PACKET_HEADER_LEN + 4) as u64;
            c.syncs += 1;
            sh.taken.one_more(usize::from(ch));
            if is_live(sh.version) && !h.last {
                continue;
            }
            if h.last != is_live(sh.version) {
                return Err(MultifdError::Protocol(format!(
                    "data channel {ch}: a LAST flag on a version {} sync packet",
                    sh.version
                )));
            }
            c.synced = true;
            return Ok(c);
        }
        if h.encoding != Encoding::Raw && h.encoding != sh.compression {
            return Err(MultifdError::Protocol(format!(
                "data channel {ch} packet {seq}: {:?} payload on a connection with compression {:?}",
                h.encoding, sh.compression
            )));
        }
        h.check_payload(sh.page_size)?;
        let region = sh.regions.get(h.region as usize).ok_or_else(|| {
            MultifdError::Protocol(format!(
                "data channel {ch} packet {seq}: region {} does not exist ({} regions)",
                h.region,
                sh.regions.len()
            ))
        })?;
        let rl = h.runs_len();
        r.read_exact(&mut rb[..rl])
            .map_err(|e| conn_err(chan, during("runs"), e))?;
        parse_runs_into(&h, &rb[..rl], region.len() / ps as u64, &mut runs)?;
        crc = crc32c::crc32c_append(crc, &rb[..rl]);
        if is_live(sh.version) {
            check_chunk_owner(sh, ch, h.region as usize, &runs)?;
        }
        for run in runs.iter().filter(|_| sh.version == PROTOCOL_VERSION) {
            if !claim(
                &sh.claimed[h.region as usize],
                run.first_page,
                u64::from(run.count),
            ) {
                return Err(MultifdError::Protocol(format!(
                    "data channel {ch} packet {seq}: region {} pages {}+{} were already received",
                    h.region, run.first_page, run.count
                )));
            }
        }
        let run_slice = |run: &Run| -> &mut [u8] {
            // SAFETY: the run lies inside the region (parse_runs_into checked
            // it against the region's page count); this channel claimed its
            // pages (version 1) or owns their chunk (version 2), so no other
            // thread touches them; the MemRegion contract
            // keeps the memory writable and otherwise unused.
            unsafe {
                std::slice::from_raw_parts_mut(
                    region.as_ptr().add(run.first_page as usize * ps),
                    run.count as usize * ps,
                )
            }
        };
        if h.encoding == Encoding::Raw {
            for run in &runs {
                let dst = run_slice(run);
                r.read_exact(dst)
                    .map_err(|e| conn_err(chan, during("pages"), e))?;
                crc = crc32c::crc32c_append(crc, dst);
            }
            r.read_exact(&mut cb)
                .map_err(|e| conn_err(chan, during("CRC"), e))?;
            check_packet_crc(ch, &h, crc, cb)?;
        } else {
            payload.clear();
            (&mut r)
                .take(u64::from(h.payload_len))
                .read_to_end(&mut payload)
                .map_err(|e| conn_err(chan, during("payload"), e))?;
            if payload.len() != h.payload_len as usize {
                return Err(conn_err(
                    chan,
                    during("payload"),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed inside a packet",
                    ),
                ));
            }
            crc = crc32c::crc32c_append(crc, &payload);
            r.read_exact(&mut cb)
                .map_err(|e| conn_err(chan, during("CRC"), e))?;
            check_packet_crc(ch, &h, crc, cb)?;
            let raw_len = h.page_count as usize * ps;
            let ctx = |e: MultifdError| {
                let e = match e {
                    MultifdError::Protocol(m) => m,
                    other => other.to_string(),
                };
                MultifdError::Protocol(format!(
                    "data channel {ch} packet {seq} (region {}): {e}",
                    h.region
                ))
            };
            if runs.len() == 1 {
                decode_payload(h.encoding, &payload, run_slice(&runs[0])).map_err(ctx)?;
            } else {
                decode_payload(h.encoding, &payload, &mut scratch[..raw_len]).map_err(ctx)?;
                let mut o = 0;
                for run in &runs {
                    let dst = run_slice(run);
                    dst.copy_from_slice(&scratch[o..o + dst.len()]);
                    o += dst.len();
                }
            }
        }
        c.bytes += (PACKET_HEADER_LEN + rl + h.payload_len as usize + 4) as u64;
        c.count.packets += 1;
        c.count.pages += u64::from(h.page_count);
    }
}

/// Version 2: a packet's pages all lie in one chunk that belongs to data
/// channel `ch` (chunk `i` to channel `i % channels`), so that a page's
/// later copies arrive after its earlier ones, on the same connection.
fn check_chunk_owner(
    sh: &RecvShared<'_>,
    ch: u16,
    region: usize,
    runs: &[Run],
) -> Result<(), MultifdError> {
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Ok(());
    };
    let chunk = sh.chunks.index_of(region, first.first_page);
    let end = sh
        .chunks
        .index_of(region, last.first_page + u64::from(last.count) - 1);
    if chunk != end || chunk % sh.channels != u64::from(ch) {
        return Err(MultifdError::Protocol(format!(
            "data channel {ch}: a packet of region {region} pages {}.. crosses chunks or belongs to another channel",
            first.first_page
        )));
    }
    Ok(())
}

fn check_packet_crc(
    ch: u16,
    h: &PacketHeader,
    computed: u32,
    stored: [u8; 4],
) -> Result<(), MultifdError> {
    let stored = u32::from_le_bytes(stored);
    if stored != computed {
        return Err(MultifdError::Checksum(format!(
            "data channel {ch} packet {} (region {}, {} pages): stored {stored:#010x}, computed {computed:#010x}",
            h.sequence, h.region, h.page_count
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_bits() {
        let bits: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        assert!(claim(&bits, 0, 64));
        assert_eq!(bits[0].load(Ordering::Relaxed), u64::MAX);
        assert!(claim(&bits, 70, 100));
        assert!(!claim(&bits, 169, 1));
        assert!(claim(&bits, 170, 86));
        assert!(claim(&bits, 64, 6));
        for b in &bits {
            assert_eq!(b.load(Ordering::Relaxed), u64::MAX);
        }
        assert!(!claim(&bits, 255, 1));
    }

    #[test]
    fn chunk_index() {
        let c = Chunks::new(&[256, 1, 0, 600]);
        assert_eq!(c.total(), 1 + 1 + 3);
        assert_eq!(c.get(0), (0, 0));
        assert_eq!(c.get(1), (1, 0));
        assert_eq!(c.get(2), (3, 0));
        assert_eq!(c.get(4), (3, 512));
    }
}
