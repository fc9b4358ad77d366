//! A hostile guest and a hostile image against virtio-blk on the MMIO
//! transport: see `harness/mod.rs` for the input layout, shared with
//! `virtio_net` and the stable corpus test.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::block::{Block, DiskConfig};

fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("microvm-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).expect("create the fuzz disk");
        p
    })
}

fuzz_target!(|data: &[u8]| {
    harness::run(data, || {
        let config = DiskConfig {
            path: disk().clone(),
            read_only: false,
            direct: false,
        };
        Some(Box::new(Block::open(config).ok()?) as _)
    });
});
