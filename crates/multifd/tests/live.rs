//! Live transfers (protocol version 2): rounds of pages while the memory
//! changes, the last round and the device state, over Unix socket pairs;
//! cancel and abort.

mod common;

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use common::{fill, filled_regions, with_receiver, Anon, RecvResult, PAGE};
use multifd::{Compression, LiveSender, MemRegion, MultifdError, PageSet, SocketOptions};

const SIZES: [u64; 2] = [8 << 20, 4 << 20];
const GUEST: [u64; 2] = [0, 1 << 32];

fn source(seed: u64) -> Vec<Anon> {
    filled_regions(&SIZES, seed)
}

/// Runs `send` against a receiving thread over Unix socket pairs.
fn over_pairs<T>(
    send: impl FnOnce(&mut dyn FnMut() -> io::Result<UnixStream>) -> T,
) -> (T, RecvResult, Vec<Anon>) {
    with_receiver(|tx: &mpsc::Sender<UnixStream>| {
        send(&mut || {
            let (a, b) = UnixStream::pair()?;
            tx.send(b).map_err(|_| io::Error::other("receiver gone"))?;
            Ok(a)
        })
    })
}

/// Writes `pages` of region `r` (a new pattern, or zeros for every third
/// one) and marks them in `dirty`.
fn touch(mem: &mut [Anon], dirty: &mut [Vec<u64>], r: usize, pages: &[u64], seed: u64) {
    for (k, &p) in pages.iter().enumerate() {
        let at = (p * PAGE) as usize;
        let page = &mut mem[r].bytes_mut()[at..at + PAGE as usize];
        if k % 3 == 2 {
            page.fill(0);
        } else {
            fill(page, seed + p);
        }
        dirty[r][(p / 64) as usize] |= 1 << (p % 64);
    }
}

fn clean_maps() -> Vec<Vec<u64>> {
    SIZES
        .iter()
        .map(|s| vec![0u64; (s / PAGE).div_ceil(64) as usize])
        .collect()
}

#[test]
fn rounds_bring_the_receiver_up_to_date() {
    let no_cancel = AtomicBool::new(false);
    for channels in [1, 2, 3] {
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd(1)] {
            let mut src = source(7);
            // A page that starts zero and gets written later.
            src[1].bytes_mut()[..PAGE as usize].fill(0);
            let regs: Vec<MemRegion> = src.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect();
            let opts = SocketOptions {
                channels,
                compression,
            };
            let state = b"the device state".to_vec();
            let (sent, received, mems) = over_pairs(|connect| {
                let mut tx = LiveSender::connect(connect, &regs, &opts)?;
                assert_eq!(tx.version(), multifd::PROGRESS_PROTOCOL_VERSION);
                let first = tx.send_round(PageSet::AllNonZero, false, &no_cancel)?;
                assert_eq!(first.round, 0);
                assert!(tx.wait_received(0, &no_cancel)?);
                assert!(matches!(
                    tx.wait_received(1, &no_cancel),
                    Err(MultifdError::InvalidArgument(_))
                ));
                for round in 1..4u64 {
                    let mut dirty = clean_maps();
                    touch(&mut src, &mut dirty, 0, &[3, 4, 5, 300, 2047], round * 100);
                    touch(
                        &mut src,
                        &mut dirty,
                        1,
                        &[0, 511, 700 + round],
                        round * 1000,
                    );
                    let maps: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
                    let stats = tx.send_round(PageSet::Dirty(&maps), round == 3, &no_cancel)?;
                    assert_eq!(stats.pages, 8, "round {round}");
                    assert_eq!(stats.round as u64, round);
                    // Round 2's report is left unread: finish skips it.
                    if round == 1 {
                        assert!(tx.wait_received(1, &no_cancel)?);
                    }
                }
                tx.finish(&state)
            });
            let what = format!("{channels} channels, {compression:?}");
            let sent = sent.unwrap_or_else(|e| panic!("{what}: {e}"));
            let (got, rstats) = received.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, state);
            assert_eq!(sent.present_pages, rstats.present_pages, "{what}");
            assert_eq!(sent.bytes, rstats.bytes, "{what}: wire bytes");
            for (a, b) in src.iter().zip(&mems) {
                assert!(a.bytes() == b.bytes(), "{what}: memory differs");
            }
        }
    }
}

/// A receiver from before version 3 drops a connection whose hello it does
/// not know and waits for the next: the sender connects again with
/// version 2, and waits for no reports.
#[test]
fn a_receiver_without_version_3_gets_version_2() {
    let no_cancel = AtomicBool::new(false);
    let src = source(5);
    let regs: Vec<MemRegion> = src.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect();
    let opts = SocketOptions {
        channels: 2,
        compression: Compression::None,
    };
    let mut refused = 0;
    let (sent, received, mems) = with_receiver(|to_receiver: &mpsc::Sender<UnixStream>| {
        let mut connect = || {
            let (a, mut b) = UnixStream::pair()?;
            if refused == 0 {
                // What an older receiver does: read the hello, refuse it.
                refused += 1;
                std::thread::spawn(move || {
                    let mut hello = [0u8; multifd::HELLO_LEN];
                    let read = io::Read::read_exact(&mut b, &mut hello);
                    let version = u16::from_le_bytes([hello[8], hello[9]]);
                    assert!(read.is_ok() && version == multifd::PROGRESS_PROTOCOL_VERSION);
                });
            } else {
                to_receiver
                    .send(b)
                    .map_err(|_| io::Error::other("receiver gone"))?;
            }
            Ok(a)
        };
        let mut tx = LiveSender::connect(&mut connect, &regs, &opts)?;
        assert_eq!(tx.version(), multifd::LIVE_PROTOCOL_VERSION);
        tx.send_round(PageSet::AllNonZero, false, &no_cancel)?;
        assert!(!tx.wait_received(0, &no_cancel)?);
        let dirty = clean_maps();
        let maps: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
        tx.send_round(PageSet::Dirty(&maps), true, &no_cancel)?;
        tx.finish(b"state")
    });
    assert_eq!(refused, 1);
    sent.unwrap();
    assert_eq!(received.unwrap().0, b"state");
    for (a, b) in src.iter().zip(&mems) {
        assert!(a.bytes() == b.bytes(), "memory differs");
    }
}

#[test]
fn cancel_and_abort_fail_the_receiver_cleanly() {
    let src = source(9);
    let regs: Vec<MemRegion> = src.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect();
    let opts = SocketOptions {
        channels: 2,
        compression: Compression::None,
    };
    let cancel = AtomicBool::new(true);
    let (sent, received, _) = over_pairs(|connect| {
        let mut tx = LiveSender::connect(connect, &regs, &opts)?;
        let r = tx.send_round(PageSet::AllNonZero, false, &cancel);
        assert!(matches!(r, Err(MultifdError::Aborted(_))), "{r:?}");
        tx.abort("cancelled by the user");
        Ok::<_, MultifdError>(())
    });
    sent.unwrap();
    let e = received.unwrap_err();
    assert!(
        matches!(&e, MultifdError::Remote(m) if m.contains("cancelled"))
            || matches!(e, MultifdError::PeerDisconnected { .. }),
        "{e:?}"
    );
}

#[test]
fn finish_needs_the_last_round_and_rounds_need_fitting_bitmaps() {
    let src = source(11);
    let regs: Vec<MemRegion> = src.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect();
    let opts = SocketOptions {
        channels: 1,
        compression: Compression::None,
    };
    let no_cancel = AtomicBool::new(false);
    let (sent, received, _) = over_pairs(|connect| {
        let mut tx = LiveSender::connect(connect, &regs, &opts)?;
        let short = [0u64; 1];
        let maps: [&[u64]; 2] = [&short, &short];
        let r = tx.send_round(PageSet::Dirty(&maps), false, &no_cancel);
        assert!(matches!(r, Err(MultifdError::InvalidArgument(_))), "{r:?}");
        tx.send_round(PageSet::AllNonZero, false, &no_cancel)?;
        tx.finish(b"state")
    });
    assert!(
        matches!(sent, Err(MultifdError::InvalidArgument(_))),
        "{sent:?}"
    );
    assert!(received.is_err());
}

/// The first round takes never-populated memory for zeros without reading
/// it (reading would fault every page in); a page populated after it is
/// sent by the dirty round that finds it.
#[test]
fn the_first_round_leaves_never_populated_memory_unread() {
    let no_cancel = AtomicBool::new(false);
    let mut src: Vec<Anon> = SIZES.iter().map(|&s| Anon::new(s as usize)).collect();
    for (r, pages) in [(0usize, [1u64, 2, 900]), (1, [0, 5, 1000])] {
        // SAFETY: advice on the test's own mapping; it changes no contents.
        unsafe { libc::madvise(src[r].ptr.cast(), src[r].len, libc::MADV_NOHUGEPAGE) };
        for p in pages {
            let at = (p * PAGE) as usize;
            fill(&mut src[r].bytes_mut()[at..at + PAGE as usize], 40 + p);
            src[r].bytes_mut()[at] = 1;
        }
    }
    let populated_now = |mems: &[Anon]| {
        page_runs::populated::Pagemap::open().map(|pagemap| {
            let mut count = 0;
            for m in mems {
                let mut untouched = Vec::new();
                pagemap.unpopulated_pages(m.ptr as usize, m.len, PAGE as usize, &mut untouched);
                count += untouched.iter().filter(|u| !**u).count();
            }
            count
        })
    };
    let before = populated_now(&src);
    let regs: Vec<MemRegion> = src.iter().zip(GUEST).map(|(m, g)| m.region(g)).collect();
    let opts = SocketOptions {
        channels: 2,
        compression: Compression::None,
    };
    let (sent, received, mems) = over_pairs(|connect| {
        let mut tx = LiveSender::connect(connect, &regs, &opts)?;
        let first = tx.send_round(PageSet::AllNonZero, false, &no_cancel)?;
        assert_eq!(first.pages, 6);
        assert_eq!(populated_now(&src), before, "the round populated memory");
        let mut dirty = clean_maps();
        touch(&mut src, &mut dirty, 1, &[700], 3);
        let maps: Vec<&[u64]> = dirty.iter().map(Vec::as_slice).collect();
        let last = tx.send_round(PageSet::Dirty(&maps), true, &no_cancel)?;
        assert_eq!(last.pages, 1);
        tx.finish(b"state")
    });
    let sent = sent.expect("sent");
    let (got, _) = received.expect("received");
    assert_eq!(got, b"state");
    assert_eq!(sent.present_pages, 7);
    for (a, b) in src.iter().zip(&mems) {
        assert!(a.bytes() == b.bytes(), "memory differs");
    }
}
