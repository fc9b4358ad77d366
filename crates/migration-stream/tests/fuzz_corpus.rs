//! Replays the fuzz corpus and any fuzz crash artifacts through the reader
//! on stable Rust: none may panic.

use std::path::Path;

use migration_stream::{summarize, StreamReader};

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
        let _ = summarize(data.as_slice());
        if let Ok(mut r) = StreamReader::new(data.as_slice()) {
            let mut records = 0u64;
            while let Ok(Some(_)) = r.next_record() {
                records += 1;
                assert!(
                    records <= data.len() as u64 / 12 + 1,
                    "{}: too many records",
                    path.display()
                );
            }
            assert!(r.offset() <= data.len() as u64);
        }
        n += 1;
    }
    n
}

#[test]
fn corpus_and_artifacts_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = replay(&fuzz.join("corpus/reader"));
    assert!(corpus > 0, "the seed corpus is missing");
    replay(&fuzz.join("artifacts/reader"));
}

#[test]
fn seed_streams_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/reader");
    for name in [
        "seed-empty",
        "seed-sections",
        "seed-all-records",
        "seed-zero-pages",
        "seed-two-raw-pages",
        "seed-huge-pages",
    ] {
        let data = std::fs::read(dir.join(name)).expect("seed file");
        let s = summarize(data.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.total_bytes, data.len() as u64);
    }
}
