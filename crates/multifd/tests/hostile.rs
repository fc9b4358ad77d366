//! A receiver fed hand-made hostile streams: it must fail cleanly (never Ok
//! with half-loaded memory, never panic).

mod common;

use std::io::Cursor;
use std::path::Path;

use common::wire::{
    self, hello, hello_v, packet, page, round_done, round_done_n, sync, sync_last, Mem,
};
use common::Anon;
use multifd::{receive, Encoding, MainMessage, MultifdError, Role};

type Received = Result<(Vec<u8>, multifd::TransferStats), MultifdError>;

fn run(main: Vec<u8>, data: Vec<Vec<u8>>) -> (Received, Vec<Anon>) {
    let mut conns = std::iter::once(main)
        .chain(data)
        .map(|b| Mem(Cursor::new(b)));
    let mut mems = Vec::new();
    let r = receive(
        &mut || {
            conns
                .next()
                .ok_or_else(|| std::io::Error::other("no more connections"))
        },
        &mut |layout| {
            let mut out = Vec::new();
            for &(g, s) in layout {
                if s > 64 << 20 {
                    return Err("too big".into());
                }
                let a = Anon::new(s as usize);
                out.push(a.region(g));
                mems.push(a);
            }
            Ok(out)
        },
    );
    (r, mems)
}

#[test]
fn valid_crafted_stream_loads() {
    let (main, data) = wire::valid(b"dev");
    let (r, mems) = run(main, data);
    let (state, stats) = r.unwrap();
    assert_eq!(state, b"dev");
    assert_eq!(stats.present_pages, 7);
    assert_eq!(stats.zero_pages, 20 - 7);
    let m0 = mems[0].bytes();
    assert_eq!(&m0[..4096], &page(1)[..]);
    assert_eq!(&m0[5 * 4096..6 * 4096], &page(3)[..]);
    assert_eq!(&m0[11 * 4096..12 * 4096], &page(4)[..]);
    assert_eq!(&m0[15 * 4096..16 * 4096], &page(5)[..]);
    assert!(m0[2 * 4096..5 * 4096].iter().all(|&b| b == 0));
    assert_eq!(&mems[1].bytes()[3 * 4096..], &page(9)[..]);
}

/// The pieces of the valid stream, to be altered one at a time.
struct Parts {
    main_hello: Vec<u8>,
    layout: Vec<u8>,
    round: Vec<u8>,
    state: Vec<u8>,
    end: Vec<u8>,
    d0: Vec<Vec<u8>>,
    d1: Vec<Vec<u8>>,
}

impl Parts {
    fn new() -> Parts {
        let pages: Vec<u8> = [page(1), page(2), page(3)].concat();
        let raw: Vec<u8> = [page(4), page(4), page(5)].concat();
        Parts {
            main_hello: hello(Role::Main, 0, 2, Encoding::Lz4),
            layout: MainMessage::RamLayout(vec![(0, 16 * 4096), (1 << 20, 4 * 4096)]).encode(),
            round: round_done(&[(2, 4), (1, 3)]),
            state: MainMessage::DeviceState(b"dev".to_vec()).encode(),
            end: MainMessage::End.encode(),
            d0: vec![
                hello(Role::Data, 0, 2, Encoding::Lz4),
                packet(0, 0, 0, &[(0, 2), (5, 1)], Encoding::Raw, &pages),
                packet(0, 1, 1, &[(3, 1)], Encoding::Raw, &page(9)),
                sync(0, 2),
            ],
            d1: vec![
                hello(Role::Data, 1, 2, Encoding::Lz4),
                packet(
                    1,
                    0,
                    0,
                    &[(10, 2), (15, 1)],
                    Encoding::Lz4,
                    &lz4_flex::block::compress(&raw),
                ),
                sync(1, 1),
            ],
        }
    }

    fn run(self) -> Received {
        let main = [
            self.main_hello,
            self.layout,
            self.round,
            self.state,
            self.end,
        ]
        .concat();
        run(main, vec![self.d0.concat(), self.d1.concat()]).0
    }
}

fn fails(name: &str, f: impl FnOnce(&mut Parts), check: impl Fn(&MultifdError) -> bool) {
    let mut p = Parts::new();
    f(&mut p);
    match p.run() {
        Ok(_) => panic!("{name}: the receiver returned Ok"),
        Err(e) => {
            eprintln!("{name}: {e}");
            assert!(check(&e), "{name}: unexpected error {e:?}");
        }
    }
}

fn protocol(e: &MultifdError) -> bool {
    matches!(e, MultifdError::Protocol(_))
}

#[test]
fn hostile_streams_fail() {
    assert!(Parts::new().run().is_ok());
    fails(
        "duplicate page on another channel",
        |p| {
            p.d1[1] = packet(1, 0, 0, &[(5, 1)], Encoding::Raw, &page(7));
            p.round = round_done(&[(2, 4), (1, 1)]);
        },
        protocol,
    );
    fails(
        "sequence gap",
        |p| p.d0[2] = packet(0, 5, 1, &[(3, 1)], Encoding::Raw, &page(9)),
        protocol,
    );
    fails(
        "wrong channel in packet",
        |p| p.d0[2] = packet(1, 1, 1, &[(3, 1)], Encoding::Raw, &page(9)),
        protocol,
    );
    fails(
        "region out of range",
        |p| p.d0[2] = packet(0, 1, 2, &[(3, 1)], Encoding::Raw, &page(9)),
        protocol,
    );
    fails(
        "run outside the region",
        |p| p.d0[2] = packet(0, 1, 1, &[(4, 1)], Encoding::Raw, &page(9)),
        protocol,
    );
    fails(
        "round counts disagree",
        |p| p.round = round_done(&[(2, 4), (2, 3)]),
        protocol,
    );
    fails(
        "round with too few channels",
        |p| p.round = round_done(&[(2, 4)]),
        protocol,
    );
    fails(
        "zstd on an lz4 connection",
        |p| {
            let z = zstd::bulk::compress(&page(9), 1).unwrap();
            p.d0[2] = packet(0, 1, 1, &[(3, 1)], Encoding::Zstd, &z);
        },
        protocol,
    );
    fails(
        "lz4 decoding to the wrong size",
        |p| {
            let l = lz4_flex::block::compress(&[page(9), page(9)].concat());
            p.d0[2] = packet(0, 1, 1, &[(3, 1)], Encoding::Lz4, &l[..l.len().min(4095)]);
        },
        protocol,
    );
    fails(
        "lz4 garbage",
        |p| p.d0[2] = packet(0, 1, 1, &[(3, 1)], Encoding::Lz4, &[0xf0; 300]),
        protocol,
    );
    fails(
        "payload corrupted",
        |p| {
            let n = p.d0[1].len();
            p.d0[1][n - 100] ^= 1;
        },
        |e| matches!(e, MultifdError::Checksum(_)),
    );
    fails(
        "header corrupted",
        |p| p.d0[1][20] ^= 1,
        |e| matches!(e, MultifdError::Checksum(_)),
    );
    fails(
        "no sync packet",
        |p| {
            p.d0.pop();
        },
        |e| matches!(e, MultifdError::PeerDisconnected { .. }),
    );
    fails(
        "data stream cut inside a packet",
        |p| {
            p.d0[1].truncate(3000);
            p.d0.truncate(2);
        },
        |e| matches!(e, MultifdError::PeerDisconnected { .. }),
    );
    fails(
        "no END",
        |p| p.end.clear(),
        |e| matches!(e, MultifdError::PeerDisconnected { .. }),
    );
    fails(
        "device state before ROUND_DONE",
        |p| std::mem::swap(&mut p.round, &mut p.state),
        protocol,
    );
    fails(
        "END before the device state",
        |p| {
            p.state.clear();
        },
        protocol,
    );
    fails(
        "duplicate data channel",
        |p| p.d1[0] = hello(Role::Data, 0, 2, Encoding::Lz4),
        protocol,
    );
    fails(
        "data hello with another page size",
        |p| {
            p.d1[0] = multifd::Hello {
                version: multifd::PROTOCOL_VERSION,
                role: Role::Data,
                compression: Encoding::Lz4,
                channel: 1,
                channels: 2,
                session: wire::SESSION,
                page_size: 8192,
            }
            .encode()
            .to_vec();
        },
        protocol,
    );
    fails(
        "sender error message",
        |p| p.round = MainMessage::Error("sender gave up".into()).encode(),
        |e| matches!(e, MultifdError::Remote(m) if m == "sender gave up"),
    );
    // A data hello where the main connection should be is skipped like a
    // stray (so are the data connections after it); with no main connection
    // ever coming, accepting fails.
    fails(
        "main connection is a data hello",
        |p| p.main_hello = hello(Role::Data, 0, 2, Encoding::Lz4),
        |e| matches!(e, MultifdError::Io { context, .. } if context.contains("accepting the main connection")),
    );
    fails(
        "huge layout",
        |p| p.layout = MainMessage::RamLayout(vec![(0, 1 << 40)]).encode(),
        |e| matches!(e, MultifdError::Caller { .. }),
    );
    fails(
        "only strays",
        |p| {
            let stray = multifd::Hello {
                version: multifd::PROTOCOL_VERSION,
                role: Role::Data,
                compression: Encoding::Lz4,
                channel: 1,
                channels: 2,
                session: 1,
                page_size: 4096,
            }
            .encode()
            .to_vec();
            p.d0[0] = stray.clone();
            p.d1[0] = stray;
        },
        |e| matches!(e, MultifdError::Io { .. }),
    );
}

#[test]
fn valid_live_stream_loads_the_latest_pages() {
    let (main, data) = wire::valid_live(b"live");
    let (r, mems) = run(main, data);
    let (state, stats) = r.unwrap();
    assert_eq!(state, b"live");
    assert_eq!(stats.present_pages, 4);
    let m0 = mems[0].bytes();
    assert_eq!(&m0[..4096], &page(1)[..]);
    assert_eq!(&m0[4096..2 * 4096], &page(7)[..], "round 1 wins");
    assert_eq!(&mems[1].bytes()[3 * 4096..], &page(9)[..]);
}

#[test]
fn valid_version_3_stream_loads_the_latest_pages() {
    let (main, data) = wire::valid_live_v(multifd::PROGRESS_PROTOCOL_VERSION, b"v3");
    let (r, mems) = run(main, data);
    assert_eq!(r.unwrap().0, b"v3");
    assert_eq!(
        &mems[0].bytes()[4096..2 * 4096],
        &page(7)[..],
        "round 1 wins"
    );
}

#[test]
fn hostile_live_streams_fail() {
    const V: u16 = multifd::LIVE_PROTOCOL_VERSION;
    type Alter = Box<dyn Fn(&mut Vec<u8>, &mut Vec<Vec<u8>>)>;
    let cases: Vec<(&str, Alter)> = vec![
        (
            "a region 0 packet on channel 1 (not its chunk)",
            Box::new(|_, d| {
                d[1] = hello_v(V, Role::Data, 1, 2, Encoding::Raw);
                d[1].extend(packet(1, 0, 0, &[(3, 1)], Encoding::Raw, &page(9)));
                d[1].extend(sync(1, 1));
                d[1].extend(sync_last(1, 1));
            }),
        ),
        (
            "the last sync missing",
            Box::new(|_, d| {
                let cut = d[1].len() - 44;
                d[1].truncate(cut);
            }),
        ),
        (
            "a skipped round number",
            Box::new(|m, _| {
                let (main, _) = wire::valid_live(b"live");
                let r0 = round_done_n(0, &[(1, 2), (1, 1)]);
                let at = main.windows(r0.len()).position(|w| w == r0).unwrap();
                m.clear();
                m.extend(&main[..at + r0.len()]);
                m.extend(round_done_n(2, &[(2, 3), (1, 1)]));
                m.extend(MainMessage::DeviceState(b"live".to_vec()).encode());
                m.extend(MainMessage::End.encode());
            }),
        ),
        (
            "a LAST flag in a version 1 transfer",
            Box::new(|m, d| {
                let (main, data) = wire::valid(b"dev");
                *m = main;
                *d = data;
                let cut = d[1].len() - 44;
                d[1].truncate(cut);
                d[1].extend(sync_last(1, 1));
            }),
        ),
    ];
    for (what, alter) in cases {
        let (mut main, mut data) = wire::valid_live(b"live");
        alter(&mut main, &mut data);
        let (r, _) = run(main, data);
        assert!(r.is_err(), "{what}: accepted");
    }
}

/// Regenerates the fuzz seed corpus: `cargo test -p multifd --test hostile -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let recv = fuzz.join("receive");
    let pkt = fuzz.join("packet");
    std::fs::create_dir_all(&recv).unwrap();
    std::fs::create_dir_all(&pkt).unwrap();
    let (main, data) = wire::valid(b"device state");
    std::fs::write(recv.join("seed-valid"), wire::pack(&main, &data)).unwrap();
    let (main, data) = wire::valid(b"");
    std::fs::write(
        recv.join("seed-valid-empty-state"),
        wire::pack(&main, &data[..1]),
    )
    .unwrap();
    let p = Parts::new();
    for (i, b) in p.d0[1..].iter().chain(&p.d1[1..]).enumerate() {
        std::fs::write(pkt.join(format!("seed-packet-{i}")), b).unwrap();
    }
    std::fs::write(pkt.join("seed-hello"), &p.main_hello).unwrap();
    let (main, data) = wire::valid_live(b"live state");
    std::fs::write(recv.join("seed-valid-live"), wire::pack(&main, &data)).unwrap();
    std::fs::write(pkt.join("seed-hello-live"), &data[0][..40]).unwrap();
    let (main, data) = wire::valid_live_v(multifd::PROGRESS_PROTOCOL_VERSION, b"progress");
    std::fs::write(recv.join("seed-valid-progress"), wire::pack(&main, &data)).unwrap();
    std::fs::write(
        pkt.join("seed-round-received"),
        MainMessage::RoundReceived { round: 1 }.encode(),
    )
    .unwrap();
    std::fs::write(pkt.join("seed-sync-last"), sync_last(1, 5)).unwrap();
    std::fs::write(
        pkt.join("seed-main"),
        [p.layout, p.round, p.state, p.end].concat(),
    )
    .unwrap();
    let z = zstd::bulk::compress(&[page(3), page(4)].concat(), 3).unwrap();
    std::fs::write(
        pkt.join("seed-zstd"),
        packet(0, 0, 1, &[(0, 2)], Encoding::Zstd, &z),
    )
    .unwrap();
}
