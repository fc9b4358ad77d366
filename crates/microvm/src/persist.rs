//! Complete VM state, as plain serde structs: what a paused VM is made of,
//! so that it can be rebuilt in a new process without the guest noticing.
//!
//! Each part is a [`StateSection`]: it has a name, a current version, and
//! reads every version back to 1. postcard does not describe itself, so a
//! layout that changes gets a new version, the old layout stays here as its
//! own struct (e.g. [`MachineStateV1`]) with a conversion into the current
//! one, and [`StateSection::decode_layout`] picks the layout by version.
//! Versions newer than the current one are refused with
//! [`SectionError::TooNew`]. See docs/versions.md.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a saved state section could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    /// The section was written by a newer cryo, with a layout this one does not know.
    #[error("'{section}' state version {found} is newer than this cryo reads (versions 1 to {current}): the image was saved by a newer cryo")]
    TooNew {
        /// Section name.
        section: &'static str,
        /// Version in the image.
        found: u32,
        /// Newest version this build reads.
        current: u32,
    },
    /// Version 0 was never written.
    #[error("'{section}' state version 0 does not exist (versions start at 1)")]
    VersionZero {
        /// Section name.
        section: &'static str,
    },
    /// The bytes do not decode as the layout of their version.
    #[error("decoding '{section}' state version {version}: {source}")]
    Decode {
        /// Section name.
        section: &'static str,
        /// Version in the image.
        version: u32,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// Bytes were left over after the layout of their version.
    #[error("'{section}' state version {version} has {extra} bytes left over after decoding")]
    Trailing {
        /// Section name.
        section: &'static str,
        /// Version in the image.
        version: u32,
        /// Bytes left.
        extra: usize,
    },
    /// The state could not be encoded.
    #[error("encoding '{section}' state: {source}")]
    Encode {
        /// Section name.
        section: &'static str,
        /// Why.
        #[source]
        source: postcard::Error,
    },
}

/// One part of a saved VM's state, stored as a named, versioned section.
///
/// The rule: a writer always writes [`StateSection::VERSION`]; a reader
/// reads every version from 1 to `VERSION`, each through its own layout, and
/// refuses newer ones. Changing the layout means bumping `VERSION`, keeping
/// the old layout as its own struct and adding its arm to
/// [`StateSection::decode_layout`].
pub trait StateSection: Serialize + Sized {
    /// Section name in an image.
    const NAME: &'static str;
    /// The version this build writes (and the newest it reads).
    const VERSION: u32;

    /// Decodes `bytes` written with layout `version` (1 ..= `VERSION`,
    /// checked by [`StateSection::decode_versioned`] before this is called).
    fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, SectionError>;

    /// Decodes a section of any version this build reads; a newer one is
    /// [`SectionError::TooNew`].
    fn decode_versioned(version: u32, bytes: &[u8]) -> Result<Self, SectionError> {
        if version == 0 {
            return Err(SectionError::VersionZero {
                section: Self::NAME,
            });
        }
        if version > Self::VERSION {
            return Err(SectionError::TooNew {
                section: Self::NAME,
                found: version,
                current: Self::VERSION,
            });
        }
        Self::decode_layout(version, bytes)
    }

    /// Encodes the state in the current layout ([`StateSection::VERSION`]).
    fn encode(&self) -> Result<Vec<u8>, SectionError> {
        postcard::to_stdvec(self).map_err(|source| SectionError::Encode {
            section: Self::NAME,
            source,
        })
    }
}

/// Decodes `bytes` as exactly one `T` (the layout of `version` of section
/// `section`): no bytes may be left over.
pub fn decode_exact<T: DeserializeOwned>(
    section: &'static str,
    version: u32,
    bytes: &[u8],
) -> Result<T, SectionError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|source| SectionError::Decode {
            section,
            version,
            source,
        })?;
    if !rest.is_empty() {
        return Err(SectionError::Trailing {
            section,
            version,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// A section that has had one layout so far: version 1 is the current struct.
macro_rules! single_layout {
    ($ty:ty, $name:expr, $version:expr) => {
        impl StateSection for $ty {
            const NAME: &'static str = $name;
            const VERSION: u32 = $version;
            fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, SectionError> {
                decode_exact(Self::NAME, version, bytes)
            }
        }
    };
}

/// Version of [`MachineState`]: 2 added `kernel` and `writer`
/// (version 1 is [`MachineStateV1`]).
pub const MACHINE_STATE_VERSION: u32 = 2;
/// Version of [`VmState`].
pub const VM_STATE_VERSION: u32 = 1;
/// Version of [`VcpuState`].
pub const VCPU_STATE_VERSION: u32 = 1;
/// Version of [`SerialState`].
pub const SERIAL_STATE_VERSION: u32 = 1;
/// Version of [`I8042State`].
pub const I8042_STATE_VERSION: u32 = 1;
/// Version of [`CmosState`].
pub const CMOS_STATE_VERSION: u32 = 1;

/// The VM's shape: what must match before any other state can be applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// RAM regions (guest physical address, size in bytes), in address order.
    pub regions: Vec<(u64, u64)>,
    /// The kernel command line the VM booted with (informational).
    pub cmdline: String,
    /// TSC frequency of the vCPUs in kHz (0 if KVM did not say).
    pub tsc_khz: u32,
    /// The kernel the VM booted (informational; empty if unknown, e.g. read
    /// from a version-1 section).
    pub kernel: String,
    /// The program and version that wrote the image, e.g. `cryo 0.1.0`
    /// (informational; empty if unknown, e.g. read from a version-1 section).
    pub writer: String,
}

/// [`MachineState`] as version 1 laid it out (before `kernel` and `writer`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStateV1 {
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// RAM regions (guest physical address, size in bytes), in address order.
    pub regions: Vec<(u64, u64)>,
    /// The kernel command line the VM booted with.
    pub cmdline: String,
    /// TSC frequency of the vCPUs in kHz.
    pub tsc_khz: u32,
}

impl From<MachineStateV1> for MachineState {
    fn from(v1: MachineStateV1) -> Self {
        MachineState {
            vcpus: v1.vcpus,
            mem_mib: v1.mem_mib,
            regions: v1.regions,
            cmdline: v1.cmdline,
            tsc_khz: v1.tsc_khz,
            kernel: String::new(),
            writer: String::new(),
        }
    }
}

impl StateSection for MachineState {
    const NAME: &'static str = "machine";
    const VERSION: u32 = MACHINE_STATE_VERSION;
    fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, SectionError> {
        match version {
            1 => decode_exact::<MachineStateV1>(Self::NAME, version, bytes).map(Into::into),
            _ => decode_exact(Self::NAME, version, bytes),
        }
    }
}

/// VM-wide KVM state: interrupt controllers, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// 8259 master.
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (i8254).
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

single_layout!(VmState, "kvm-vm", VM_STATE_VERSION);

/// One vCPU's complete architectural state as KVM exposes it.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every saveable MSR KVM lists (KVM_GET_MSR_INDEX_LIST) that this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (legacy 4 KiB region followed by the KVM_CAP_XSAVE2 extension), in u32 words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
}

single_layout!(VcpuState, "vcpu", VCPU_STATE_VERSION);

/// The 16550's registers and receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLH.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

single_layout!(SerialState, "serial", SERIAL_STATE_VERSION);

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The i8042 as emulated holds no state (it reads as zero and only acts on
/// the reset command); the section exists so that a later, stateful i8042
/// can add fields under a new version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

single_layout!(I8042State, "i8042", I8042_STATE_VERSION);

/// CMOS index register and contents (the clock itself is the host's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// The 128 bytes.
    pub data: Vec<u8>,
}

single_layout!(CmosState, "cmos", CMOS_STATE_VERSION);

/// Everything of a paused VM except its RAM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Shape.
    pub machine: MachineState,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// Keyboard controller.
    pub i8042: I8042State,
    /// CMOS.
    pub cmos: CmosState,
    /// virtio-blk devices, in MMIO slot order (one `virtio-blk` section each).
    pub blocks: Vec<crate::devices::virtio::state::BlockDeviceState>,
    /// virtio-net devices, in MMIO slot order after the disks (one
    /// `virtio-net` section each).
    pub nets: Vec<crate::devices::virtio::state::NetDeviceState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{new_serial, restore_serial, Cmos, EventFdTrigger, SerialOutput};

    /// Save → serialize → restore through the section's own versioned decode.
    fn through_bytes<T: StateSection>(state: &T) -> T {
        let bytes = state.encode().unwrap();
        T::decode_versioned(T::VERSION, &bytes).unwrap()
    }

    fn machine_v1() -> MachineStateV1 {
        MachineStateV1 {
            vcpus: 2,
            mem_mib: 64,
            regions: vec![(0, 64 << 20)],
            cmdline: "console=ttyS0".into(),
            tsc_khz: 2_000_000,
        }
    }

    #[test]
    fn machine_round_trip() {
        let m = MachineState {
            kernel: "/boot/vmlinux".into(),
            writer: "cryo 0.1.0".into(),
            ..machine_v1().into()
        };
        assert_eq!(through_bytes(&m), m);
    }

    #[test]
    fn machine_v1_bytes_read_through_the_v1_layout() {
        let v1 = machine_v1();
        let bytes = postcard::to_stdvec(&v1).unwrap();
        let m = MachineState::decode_versioned(1, &bytes).unwrap();
        assert_eq!(m, MachineState::from(v1));
        assert_eq!(m.kernel, "");
        assert_eq!(m.writer, "");
        // The same bytes are not a version-2 layout: reading them as one is an error.
        assert!(MachineState::decode_versioned(2, &bytes).is_err());
    }

    #[test]
    fn newer_and_zero_versions_are_refused() {
        let bytes = SerialState::default().encode().unwrap();
        let e = SerialState::decode_versioned(SERIAL_STATE_VERSION + 1, &bytes).unwrap_err();
        assert!(matches!(
            e,
            SectionError::TooNew { section: "serial", found, current }
                if found == SERIAL_STATE_VERSION + 1 && current == SERIAL_STATE_VERSION
        ));
        assert!(e.to_string().contains("newer cryo"), "{e}");
        let e = MachineState::decode_versioned(0, &bytes).unwrap_err();
        assert!(matches!(
            e,
            SectionError::VersionZero { section: "machine" }
        ));
    }

    /// Every truncation and single-byte change of a valid section, at every
    /// version, decodes or is refused: never a panic (state sections are
    /// read from hostile files).
    #[test]
    fn damaged_sections_do_not_panic() {
        let m = MachineState {
            kernel: "/k".into(),
            writer: "cryo 0.1.0".into(),
            ..machine_v1().into()
        };
        let samples = [
            m.encode().unwrap(),
            postcard::to_stdvec(&machine_v1()).unwrap(),
        ];
        for bytes in &samples {
            for version in 0..=MachineState::VERSION + 1 {
                for len in 0..bytes.len() {
                    let _ = MachineState::decode_versioned(version, &bytes[..len]);
                }
                for i in 0..bytes.len() {
                    let mut b = bytes.clone();
                    b[i] ^= 0xff;
                    let _ = MachineState::decode_versioned(version, &b);
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = CmosState {
            index: 1,
            data: vec![1; 128],
        }
        .encode()
        .unwrap();
        bytes.push(0);
        let e = CmosState::decode_versioned(1, &bytes).unwrap_err();
        assert!(matches!(e, SectionError::Trailing { extra: 1, .. }), "{e}");
    }

    /// A deliberately bumped section, as a later serial change would write
    /// it: version 2 adds a field, version 1 bytes still decode through the
    /// version-1 layout ([`SerialState`]) and convert.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct SerialStateV2 {
        regs: SerialState,
        fifo_capacity: u16,
    }

    impl From<SerialState> for SerialStateV2 {
        fn from(v1: SerialState) -> Self {
            SerialStateV2 {
                regs: v1,
                fifo_capacity: 64,
            }
        }
    }

    impl StateSection for SerialStateV2 {
        const NAME: &'static str = "serial";
        const VERSION: u32 = 2;
        fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, SectionError> {
            match version {
                1 => decode_exact::<SerialState>(Self::NAME, version, bytes).map(Into::into),
                _ => decode_exact(Self::NAME, version, bytes),
            }
        }
    }

    #[test]
    fn bumped_section_reads_its_past() {
        let v1 = SerialState {
            line_control: 0x03,
            scratch: 0x5a,
            in_buffer: b"hi".to_vec(),
            ..SerialState::default()
        };
        let v1_bytes = v1.encode().unwrap();
        // Version-1 bytes through the version-1 layout.
        let read = SerialStateV2::decode_versioned(1, &v1_bytes).unwrap();
        assert_eq!(read, SerialStateV2::from(v1.clone()));
        // Decoding them with today's layout instead would misread: postcard
        // does not describe itself, which is why old layouts are kept.
        assert!(decode_exact::<SerialStateV2>("serial", 2, &v1_bytes).is_err());
        // Version 2 round-trips; version 3 is refused.
        let v2 = SerialStateV2 {
            regs: v1,
            fifo_capacity: 16,
        };
        assert_eq!(through_bytes(&v2), v2);
        let e = SerialStateV2::decode_versioned(3, &v2.encode().unwrap()).unwrap_err();
        assert!(matches!(
            e,
            SectionError::TooNew {
                found: 3,
                current: 2,
                ..
            }
        ));
    }

    #[test]
    fn serial_round_trip() {
        let mut serial = new_serial(EventFdTrigger::new().unwrap(), SerialOutput::Sink).unwrap();
        serial.write(3, 0x83).unwrap(); // LCR: DLAB on
        serial.write(0, 0x01).unwrap(); // DLL
        serial.write(3, 0x03).unwrap(); // LCR: 8N1
        serial.write(1, 0x01).unwrap(); // IER: received data
        serial.write(7, 0xa5).unwrap(); // SCR
        serial.enqueue_raw_bytes(b"abc").unwrap();
        let saved: SerialState = serial.state().into();
        let read = through_bytes(&saved);
        assert_eq!(read, saved);
        let mut restored =
            restore_serial(EventFdTrigger::new().unwrap(), SerialOutput::Sink, &read).unwrap();
        assert_eq!(SerialState::from(restored.state()), saved);
        assert_eq!(restored.read(7), 0xa5);
        assert_eq!(restored.read(0), b'a');
    }

    #[test]
    fn i8042_round_trip() {
        assert_eq!(through_bytes(&I8042State::default()), I8042State::default());
    }

    #[test]
    fn cmos_round_trip() {
        let mut cmos = Cmos::new();
        cmos.write(0, 0x40);
        cmos.write(1, 0x77);
        cmos.write(0, 0x41);
        let saved = cmos.state();
        let read = through_bytes(&saved);
        assert_eq!(read, saved);
        let mut restored = Cmos::from_state(&read);
        assert_eq!(restored.state(), saved);
        restored.write(0, 0x40);
        assert_eq!(restored.read(1), 0x77);
    }
}
