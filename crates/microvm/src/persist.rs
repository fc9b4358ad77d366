//! Complete VM state, as plain serde structs: what a paused VM is made of,
//! so that it can be rebuilt in a new process without the guest noticing.
//!
//! Each part carries its own version (see the `*_VERSION` constants); a
//! reader accepts versions up to the one it knows.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

/// Version of [`MachineState`].
pub const MACHINE_STATE_VERSION: u32 = 1;
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

/// CMOS index register and contents (the clock itself is the host's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// The 128 bytes.
    pub data: Vec<u8>,
}

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
}
