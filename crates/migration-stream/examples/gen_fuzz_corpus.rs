//! Writes the fuzz seed corpus: a few small valid streams.
//!
//! `cargo run -p migration-stream --example gen_fuzz_corpus [DIR]`
//! (default DIR: `crates/migration-stream/fuzz/corpus/reader`).

use std::path::PathBuf;

use migration_stream::{RamRegion, StreamError, StreamWriter};
use serde::Serialize;

#[derive(Serialize)]
struct Serial {
    ier: u8,
    lcr: u8,
    fifo: Vec<u8>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/reader"));
    std::fs::create_dir_all(&dir)?;
    let seeds: [(&str, Vec<u8>); 6] = [
        ("seed-empty", empty()?),
        ("seed-sections", sections()?),
        ("seed-all-records", all_records()?),
        ("seed-zero-pages", zero_pages()?),
        ("seed-two-raw-pages", raw_pages()?),
        ("seed-huge-pages", huge_pages()?),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), &bytes)?;
        println!("{}: {} bytes", dir.join(name).display(), bytes.len());
    }
    Ok(())
}

fn empty() -> Result<Vec<u8>, StreamError> {
    StreamWriter::new(Vec::new(), 4096)?.finish()
}

fn sections() -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), 4096)?;
    let serial = Serial {
        ier: 1,
        lcr: 3,
        fifo: b"login: ".to_vec(),
    };
    w.write_section("serial", 0, 2, &serial)?;
    w.write_section("cpu", 1, 1, &(0x1234u64, [7u32; 4], "regs"))?;
    w.write_raw_section("blob", 9, 1, &[0xde, 0xad])?;
    w.finish()
}

fn layout() -> [RamRegion; 2] {
    [
        RamRegion {
            guest_addr: 0,
            size: 16 * 4096,
        },
        RamRegion {
            guest_addr: 1 << 32,
            size: 4 * 4096,
        },
    ]
}

fn all_records() -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), 4096)?;
    w.write_section("serial", 0, 1, &(1u8, 2u16))?;
    w.write_ram_layout(&layout())?;
    w.write_pages(1, 2, &[0x5a; 4096])?;
    w.write_zero_pages(0, 0, 16)?;
    w.write_sync(1)?;
    w.write_zero_pages(1, 0, 2)?;
    w.write_sync(2)?;
    w.finish()
}

fn zero_pages() -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), 4096)?;
    w.write_ram_layout(&layout())?;
    for page in 0..16 {
        w.write_zero_pages(0, page, 1)?;
    }
    w.finish()
}

fn raw_pages() -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), 4096)?;
    w.write_ram_layout(&layout())?;
    let data: Vec<u8> = (0..2 * 4096u32).map(|i| (i % 256) as u8).collect();
    w.write_pages(0, 14, &data)?;
    w.finish()
}

fn huge_pages() -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), 2 << 20)?;
    w.write_ram_layout(&[RamRegion {
        guest_addr: 0,
        size: 8 << 20,
    }])?;
    w.write_zero_pages(0, 1, 3)?;
    w.write_section("pit", 0, 1, &[1u8, 2, 3])?;
    w.finish()
}
