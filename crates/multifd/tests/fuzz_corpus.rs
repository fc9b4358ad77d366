//! Replays the fuzz corpora and any fuzz crash artifacts on stable Rust:
//! the parsers and the whole receiver must not panic on any of them.

mod common;

use std::io::Cursor;
use std::path::Path;

use common::wire::Mem;
use common::Anon;
use multifd::{
    decode_payload, parse_hello, parse_main_message, parse_packet, parse_packet_header, receive,
    Encoding,
};

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e.expect("directory entry").path();
        if p.is_file() {
            out.push((
                p.display().to_string(),
                std::fs::read(&p).expect("read corpus file"),
            ));
        }
    }
    out
}

fn packet(data: &[u8]) {
    let _ = parse_hello(data);
    let _ = parse_packet_header(data);
    for (ps, regions) in [(4096, &[4u64, 256, 1 << 20][..]), (65536, &[1u64][..])] {
        if let Ok((p, n)) = parse_packet(data, ps, regions) {
            assert!(n <= data.len());
            if !p.header.sync {
                let mut out = vec![0u8; p.header.page_count as usize * ps as usize];
                let _ = decode_payload(p.header.encoding, p.payload, &mut out);
            }
        }
    }
    let mut pos = 0;
    while let Ok((_, n)) = parse_main_message(&data[pos..], 4096) {
        pos += n;
    }
    if data.len() > 3 {
        if let Some(enc) = Encoding::from_code(data[0] % 3) {
            let mut out = vec![0u8; usize::from(u16::from_le_bytes([data[1], data[2]])) * 16];
            let _ = decode_payload(enc, &data[3..], &mut out);
        }
    }
}

fn receive_streams(data: &[u8]) -> bool {
    let mut streams = Vec::new();
    let mut pos = 0;
    while streams.len() < 9 && pos + 4 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4;
        let end = pos.saturating_add(len).min(data.len());
        streams.push(data[pos..end].to_vec());
        pos = end;
    }
    let mut conns = streams.into_iter().map(|s| Mem(Cursor::new(s)));
    let mut mems = Vec::new();
    receive(
        &mut || {
            conns
                .next()
                .ok_or_else(|| std::io::Error::other("no more connections"))
        },
        &mut |layout| {
            if layout.iter().map(|l| l.1).sum::<u64>() > 4 << 20 {
                return Err("too much memory".into());
            }
            Ok(layout
                .iter()
                .map(|&(g, s)| {
                    let a = Anon::new(s as usize);
                    let r = a.region(g);
                    mems.push(a);
                    r
                })
                .collect())
        },
    )
    .is_ok()
}

#[test]
fn packet_corpus_and_artifacts_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus/packet"));
    assert!(corpus.len() >= 5, "the seed corpus is missing");
    for (name, data) in corpus.iter().chain(&files(&fuzz.join("artifacts/packet"))) {
        eprintln!("{name}");
        packet(data);
    }
}

#[test]
fn receive_corpus_and_artifacts_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus/receive"));
    assert!(!corpus.is_empty(), "the seed corpus is missing");
    for (name, data) in corpus.iter().chain(&files(&fuzz.join("artifacts/receive"))) {
        eprintln!("{name}");
        receive_streams(data);
    }
}

#[test]
fn seeds_are_valid() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for seed in [
        "seed-valid",
        "seed-valid-empty-state",
        "seed-valid-live",
        "seed-valid-progress",
    ] {
        let data = std::fs::read(fuzz.join("receive").join(seed)).expect("seed file");
        // seed-valid-empty-state has only one of two data streams: it fails.
        assert_eq!(
            receive_streams(&data),
            seed != "seed-valid-empty-state",
            "{seed}"
        );
    }
    let hello = std::fs::read(fuzz.join("packet/seed-hello-live")).expect("seed file");
    assert_eq!(
        parse_hello(&hello).map(|h| h.version).ok(),
        Some(multifd::LIVE_PROTOCOL_VERSION)
    );
    let report = std::fs::read(fuzz.join("packet/seed-round-received")).expect("seed file");
    assert!(matches!(
        parse_main_message(&report, 4096),
        Ok((multifd::MainMessage::RoundReceived { round: 1 }, 16))
    ));
    let sync = std::fs::read(fuzz.join("packet/seed-sync-last")).expect("seed file");
    assert!(parse_packet_header(&sync).is_ok_and(|h| h.sync && h.last));
    for i in 0..5 {
        let data = std::fs::read(fuzz.join(format!("packet/seed-packet-{i}"))).expect("seed file");
        parse_packet(&data, 4096, &[16, 4]).unwrap_or_else(|e| panic!("seed-packet-{i}: {e}"));
    }
}
