//! Replays the `virtio_net` fuzz corpus and any crash artifacts on stable
//! Rust through the fuzz target's own body: none may panic. Each input gets
//! a fresh tap, which needs root and /dev/net/tun; without them the test
//! says it is skipped and why.

#[path = "../fuzz/harness/virtio_net.rs"]
mod harness;

use std::path::Path;

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("read corpus file"))
        .collect()
}

#[test]
fn virtio_net_corpus_does_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus/virtio_net"));
    assert!(corpus.len() >= 4, "the seed corpus is missing");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!(
            "SKIP virtio_net_corpus_does_not_panic: each input needs a tap (root and /dev/net/tun)"
        );
        return;
    }
    for data in corpus
        .iter()
        .chain(&files(&fuzz.join("artifacts/virtio_net")))
    {
        assert!(harness::run(data), "no tap for the fuzz input");
    }
}
