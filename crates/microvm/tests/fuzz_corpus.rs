//! Replays the fuzz corpora and any fuzz crash artifacts on stable Rust:
//! the state sections through the versioned decoders (none may panic, and
//! every seed decodes), and the `virtio_net` inputs through the fuzz
//! target's own body (`fuzz/harness`) on a real tap.

#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::path::Path;

use microvm::devices::virtio::state::{BlockDeviceState, NetDeviceState};
use microvm::persist::{
    CmosState, I8042State, MachineState, SectionError, SerialState, StateSection, VcpuState,
    VmState,
};

/// Decodes, re-encodes and decodes again (as the fuzz target does).
fn check<T: StateSection>(version: u32, bytes: &[u8]) -> Result<(), SectionError> {
    let state = T::decode_versioned(version, bytes)?;
    let again = state.encode()?;
    T::decode_versioned(T::VERSION, &again).map(|_| ())
}

/// One fuzz input: selector, version (u32 LE), section bytes.
fn run(data: &[u8]) -> Option<Result<(), SectionError>> {
    let (&which, rest) = data.split_first()?;
    let (version, bytes) = rest.split_first_chunk::<4>()?;
    let version = u32::from_le_bytes(*version);
    Some(match which % 8 {
        0 => check::<MachineState>(version, bytes),
        1 => check::<VmState>(version, bytes),
        2 => check::<VcpuState>(version, bytes),
        3 => check::<SerialState>(version, bytes),
        4 => check::<I8042State>(version, bytes),
        5 => check::<CmosState>(version, bytes),
        6 => check::<BlockDeviceState>(version, bytes),
        _ => check::<NetDeviceState>(version, bytes),
    })
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&p).expect("read corpus file"))
        })
        .collect()
}

#[test]
fn corpus_and_artifacts_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus/state_sections"));
    assert!(corpus.len() >= 8, "the seed corpus is missing");
    for (name, data) in &corpus {
        if name.starts_with("seed-") {
            match run(data) {
                Some(Ok(())) => {}
                other => panic!("{name}: {other:?}"),
            }
        } else {
            let _ = run(data);
        }
    }
    for (_, data) in files(&fuzz.join("artifacts/state_sections")) {
        let _ = run(&data);
    }
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
    let artifacts = files(&fuzz.join("artifacts/virtio_net"));
    for (name, data) in corpus.iter().chain(&artifacts) {
        let ran = harness::run(data, harness::net_device);
        assert!(ran, "{name}: no tap for the input");
    }
}
