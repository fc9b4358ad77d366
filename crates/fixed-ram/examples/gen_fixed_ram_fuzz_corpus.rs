//! Writes the fuzz seed corpus: a few small valid headers, in the layout of
//! every format version (`seed-*` version 1, `seed-v2-*` version 2).
//!
//! `cargo run -p fixed-ram --example gen_fixed_ram_fuzz_corpus [DIR]`
//! (default DIR: `crates/fixed-ram/fuzz/corpus/header`).
//!
//! Each seed is the file length (u64, little-endian) followed by the header
//! bytes, the input format of the `header` fuzz target.

use std::path::PathBuf;

use fixed_ram::{FixedRamError, Header, Layout, RegionSpec};

const MIB: u64 = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/header"));
    std::fs::create_dir_all(&dir)?;
    for version in 1..=fixed_ram::FORMAT_VERSION {
        for (name, bytes) in seeds(version)? {
            if version > 1 && name == "seed-uncommitted" {
                continue; // the same bytes in every version
            }
            let name = match version {
                1 => name.to_string(),
                v => name.replacen("seed-", &format!("seed-v{v}-"), 1),
            };
            std::fs::write(dir.join(&name), &bytes)?;
            println!("{}: {} bytes", dir.join(&name).display(), bytes.len());
        }
    }
    Ok(())
}

/// (file name, fuzz input) for every seed, headers of format `version`.
fn seeds(version: u32) -> Result<Vec<(&'static str, Vec<u8>)>, FixedRamError> {
    let input = |layout: &Layout, device_state_len| input(layout, device_state_len, version);
    let region = |guest_addr, size| RegionSpec { guest_addr, size };
    Ok(vec![
        (
            "seed-one-region",
            input(&Layout::new(4096, &[region(0, 64 * MIB)])?, 1000),
        ),
        (
            "seed-two-regions",
            input(
                &Layout::new(4096, &[region(0, 3 * MIB), region(4 << 30, MIB + 12288)])?,
                0,
            ),
        ),
        (
            "seed-huge-pages",
            input(&Layout::new(2 << 20, &[region(0, 8 * MIB)])?, 77),
        ),
        (
            "seed-small-alignment",
            input(
                &Layout::with_params(
                    4096,
                    4096,
                    8192,
                    &(0..8).map(|i| region(i * MIB, 20480)).collect::<Vec<_>>(),
                )?,
                5,
            ),
        ),
        ("seed-uncommitted", {
            let mut b = 4096u64.to_le_bytes().to_vec();
            b.extend_from_slice(&[0; 80]);
            b
        }),
    ])
}

fn input(layout: &Layout, device_state_len: u64, version: u32) -> Vec<u8> {
    let mut header = Header::from_layout(layout, device_state_len, 0x1234_5678, 0x9abc_def0);
    if version == 1 {
        header.format_version = 1;
        header.metadata_crc = None;
    }
    let mut b = header.file_len().to_le_bytes().to_vec();
    b.extend_from_slice(&header.to_bytes());
    b
}
