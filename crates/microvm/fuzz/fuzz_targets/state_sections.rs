//! Feeds arbitrary bytes to every state section's versioned decoder: it
//! must never panic, at any version (docs/versions.md).
//!
//! Input: a section selector (1 byte: 0 machine, 1 kvm-vm, 2 vcpu,
//! 3 serial, 4 i8042, 5 cmos, 6 virtio-blk, 7 virtio-net; taken modulo 8),
//! the section version (u32,
//! little-endian), then the section's bytes. A section that decodes is
//! re-encoded in the current layout, which must decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microvm::devices::virtio::state::{BlockDeviceState, NetDeviceState};
use microvm::persist::{
    CmosState, I8042State, MachineState, SerialState, StateSection, VcpuState, VmState,
};

fn check<T: StateSection>(version: u32, bytes: &[u8]) {
    if let Ok(state) = T::decode_versioned(version, bytes) {
        let again = state.encode().expect("a decoded state encodes");
        T::decode_versioned(T::VERSION, &again).expect("a re-encoded state decodes");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some((version, bytes)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let version = u32::from_le_bytes(*version);
    match which % 8 {
        0 => check::<MachineState>(version, bytes),
        1 => check::<VmState>(version, bytes),
        2 => check::<VcpuState>(version, bytes),
        3 => check::<SerialState>(version, bytes),
        4 => check::<I8042State>(version, bytes),
        5 => check::<CmosState>(version, bytes),
        6 => check::<BlockDeviceState>(version, bytes),
        _ => check::<NetDeviceState>(version, bytes),
    }
});
