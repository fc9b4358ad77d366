//! A hostile guest and a hostile image against virtio-net on a real tap
//! (created for each input, so it needs root): see `harness/mod.rs` for the
//! input layout, shared with `virtio_blk` and the stable corpus test.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::run(data, harness::net_device);
});
