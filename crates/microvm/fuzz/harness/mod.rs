//! The body shared by the virtio fuzz targets (`virtio_blk`, `virtio_net`)
//! and by the stable test that replays their corpora
//! (`crates/microvm/tests/fuzz_corpus.rs`).
//!
//! A hostile guest and a hostile image against a virtio device on the MMIO
//! transport: the input is a saved transport state (through postcard and
//! restore), guest memory holding the rings and buffers, and register
//! writes. Whatever the bytes, the VMM must not panic.
//!
//! Input layout: a little-endian u16 `n`, `n` bytes of postcard-encoded
//! transport state (used if it decodes), then up to 60 KiB copied into guest
//! memory at 0x1000, whose first bytes are also read as register writes
//! (one offset byte times 4, then a u32) before and after the queues are
//! served.

use microvm::devices::virtio::net::{Net, NetConfig};
use microvm::devices::virtio::state::MmioTransportState;
use microvm::devices::virtio::{MmioTransport, VirtioDevice};
use microvm::memory::{anonymous_memory, RamRange};
use microvm::vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

fn registers(t: &mut MmioTransport, ops: &[u8]) {
    for op in ops.chunks_exact(5).take(64) {
        let offset = u64::from(op[0]) * 4;
        t.write(offset, &op[1..5]);
        let mut back = [0u8; 4];
        t.read(offset, &mut back);
    }
}

/// Runs one input against the device `make` builds. False when the host
/// could not set up (no memory, no device).
pub fn run(data: &[u8], make: impl FnOnce() -> Option<Box<dyn VirtioDevice>>) -> bool {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return true;
    };
    let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (state, memory) = rest.split_at(n);
    let Ok(mem) = anonymous_memory(&[RamRange {
        start: 0,
        len: 1 << 20,
    }]) else {
        return false;
    };
    let memory = &memory[..memory.len().min(60 << 10)];
    if mem.write_slice(memory, GuestAddress(0x1000)).is_err() {
        return false;
    }
    let (Some(device), Ok(irq)) = (make(), EventFd::new(libc::EFD_NONBLOCK)) else {
        return false;
    };
    let Ok(mut t) = MmioTransport::new(device, irq) else {
        return false;
    };
    if let Ok(s) = postcard::from_bytes::<MmioTransportState>(state) {
        let _ = t.restore(&s);
    }
    registers(&mut t, memory);
    t.process_all(&mem);
    registers(&mut t, memory.get(320..).unwrap_or_default());
    t.process_all(&mem);
    let _ = t.state();
    true
}

/// A virtio-net device on a fresh tap of this process (needs root).
#[allow(dead_code)] // not every target includes a net device
pub fn net_device() -> Option<Box<dyn VirtioDevice>> {
    let config = NetConfig {
        tap: format!("cryofz{}", std::process::id() % 100_000),
        mac: None,
    };
    Some(Box::new(Net::open(&config, 0).ok()?))
}
