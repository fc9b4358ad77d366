//! Socket channels: round trips over Unix socket pairs and TCP with 1, 2, 4
//! channels and each compression; disconnects on either side.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{allocator, filled_regions, with_receiver, Anon, RecvResult, PAGE};
use multifd::{
    parse_endpoint, receive, send, Channel, Compression, MemRegion, MultifdError, SocketOptions,
    TransferStats,
};

const SIZES: [u64; 2] = [8 << 20, 4 << 20];
const GUEST: [u64; 2] = [0, 1 << 32];

fn source(seed: u64) -> Vec<Anon> {
    filled_regions(&SIZES, seed)
}

fn regions(mems: &[Anon]) -> Vec<MemRegion> {
    mems.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect()
}

/// A stream that fails (and shuts the socket down) after `limit` bytes
/// written, or flips one bit of the byte at `corrupt_at`.
struct Faulty {
    inner: UnixStream,
    written: u64,
    limit: u64,
    corrupt_at: u64,
}

impl Faulty {
    fn new(inner: UnixStream) -> Faulty {
        Faulty {
            inner,
            written: 0,
            limit: u64::MAX,
            corrupt_at: u64::MAX,
        }
    }
}

impl Read for Faulty {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.limit {
            let _ = self.inner.shutdown(std::net::Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "injected failure",
            ));
        }
        let n = buf.len().min((self.limit - self.written) as usize);
        let mut b = buf[..n].to_vec();
        if (self.written..self.written + n as u64).contains(&self.corrupt_at) {
            b[(self.corrupt_at - self.written) as usize] ^= 0x04;
        }
        let w = self.inner.write(&b)?;
        self.written += w as u64;
        Ok(w)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type SendResult = Result<TransferStats, MultifdError>;

/// Runs a transfer over Unix socket pairs; `tweak(i, stream)` can make the
/// sender's i-th connection (0 = main) faulty.
fn run_pairs(
    channels: usize,
    compression: Compression,
    state: &[u8],
    src: &[Anon],
    tweak: &(dyn Fn(usize, &mut Faulty) + Sync),
) -> (SendResult, RecvResult, Vec<Anon>) {
    let regs = regions(src);
    with_receiver(|tx: &mpsc::Sender<Faulty>| {
        let mut i = 0;
        let opts = SocketOptions {
            channels,
            compression,
        };
        send(
            &mut || {
                let (a, b) = UnixStream::pair()?;
                let mut a = Faulty::new(a);
                tweak(i, &mut a);
                i += 1;
                tx.send(Faulty::new(b))
                    .map_err(|_| io::Error::other("receiver gone"))?;
                Ok(a)
            },
            &regs,
            state,
            &opts,
        )
    })
}

fn check_same(a: &[Anon], b: &[Anon]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!(x.bytes() == y.bytes(), "memory differs");
    }
}

#[test]
fn round_trip_unix_pairs() {
    let src = source(1);
    let state: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
    let total = SIZES.iter().sum::<u64>() / PAGE;
    for ch in [1, 2, 4] {
        for comp in [Compression::None, Compression::Zstd(1), Compression::Lz4] {
            let (sent, received, mems) = run_pairs(ch, comp, &state, &src, &|_, _| {});
            let sent = sent.unwrap_or_else(|e| panic!("{ch} {comp:?}: {e}"));
            let (got_state, rstats) = received.unwrap();
            assert_eq!(got_state, state);
            check_same(&src, &mems);
            assert_eq!(sent.present_pages, rstats.present_pages);
            assert_eq!(sent.present_pages + sent.zero_pages, total);
            assert_eq!(rstats.present_pages + rstats.zero_pages, total);
            assert_eq!(sent.bytes, rstats.bytes, "{ch} {comp:?}: wire bytes");
            assert_eq!((sent.channels, rstats.channels), (ch, ch));
            let raw = sent.present_pages * PAGE;
            if comp == Compression::None {
                assert!(sent.bytes > raw);
            } else {
                assert!(
                    sent.bytes < raw,
                    "{comp:?} did not compress: {} >= {raw}",
                    sent.bytes
                );
            }
        }
    }
}

#[test]
fn round_trip_tcp() {
    let src = source(2);
    let regs = regions(&src);
    let state = b"device state".to_vec();
    for ch in [1, 2, 4] {
        for comp in [Compression::None, Compression::Zstd(3), Compression::Lz4] {
            let listener = parse_endpoint("tcp:127.0.0.1:0").unwrap().listen().unwrap();
            let ep = listener.local_endpoint().unwrap();
            let keep = Arc::new(Mutex::new(Vec::new()));
            let (sent, received) = std::thread::scope(|s| {
                let k = keep.clone();
                let l = &listener;
                let r = s.spawn(move || l.receive(Duration::from_secs(20), &mut allocator(k)));
                let opts = SocketOptions {
                    channels: ch,
                    compression: comp,
                };
                let sent = send(&mut || ep.connect(), &regs, &state, &opts);
                (sent, r.join().unwrap())
            });
            let sent = sent.unwrap();
            let (got, rstats) = received.unwrap();
            assert_eq!(got, state);
            assert_eq!(sent.bytes, rstats.bytes);
            check_same(&src, &keep.lock().unwrap());
        }
    }
}

#[test]
fn round_trip_unix_listener_all_zero_and_empty_state() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("multifd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let ep = parse_endpoint(&format!("unix:{}", path.display())).unwrap();
    let listener = ep.listen().unwrap();
    let src = vec![Anon::new(3 << 20)];
    let regs = regions(&src);
    let keep = Arc::new(Mutex::new(Vec::new()));
    let (sent, received) = std::thread::scope(|s| {
        let k = keep.clone();
        let l = &listener;
        let r = s.spawn(move || l.receive(Duration::from_secs(20), &mut allocator(k)));
        let opts = SocketOptions {
            channels: 3,
            compression: Compression::Lz4,
        };
        (
            send(&mut || ep.connect(), &regs, &[], &opts),
            r.join().unwrap(),
        )
    });
    let sent = sent.unwrap();
    assert_eq!(sent.present_pages, 0);
    assert_eq!(sent.zero_pages, (3 << 20) / PAGE);
    let (state, _) = received.unwrap();
    assert!(state.is_empty());
    check_same(&src, &keep.lock().unwrap());
    drop(listener);
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn data_connection_dies_mid_transfer() {
    let src = source(3);
    // (channels, victim connection, bytes it gets through): each case fails
    // for sure (one channel carries everything; every channel sends at
    // least a 40-byte hello and a 44-byte sync packet).
    for (channels, victim, after) in [
        (1, 1usize, 100_000u64),
        (1, 1, 3_000_000),
        (2, 2, 45),
        (4, 1, 60),
    ] {
        let (sent, received, _) = run_pairs(channels, Compression::None, b"s", &src, &|i, f| {
            if i == victim {
                f.limit = after;
            }
        });
        let se = sent.expect_err("the sender must fail");
        let re = received.expect_err("the receiver must never return Ok");
        eprintln!("sender: {se}\nreceiver: {re}");
        assert!(
            matches!(
                &re,
                MultifdError::PeerDisconnected { .. } | MultifdError::Remote(_)
            ),
            "{re}"
        );
    }
}

#[test]
fn main_connection_dies() {
    let src = source(4);
    // After the hello and layout, in the middle of the device state.
    for after in [40u64, 300] {
        let (sent, received, _) = run_pairs(2, Compression::None, &[7; 1000], &src, &|i, f| {
            if i == 0 {
                f.limit = after;
            }
        });
        let se = sent.expect_err("the sender must fail");
        let re = received.expect_err("the receiver must never return Ok");
        eprintln!("sender: {se}\nreceiver: {re}");
        assert!(
            matches!(
                &re,
                MultifdError::PeerDisconnected {
                    channel: Channel::Main,
                    ..
                }
            ),
            "{re}"
        );
    }
}

#[test]
fn corrupted_packet_is_detected() {
    let src = source(5);
    for comp in [Compression::None, Compression::Lz4] {
        // Corrupt a byte well inside channel 0's stream (after its hello).
        let (sent, received, _) = run_pairs(1, comp, b"s", &src, &|i, f| {
            if i == 1 {
                f.corrupt_at = 40 + 200_000;
            }
        });
        let re = received.expect_err("the receiver must fail");
        let se = sent.expect_err("the sender must fail");
        eprintln!("sender: {se}\nreceiver: {re}");
        assert!(
            matches!(re, MultifdError::Checksum(_) | MultifdError::Protocol(_)),
            "{re}"
        );
        let msg = se.to_string();
        assert!(
            msg.contains("checksum") || msg.contains("protocol"),
            "{msg}"
        );
    }
}

#[test]
fn receiver_refuses_the_memory() {
    let src = source(6);
    let regs = regions(&src);
    let (tx, rx) = mpsc::channel::<UnixStream>();
    let (sent, received) = std::thread::scope(|s| {
        let r = s.spawn(move || {
            receive(
                &mut || {
                    rx.recv_timeout(Duration::from_secs(20))
                        .map_err(|_| io::Error::other("no more"))
                },
                &mut |_| Err("not enough memory for 12 MiB".into()),
            )
        });
        let opts = SocketOptions {
            channels: 2,
            compression: Compression::None,
        };
        let sent = send(
            &mut || {
                let (a, b) = UnixStream::pair()?;
                tx.send(b).map_err(|_| io::Error::other("gone"))?;
                Ok(a)
            },
            &regs,
            b"",
            &opts,
        );
        drop(tx);
        (sent, r.join().unwrap())
    });
    let se = sent.unwrap_err();
    assert!(
        matches!(&se, MultifdError::Remote(m) if m.contains("not enough memory")),
        "{se}"
    );
    assert!(matches!(received.unwrap_err(), MultifdError::Caller { .. }));
}

/// A receiver that reads everything but closes without sending the ACK.
#[test]
fn receiver_closes_before_ack() {
    let src = source(7);
    let regs = regions(&src);
    let (tx, rx) = mpsc::channel::<UnixStream>();
    let sent = std::thread::scope(|s| {
        s.spawn(move || {
            let mut main = rx.recv().unwrap();
            let mut buf = vec![0u8; 40];
            main.read_exact(&mut buf).unwrap();
            let h = multifd::parse_hello(&buf).unwrap();
            // The layout message.
            let mut hdr = [0u8; 8];
            main.read_exact(&mut hdr).unwrap();
            let mh = multifd::parse_main_header(&hdr).unwrap();
            let mut rest = vec![0u8; mh.len as usize + 4];
            main.read_exact(&mut rest).unwrap();
            main.write_all(&multifd::MainMessage::Ready.encode())
                .unwrap();
            let readers: Vec<_> = (0..h.channels)
                .map(|_| {
                    let mut c = rx.recv().unwrap();
                    std::thread::spawn(move || {
                        let mut sink = Vec::new();
                        let _ = c.read_to_end(&mut sink);
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
            // Read ROUND_DONE, DEVICE_STATE, END, then close.
            let mut sink = Vec::new();
            main.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let _ = main.read_to_end(&mut sink);
            drop(main);
        });
        let opts = SocketOptions {
            channels: 2,
            compression: Compression::None,
        };
        send(
            &mut || {
                let (a, b) = UnixStream::pair()?;
                tx.send(b).map_err(|_| io::Error::other("gone"))?;
                Ok(a)
            },
            &regs,
            b"state",
            &opts,
        )
    });
    let e = sent.expect_err("no ACK, no success");
    assert!(
        matches!(&e, MultifdError::PeerDisconnected { channel: Channel::Main, during } if during.contains("ACK")),
        "{e}"
    );
}

/// A 2-channel transfer whose receiver is handed, as its `n`th accepted
/// connection (from 1), whatever `extra(n)` returns instead of the next real
/// one; `None` means the real one. The transfer must still succeed.
fn transfer_with_extra_connections(
    mut extra: impl FnMut(usize) -> Option<io::Result<UnixStream>> + Send,
) {
    let src = source(8);
    let regs = regions(&src);
    let (tx, rx) = mpsc::channel::<UnixStream>();
    let keep = Arc::new(Mutex::new(Vec::new()));
    let (sent, received) = std::thread::scope(|s| {
        let k = keep.clone();
        let r = s.spawn(move || {
            let mut n = 0;
            let mut alloc = allocator(k);
            receive(
                &mut || {
                    n += 1;
                    extra(n).unwrap_or_else(|| {
                        rx.recv_timeout(Duration::from_secs(20))
                            .map_err(|_| io::Error::other("no more"))
                    })
                },
                &mut alloc,
            )
        });
        let opts = SocketOptions {
            channels: 2,
            compression: Compression::None,
        };
        let sent = send(
            &mut || {
                let (a, b) = UnixStream::pair()?;
                tx.send(b).map_err(|_| io::Error::other("gone"))?;
                Ok(a)
            },
            &regs,
            b"x",
            &opts,
        );
        drop(tx);
        (sent, r.join().unwrap())
    });
    sent.unwrap();
    received.unwrap();
    check_same(&src, &keep.lock().unwrap());
}

/// A connection whose peer wrote `bytes` (nothing: it connected and closed).
fn connection_sending(bytes: &[u8]) -> io::Result<UnixStream> {
    let (mut a, b) = UnixStream::pair()?;
    a.write_all(bytes)?;
    Ok(b)
}

#[test]
fn stray_connections_are_skipped() {
    let other_session = multifd::Hello {
        version: multifd::PROTOCOL_VERSION,
        role: multifd::Role::Data,
        compression: multifd::Encoding::Raw,
        channel: 0,
        channels: 2,
        session: 12345,
        page_size: 4096,
    };
    // Among the data connections: garbage, then a hello of another session.
    transfer_with_extra_connections(|n| match n {
        2 => Some(connection_sending(&[0x55; 40])),
        4 => Some(connection_sending(&other_session.encode())),
        _ => None,
    });
}

#[test]
fn probes_before_the_main_connection_are_skipped() {
    // A readiness probe that connects and closes at once, then a stray
    // client that sends garbage, before the sender's main connection.
    transfer_with_extra_connections(|n| match n {
        1 => Some(connection_sending(&[])),
        2 => Some(connection_sending(&[0x55; 40])),
        _ => None,
    });
}

#[test]
fn bad_options() {
    let src = source(9);
    let regs = regions(&src);
    let mut never = || -> io::Result<UnixStream> { Err(io::Error::other("not called")) };
    for (ch, comp) in [
        (0, Compression::None),
        (65, Compression::None),
        (1, Compression::Zstd(1000)),
    ] {
        let opts = SocketOptions {
            channels: ch,
            compression: comp,
        };
        assert!(matches!(
            send(&mut never, &regs, b"", &opts),
            Err(MultifdError::InvalidArgument(_))
        ));
    }
    let opts = SocketOptions {
        channels: 1,
        compression: Compression::None,
    };
    let e = send(&mut never, &regs, b"", &opts).unwrap_err();
    assert!(
        e.to_string().contains("connecting the main connection"),
        "{e}"
    );
}

#[test]
fn a_refused_device_state_gets_no_ack_and_the_sender_is_told_why() {
    let src = source(2);
    let regs = regions(&src);
    let listener = parse_endpoint("tcp:127.0.0.1:0").unwrap().listen().unwrap();
    let ep = listener.local_endpoint().unwrap();
    let keep = Arc::new(Mutex::new(Vec::new()));
    let (sent, received) = std::thread::scope(|s| {
        let l = &listener;
        let r = s.spawn(move || {
            l.receive_checked(
                Duration::from_secs(20),
                &mut allocator(keep),
                &mut |state| {
                    assert_eq!(state, b"needs disk.raw");
                    Err("disk.raw is missing here".into())
                },
            )
        });
        let opts = SocketOptions {
            channels: 2,
            compression: Compression::None,
        };
        let sent = send(&mut || ep.connect(), &regs, b"needs disk.raw", &opts);
        (sent, r.join().unwrap())
    });
    let received = received.unwrap_err().to_string();
    assert!(received.contains("disk.raw is missing here"), "{received}");
    let sent = sent.unwrap_err();
    assert!(matches!(sent, MultifdError::Remote(_)), "{sent}");
    assert!(
        sent.to_string().contains("disk.raw is missing here"),
        "{sent}"
    );
}
