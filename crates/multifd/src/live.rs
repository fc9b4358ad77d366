//! Version 2 of the socket protocol: a running VM's memory in rounds (live
//! migration). The first round sends every non-zero page while the guest
//! runs; later rounds send the pages the caller found dirty; the last round
//! is sent with the VM stopped, followed by the device state.
//!
//! Chunk `i` (256 pages of one region) always travels on data channel
//! `i % channels`, so a page's later copies arrive after its earlier ones on
//! the same connection, and no two receiving threads write the same memory.
//!
//! The sender offers version 3, in which the receiver reports each round it
//! has taken in full (`ROUND_RECEIVED`), so that the caller can wait for a
//! slow receiver to catch up before it pauses the VM
//! ([`LiveSender::wait_received`]). A receiver that does not know version 3
//! closes the connection at its hello; the sender then connects again with
//! version 2.

use std::io::{IoSlice, Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::pace::{any_dirty, is_dirty, Pace};
use crate::protocol::{
    parse_main_header, parse_main_message, Encoding, MainMessage, PacketHeader, Run,
    LIVE_PROTOCOL_VERSION, MAIN_HEADER_LEN, MAX_PAGES_PER_PACKET, PACKET_HEADER_LEN, PAGE_SIZE,
    PROGRESS_PROTOCOL_VERSION, RUN_LEN,
};
use crate::socket::{
    check_send_args, conn_err, expect_reply, open_session, send_error, send_main_messages,
    sender_failed, write_all_vectored, write_main, Chunks, Compressor, Fail, SendCounts, Session,
};
use crate::unpopulated::Unpopulated;
use crate::{Channel, MemRegion, MultifdError, SocketOptions, TransferStats};

/// Which pages a round sends.
#[derive(Clone, Copy, Debug)]
pub enum PageSet<'a> {
    /// Every non-zero page (the first round: the receiver's memory is fresh
    /// and zero). Pages of private anonymous memory that were never
    /// populated are taken for zeros without reading them; the caller's
    /// dirty log, on before this round starts, sends again any page the
    /// guest populates afterwards.
    AllNonZero,
    /// The pages whose bits are set, zero or not: one bitmap per region, in
    /// layout order, bit `i % 64` of word `i / 64` for page `i` (the layout of
    /// KVM's dirty log).
    Dirty(&'a [&'a [u64]]),
}

/// What one round sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundStats {
    /// The round's number (0 = the first).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire (data packets).
    pub bytes: u64,
    /// How long the round took.
    pub elapsed: Duration,
}

impl RoundStats {
    /// Wire throughput of the round in bytes per second (0 for an instant round).
    pub fn bytes_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// The sending side of a live transfer (protocol version 3, or 2 with an
/// older receiver): connect, send rounds, then [`LiveSender::finish`] with the device state, or
/// [`LiveSender::abort`]. The receiver is [`receive`](crate::receive).
pub struct LiveSender<S> {
    main: S,
    conns: Vec<S>,
    regions: Vec<MemRegion>,
    chunks: Chunks,
    opts: SocketOptions,
    /// Per channel, counts since the start (the sequence numbers go on).
    counts: Vec<SendCounts>,
    round: u32,
    last_sent: bool,
    /// [`LiveSender::abort`] was called: nothing more may be sent.
    aborted: bool,
    wire: u64,
    pages: u64,
    start: Instant,
    max_bytes_per_s: Option<u64>,
    /// Channel threads of the rounds before the last yield the CPU to the
    /// guest (see [`LiveSender::set_yield_to_guest`]).
    yield_to_guest: bool,
    /// The protocol version agreed (3, or 2 with an older receiver).
    version: u16,
    /// Bytes read on the main connection and not yet parsed.
    inbox: Vec<u8>,
    /// The receiver's latest `ROUND_RECEIVED` (version 3).
    received: Option<u32>,
    /// Never-populated memory, which the first round skips unread.
    unpopulated: Option<Unpopulated>,
}

/// What the channel threads of one round share.
struct RoundCtx<'a> {
    regions: &'a [MemRegion],
    chunks: &'a Chunks,
    pages: PageSet<'a>,
    channels: u64,
    compression: crate::Compression,
    last: bool,
    /// The channel threads run at a lower priority than the guest's vCPUs.
    background: bool,
    /// Per channel, bytes per second (None: unlimited).
    rate: Option<u64>,
    cancel: &'a AtomicBool,
    fail: Fail,
    unpopulated: Option<&'a Unpopulated>,
}

impl<S: Read + Write + Send + AsRawFd> LiveSender<S> {
    /// Connects to a receiver (`connect` is called `opts.channels + 1` times,
    /// the main connection first) and agrees on the layout of `regions`.
    /// The memory may change while rounds are sent (a running guest): the
    /// caller sends what changed in later rounds.
    pub fn connect(
        connect: &mut dyn FnMut() -> std::io::Result<S>,
        regions: &[MemRegion],
        opts: &SocketOptions,
    ) -> Result<Self, MultifdError> {
        check_send_args(regions, &[], opts)?;
        let (Session { main, conns, wire }, version) = match open_session(
            connect,
            regions,
            opts,
            PROGRESS_PROTOCOL_VERSION,
        ) {
            Ok(s) => (s, PROGRESS_PROTOCOL_VERSION),
            // A receiver that does not know version 3 drops the
            // connection at its hello and waits for another.
            Err(MultifdError::PeerDisconnected {
                channel: Channel::Main,
                during,
            }) => {
                log::info!(
                        "multifd: the receiver closed a version {PROGRESS_PROTOCOL_VERSION} connection ({during}); connecting again with version {LIVE_PROTOCOL_VERSION}, without its progress reports"
                    );
                (
                    open_session(connect, regions, opts, LIVE_PROTOCOL_VERSION)?,
                    LIVE_PROTOCOL_VERSION,
                )
            }
            Err(e) => return Err(e),
        };
        let ps = u64::from(PAGE_SIZE);
        let pages: Vec<u64> = regions.iter().map(|r| r.len() / ps).collect();
        Ok(LiveSender {
            main,
            counts: vec![SendCounts::default(); conns.len()],
            conns,
            regions: regions.to_vec(),
            chunks: Chunks::new(&pages),
            opts: opts.clone(),
            round: 0,
            last_sent: false,
            aborted: false,
            wire,
            pages: 0,
            start: Instant::now(),
            max_bytes_per_s: None,
            yield_to_guest: true,
            version,
            inbox: Vec::new(),
            received: None,
            unpopulated: Unpopulated::find(regions, ps),
        })
    }

    /// The protocol version agreed with the receiver: 3, or 2 with a
    /// receiver that does not send `ROUND_RECEIVED`.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Limits the data channels together to `bytes_per_s` (None: no limit).
    pub fn set_max_bandwidth(&mut self, bytes_per_s: Option<u64>) {
        self.max_bytes_per_s = bytes_per_s.filter(|b| *b > 0);
    }

    /// Whether the channel threads of rounds sent while the guest runs
    /// (all but the last) yield the CPU to it: with `true` (the default)
    /// they run under `SCHED_BATCH` at nice 5, so that vCPUs that keep the
    /// host's CPUs busy keep their speed and the transfer takes longer;
    /// with `false` they run at the caller's priority, like the vCPUs, and
    /// on a host without spare CPUs the transfer ends sooner while the
    /// guest slows. The last round (the guest paused) never yields.
    pub fn set_yield_to_guest(&mut self, yield_to_guest: bool) {
        self.yield_to_guest = yield_to_guest;
    }

    /// The number of the next round.
    pub fn next_round(&self) -> u32 {
        self.round
    }

    /// Sends one round: `pages` on the data channels, each channel's sync
    /// packet (flagged last when `last`), then `ROUND_DONE`. `cancel` stops
    /// the round at the next packet. After an error the transfer is over:
    /// drop the sender (the receiver has been told, best effort).
    pub fn send_round(
        &mut self,
        pages: PageSet<'_>,
        last: bool,
        cancel: &AtomicBool,
    ) -> Result<RoundStats, MultifdError> {
        if self.last_sent || self.aborted {
            return Err(MultifdError::InvalidArgument(
                "the last round was sent already, or the transfer was aborted".into(),
            ));
        }
        crate::pace::check_page_set(pages, &self.regions, u64::from(PAGE_SIZE))?;
        let start = Instant::now();
        let n = self.conns.len() as u64;
        let ctx = RoundCtx {
            regions: &self.regions,
            chunks: &self.chunks,
            pages,
            channels: n,
            compression: self.opts.compression,
            last,
            background: !last && self.yield_to_guest,
            rate: crate::pace::per_channel(self.max_bytes_per_s, self.conns.len()),
            cancel,
            fail: Fail::new(),
            unpopulated: self.unpopulated.as_ref(),
        };
        let before = self.counts.clone();
        run_round(&ctx, &mut self.conns, &mut self.counts);
        if let Some(e) = ctx.fail.take() {
            return Err(sender_failed(&mut self.main, e));
        }
        let mut stats = RoundStats {
            round: self.round,
            elapsed: Duration::ZERO,
            ..Default::default()
        };
        for (now, was) in self.counts.iter().zip(&before) {
            stats.pages += now.count.pages - was.count.pages;
            stats.bytes += now.bytes - was.bytes;
        }
        let done = MainMessage::RoundDone {
            round: self.round,
            channels: self.counts.iter().map(|c| c.count).collect(),
        };
        self.wire +=
            stats.bytes + send_main_messages(&mut self.main, vec![(done, "sending ROUND_DONE")])?;
        self.pages += stats.pages;
        self.round += 1;
        self.last_sent = last;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    /// Ends the transfer after the last round: sends the device state and
    /// `END`, and waits for the receiver's `ACK`. Only an `ACK` is success.
    pub fn finish(mut self, device_state: &[u8]) -> Result<TransferStats, MultifdError> {
        if !self.last_sent || self.aborted {
            return Err(MultifdError::InvalidArgument(
                "finish before the last round, or after an abort".into(),
            ));
        }
        if device_state.len() > crate::MAX_DEVICE_STATE as usize {
            let e = MultifdError::InvalidArgument(format!(
                "device state of {} bytes: at most {}",
                device_state.len(),
                crate::MAX_DEVICE_STATE
            ));
            send_error(&mut self.main, &e);
            return Err(e);
        }
        self.conns.clear();
        self.wire += send_main_messages(
            &mut self.main,
            vec![
                (
                    MainMessage::DeviceState(device_state.to_vec()),
                    "sending the device state",
                ),
                (MainMessage::End, "sending END"),
            ],
        )?;
        let during = "waiting for the receiver's ACK";
        let m = loop {
            match self.next_main(None, during)? {
                Some(MainMessage::RoundReceived { round }) => self.note_received(round)?,
                Some(m) => break m,
                None => {}
            }
        };
        expect_reply(m, "ACK", |m| matches!(m, MainMessage::Ack))?;
        let total: u64 = self.regions.iter().map(|r| r.len()).sum::<u64>() / u64::from(PAGE_SIZE);
        Ok(TransferStats {
            bytes: self.wire,
            present_pages: self.pages,
            zero_pages: total.saturating_sub(self.pages),
            elapsed: self.start.elapsed(),
            direct_io: false,
            channels: self.opts.channels,
        })
    }

    /// Records the receiver's `ROUND_RECEIVED`: a round it was sent, and
    /// none before one it already reported.
    fn note_received(&mut self, round: u32) -> Result<(), MultifdError> {
        if self.version < PROGRESS_PROTOCOL_VERSION
            || round >= self.round
            || self.received.is_some_and(|r| round <= r)
        {
            return Err(MultifdError::Protocol(format!(
                "ROUND_RECEIVED for round {round} (version {}, {} rounds sent, last reported {:?})",
                self.version, self.round, self.received
            )));
        }
        self.received = Some(round);
        Ok(())
    }

    /// The next message on the main connection, from what was read before
    /// and then from the connection: `wait` limits how long this call waits
    /// for bytes (None: until a message is whole). `Ok(None)`: no whole
    /// message within `wait`.
    fn next_main(
        &mut self,
        wait: Option<Duration>,
        during: &str,
    ) -> Result<Option<MainMessage>, MultifdError> {
        loop {
            if self.inbox.len() >= MAIN_HEADER_LEN {
                let h = parse_main_header(&self.inbox)?;
                if self.inbox.len() >= MAIN_HEADER_LEN + h.len as usize + 4 {
                    let (m, n) = parse_main_message(&self.inbox, PAGE_SIZE)?;
                    self.inbox.drain(..n);
                    self.wire += n as u64;
                    return Ok(Some(m));
                }
            }
            if let Some(wait) = wait {
                if !crate::sys::readable(&self.main, wait)
                    .map_err(|e| conn_err(Channel::Main, during, e))?
                {
                    return Ok(None);
                }
            }
            let mut buf = [0u8; 4096];
            let n = loop {
                match self.main.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r.map_err(|e| conn_err(Channel::Main, during, e))?,
                }
            };
            if n == 0 {
                return Err(conn_err(
                    Channel::Main,
                    during,
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            self.inbox.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits until the receiver reports that it has every page of round
    /// `round` (and the rounds before it) in its memory: `Ok(true)`; or at
    /// once `Ok(false)` when it does not report (version 2). A sender that
    /// paused the VM while the receiver still worked through earlier rounds
    /// would hold the VM paused that much longer. `cancel` ends the wait
    /// with [`MultifdError::Aborted`].
    pub fn wait_received(&mut self, round: u32, cancel: &AtomicBool) -> Result<bool, MultifdError> {
        if self.version < PROGRESS_PROTOCOL_VERSION {
            return Ok(false);
        }
        if round >= self.round {
            return Err(MultifdError::InvalidArgument(format!(
                "waiting for round {round}, but {} rounds were sent",
                self.round
            )));
        }
        let during = "waiting for the receiver to take the rounds sent";
        while self.received.is_none_or(|r| r < round) {
            if cancel.load(Ordering::Relaxed) {
                return Err(MultifdError::Aborted("cancelled".into()));
            }
            match self.next_main(Some(Duration::from_millis(20)), during) {
                Ok(Some(MainMessage::RoundReceived { round })) => self.note_received(round)?,
                Ok(Some(MainMessage::Error(msg))) => return Err(MultifdError::Remote(msg)),
                Ok(Some(other)) => {
                    let e = MultifdError::Protocol(format!(
                        "expected ROUND_RECEIVED from the receiver, got {}",
                        other.name()
                    ));
                    send_error(&mut self.main, &e);
                    return Err(e);
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Gives up: tells the receiver why (best effort). Drop the sender
    /// afterwards; no round can follow.
    pub fn abort(&mut self, why: &str) {
        self.aborted = true;
        let _ = write_main(
            &mut self.main,
            &MainMessage::Error(why.to_string()),
            "sending an error",
        );
    }
}

/// Runs one round's channel threads; failures go to `ctx.fail`.
fn run_round<S: Write + Send>(ctx: &RoundCtx<'_>, conns: &mut [S], counts: &mut [SendCounts]) {
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .zip(counts.iter_mut())
            .enumerate()
            .map(|(i, (conn, count))| {
                std::thread::Builder::new()
                    .name(format!("multifd-live-{i}"))
                    .spawn_scoped(s, move || {
                        // The guest runs meanwhile: its vCPUs go first
                        // (unless the caller chose otherwise). The last
                        // round has it paused: no one to yield to, and
                        // every ms is downtime.
                        if ctx.background {
                            crate::sys::background_thread();
                        }
                        if let Err(e) = live_channel(ctx, i as u16, conn, count) {
                            ctx.fail.fail(e);
                        }
                    })
            })
            .collect();
        for h in handles {
            match h {
                Ok(h) => {
                    if h.join().is_err() {
                        ctx.fail
                            .fail(MultifdError::Aborted("a channel thread panicked".into()));
                    }
                }
                Err(e) => ctx
                    .fail
                    .fail(MultifdError::io("starting a channel thread", e)),
            }
        }
    });
}

/// Buffers of one channel thread.
struct Buffers {
    gather: Vec<u8>,
    out: Vec<u8>,
    head: Vec<u8>,
    runs: Vec<page_runs::PageRun>,
    /// Per page of the chunk: never populated (left unread).
    unpopulated: Vec<bool>,
}

/// One channel's part of a round: its chunks, then its sync packet.
fn live_channel<S: Write + ?Sized>(
    ctx: &RoundCtx<'_>,
    ch: u16,
    conn: &mut S,
    c: &mut SendCounts,
) -> Result<(), MultifdError> {
    let ps = PAGE_SIZE as usize;
    let mut compressor = Compressor::new(ctx.compression)?;
    let mut buf = Buffers {
        gather: vec![0u8; MAX_PAGES_PER_PACKET as usize * ps],
        out: if matches!(compressor, Compressor::None) {
            Vec::new()
        } else {
            vec![0u8; Compressor::out_len()]
        },
        head: Vec::with_capacity(PACKET_HEADER_LEN + RUN_LEN * MAX_PAGES_PER_PACKET as usize),
        runs: Vec::with_capacity(MAX_PAGES_PER_PACKET as usize),
        unpopulated: Vec::with_capacity(MAX_PAGES_PER_PACKET as usize),
    };
    let mut pace = Pace::new(ctx.rate);
    let mut idx = u64::from(ch);
    while idx < ctx.chunks.total() {
        if ctx.fail.stopped() {
            return Err(MultifdError::Aborted(format!(
                "data channel {ch} stopped: another channel failed"
            )));
        }
        if ctx.cancel.load(Ordering::Relaxed) {
            return Err(MultifdError::Aborted("cancelled".into()));
        }
        let (r, first) = ctx.chunks.get(idx);
        idx += ctx.channels;
        let len = gather_chunk(ctx, r, first, &mut buf);
        if len == 0 {
            continue;
        }
        let bytes = write_packet(ch, c, r as u32, &mut buf, len, &mut compressor, conn)?;
        pace.wrote(bytes, ctx.cancel);
    }
    let mut sync = PacketHeader::sync(ch, c.count.packets);
    sync.last = ctx.last;
    let sync = sync.encode();
    let crc = crc32c::crc32c(&sync).to_le_bytes();
    let mut iov = [IoSlice::new(&sync), IoSlice::new(&crc)];
    write_all_vectored(conn, &mut iov)
        .and_then(|_| conn.flush())
        .map_err(|e| conn_err(Channel::Data(ch), "sending the sync packet", e))?;
    c.bytes += (PACKET_HEADER_LEN + 4) as u64;
    Ok(())
}

/// Copies the pages of chunk (region `r`, pages from `first`) that the
/// round sends into `buf.gather`, recording their runs; returns the bytes
/// gathered.
fn gather_chunk(ctx: &RoundCtx<'_>, r: usize, first: u64, buf: &mut Buffers) -> usize {
    let ps = PAGE_SIZE as usize;
    let region = &ctx.regions[r];
    let n = (region.len() / ps as u64 - first).min(u64::from(MAX_PAGES_PER_PACKET));
    buf.runs.clear();
    if let PageSet::Dirty(maps) = ctx.pages {
        if !any_dirty(maps[r], first, n) {
            return 0;
        }
    }
    buf.unpopulated.clear();
    if let (PageSet::AllNonZero, Some(u)) = (ctx.pages, ctx.unpopulated) {
        let addr = region.as_ptr() as usize + first as usize * ps;
        u.pages(r, addr, n as usize * ps, ps, &mut buf.unpopulated);
    }
    let mut len = 0;
    for p in first..first + n {
        if let PageSet::Dirty(maps) = ctx.pages {
            if !is_dirty(maps[r], p) {
                continue;
            }
        }
        // Never populated: zeros, which the first round does not send;
        // reading would fault the page in.
        if buf.unpopulated.get((p - first) as usize) == Some(&true) {
            continue;
        }
        let dst = &mut buf.gather[len..len + ps];
        // SAFETY: page `p` < the region's page count lies inside the region,
        // which the MemRegion contract keeps mapped. The guest may write it
        // meanwhile: the copy then mixes old and new bytes (any byte value is
        // a valid u8), and the caller's dirty log sends the page again in a
        // later round. Copying first makes the CRC and the bytes sent agree.
        unsafe {
            std::ptr::copy_nonoverlapping(
                region.as_ptr().add(p as usize * ps),
                dst.as_mut_ptr(),
                ps,
            )
        };
        if matches!(ctx.pages, PageSet::AllNonZero) && page_runs::is_zero(dst) {
            continue;
        }
        page_runs::push_page(&mut buf.runs, p);
        len += ps;
    }
    len
}

/// Sends the gathered pages as one packet (compressed when that makes it
/// smaller); returns the bytes written.
fn write_packet<S: Write + ?Sized>(
    ch: u16,
    c: &mut SendCounts,
    region: u32,
    buf: &mut Buffers,
    len: usize,
    compressor: &mut Compressor,
    conn: &mut S,
) -> Result<u64, MultifdError> {
    let raw = &buf.gather[..len];
    let (encoding, payload) = match compressor.compress(raw, &mut buf.out) {
        Some((enc, n)) => (enc, &buf.out[..n]),
        None => (Encoding::Raw, raw),
    };
    let page_count = (len / PAGE_SIZE as usize) as u32;
    let h = PacketHeader {
        channel: ch,
        sequence: c.count.packets,
        region,
        page_count,
        run_count: buf.runs.len() as u32,
        encoding,
        sync: false,
        last: false,
        payload_len: payload.len() as u32,
    };
    buf.head.clear();
    buf.head.extend_from_slice(&h.encode());
    for run in &buf.runs {
        let run = Run {
            first_page: run.start,
            count: run.len() as u32,
        };
        buf.head.extend_from_slice(&run.encode());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf.head), payload).to_le_bytes();
    let mut iov = [
        IoSlice::new(&buf.head),
        IoSlice::new(payload),
        IoSlice::new(&crc),
    ];
    write_all_vectored(conn, &mut iov).map_err(|e| {
        conn_err(
            Channel::Data(ch),
            format!("sending packet {} (region {region})", h.sequence),
            e,
        )
    })?;
    let bytes = (buf.head.len() + payload.len() + 4) as u64;
    c.bytes += bytes;
    c.count.packets += 1;
    c.count.pages += u64::from(page_count);
    Ok(bytes)
}
