//! A hostile guest and a hostile image against virtio-net on a real tap:
//! see `harness/virtio_net.rs` (shared with the stable corpus test).
#![no_main]

#[path = "../harness/virtio_net.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
