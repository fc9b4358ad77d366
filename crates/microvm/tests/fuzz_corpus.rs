//! Replays the state-section fuzz corpus and any fuzz crash artifacts
//! through the versioned decoders on stable Rust: none may panic, and every
//! seed decodes.

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
