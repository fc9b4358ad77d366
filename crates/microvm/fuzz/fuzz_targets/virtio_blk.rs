//! A hostile guest and a hostile image against virtio-blk on the MMIO
//! transport: the input is a saved transport state (the `virtio-blk`
//! section's decoder and restore), guest memory holding the rings and
//! buffers, and register writes. The VMM must never panic, whatever the
//! bytes.
//!
//! Input layout: a little-endian u16 `n`, `n` bytes of postcard-encoded
//! transport state (used if it decodes), then up to 60 KiB copied into guest
//! memory at 0x1000, whose first bytes are also read as register writes
//! (one offset byte times 4, then a u32) before and after the queue is served.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::block::{Block, DiskConfig};
use microvm::devices::virtio::state::MmioTransportState;
use microvm::devices::virtio::MmioTransport;
use microvm::vm_memory::{Bytes, GuestAddress};
use microvm::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

fn disk() -> &'static PathBuf {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("microvm-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).expect("create the fuzz disk");
        p
    })
}

fn registers(t: &mut MmioTransport, ops: &[u8]) {
    for op in ops.chunks_exact(5).take(64) {
        let offset = u64::from(op[0]) * 4;
        t.write(offset, &op[1..5]);
        let mut back = [0u8; 4];
        t.read(offset, &mut back);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (state, memory) = rest.split_at(n);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let memory = &memory[..memory.len().min(60 << 10)];
    if mem.write_slice(memory, GuestAddress(0x1000)).is_err() {
        return;
    }
    let config = DiskConfig {
        path: disk().clone(),
        read_only: false,
        direct: false,
    };
    let (Ok(block), Ok(irq)) = (Block::open(config), EventFd::new(libc::EFD_NONBLOCK)) else {
        return;
    };
    let Ok(mut t) = MmioTransport::new(Box::new(block), irq) else {
        return;
    };
    if let Ok(s) = postcard::from_bytes::<MmioTransportState>(state) {
        let _ = t.restore(&s);
    }
    registers(&mut t, memory);
    t.process_all(&mem);
    registers(&mut t, memory.get(320..).unwrap_or_default());
    t.process_all(&mem);
    let _ = t.state();
});
