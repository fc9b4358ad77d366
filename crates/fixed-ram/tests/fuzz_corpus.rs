//! Replays the fuzz corpus and any fuzz crash artifacts through the header
//! parser on stable Rust: none may panic.

use std::path::Path;

use fixed_ram::{FixedRamError, Image};

/// Runs one fuzz input (file length u64 LE, then header bytes) the way the
/// fuzz target does; returns the parse result for the given length.
fn run(data: &[u8]) -> Result<fixed_ram::Header, FixedRamError> {
    let (file_len, bytes) = match data.split_first_chunk::<8>() {
        Some((len, rest)) => (u64::from_le_bytes(*len), rest),
        None => (data.len() as u64, data),
    };
    let _ = Image::parse_header(bytes, bytes.len() as u64);
    let result = Image::parse_header(bytes, file_len);
    if let Ok(h) = &result {
        assert_eq!(h.to_bytes(), bytes[..h.encoded_len()]);
        assert_eq!(h.file_len(), file_len);
    }
    result
}

fn replay(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("read corpus file");
        let _ = run(&data);
        n += 1;
    }
    n
}

#[test]
fn corpus_and_artifacts_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = replay(&fuzz.join("corpus/header"));
    assert!(corpus > 0, "the seed corpus is missing");
    replay(&fuzz.join("artifacts/header"));
}

#[test]
fn seed_headers_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/header");
    for name in [
        "seed-one-region",
        "seed-two-regions",
        "seed-huge-pages",
        "seed-small-alignment",
    ] {
        let data = std::fs::read(dir.join(name)).expect("seed file");
        run(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let data = std::fs::read(dir.join("seed-uncommitted")).expect("seed file");
    assert!(matches!(run(&data), Err(FixedRamError::NotCommitted)));
}
