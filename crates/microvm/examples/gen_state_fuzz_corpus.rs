//! Writes the state-section fuzz seed corpus: every section in its current
//! layout, and every older layout still read (docs/versions.md).
//!
//! `cargo run -p microvm --example gen_state_fuzz_corpus [DIR]`
//! (default DIR: `crates/microvm/fuzz/corpus/state_sections`).
//!
//! Each seed is a section selector (1 byte), the version (u32, little-endian)
//! and the section's bytes: the input format of the `state_sections` target.

use std::path::PathBuf;

use microvm::devices::virtio::state::{MmioTransportState, NetDeviceState, QueueState};
use microvm::persist::{
    CmosState, I8042State, MachineState, MachineStateV1, SectionError, SerialState, StateSection,
    VcpuState, VmState,
};

fn seed(which: u8, version: u32, bytes: Vec<u8>) -> Vec<u8> {
    let mut b = vec![which];
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&bytes);
    b
}

fn current<T: StateSection>(which: u8, state: &T) -> Result<Vec<u8>, SectionError> {
    Ok(seed(which, T::VERSION, state.encode()?))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_sections")
        });
    std::fs::create_dir_all(&dir)?;
    let v1 = MachineStateV1 {
        vcpus: 2,
        mem_mib: 64,
        regions: vec![(0, 64 << 20)],
        cmdline: "console=ttyS0 cryo.mem=8".into(),
        tsc_khz: 2_000_000,
    };
    let machine = MachineState {
        kernel: "/boot/vmlinux".into(),
        writer: "cryo 0.1.0".into(),
        ..v1.clone().into()
    };
    let vcpu = VcpuState {
        cpuid: vec![Default::default(); 2],
        msrs: vec![Default::default(); 3],
        regs: Default::default(),
        sregs: Default::default(),
        xsave: vec![0; 1024],
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        vcpu_events: Default::default(),
    };
    let vm = VmState {
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
    };
    let queue = QueueState {
        max_size: 256,
        size: 256,
        ready: true,
        desc_table: 0x10_0000,
        avail_ring: 0x10_1000,
        used_ring: 0x10_2000,
        next_avail: 7,
        next_used: 7,
        event_idx: false,
    };
    let net = NetDeviceState {
        slot: 1,
        transport: MmioTransportState {
            device_type: 1,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: microvm::devices::virtio::net::NET_FEATURES,
            queue_sel: 1,
            status: 0xf,
            interrupt_status: 0,
            config_generation: 0,
            queues: vec![queue.clone(), queue],
        },
        mac: microvm::devices::virtio::net::default_mac(1),
        tap: "tap0".into(),
        features: microvm::devices::virtio::net::NET_FEATURES,
    };
    let seeds = [
        ("seed-virtio-net", current(7, &net)?),
        ("seed-machine-v1", seed(0, 1, postcard::to_stdvec(&v1)?)),
        ("seed-machine", current(0, &machine)?),
        ("seed-kvm-vm", current(1, &vm)?),
        ("seed-vcpu", current(2, &vcpu)?),
        (
            "seed-serial",
            current(
                3,
                &SerialState {
                    line_control: 3,
                    in_buffer: b"ok".to_vec(),
                    ..Default::default()
                },
            )?,
        ),
        ("seed-i8042", current(4, &I8042State::default())?),
        (
            "seed-cmos",
            current(
                5,
                &CmosState {
                    index: 0x0b,
                    data: vec![0x26; 128],
                },
            )?,
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), &bytes)?;
        println!("{}: {} bytes", dir.join(name).display(), bytes.len());
    }
    Ok(())
}
