//! # microvm: a tiny KVM virtual machine
//!
//! `microvm` builds an x86_64 KVM VM that boots a real kernel image (an ELF
//! vmlinux through the Linux 64-bit boot protocol or its PVH entry, or a
//! bzImage), with an initrd and a command line, on one or more vCPU threads,
//! with a 16550 serial console on COM1, an i8042 whose reset line ends the
//! VM, an in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT. It can pause and
//! resume all vCPUs from another thread, which is what saving a VM needs.
//!
//! Main types:
//! - [`VmConfig`] says what to build; [`MicroVm::new`] builds it, [`MicroVm::run`]
//!   runs it on an event loop until the guest resets or powers off, or the host stops it.
//! - [`VmController`] lets other threads act on a running VM (pause, resume, stop,
//!   or any closure over `&mut MicroVm` on the event-loop thread).
//! - [`memory`] lays out and maps guest RAM (anonymous, or a shared host file);
//!   [`loader`] loads kernels; [`arch`] holds the x86_64 boot details;
//!   [`devices`] the emulated ports; [`vcpu`] the vCPU threads.
//!
//! ```no_run
//! use microvm::{BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig};
//!
//! let config = VmConfig {
//!     vcpus: 2,
//!     mem_mib: 256,
//!     backing: MemoryBacking::Anonymous,
//!     boot: BootSource {
//!         kernel: "vmlinux".into(),
//!         cmdline: "console=ttyS0".into(),
//!         ..Default::default()
//!     },
//!     serial: SerialOutput::Stdout,
//!     serial_input: false,
//!     disks: Vec::new(),
//!     nets: Vec::new(),
//! };
//! let mut vm = MicroVm::new(config)?;
//! let reason = vm.run(Vec::new())?;
//! println!("VM ended: {reason:?}");
//! # Ok::<(), microvm::Error>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod devices;
pub mod loader;
pub mod memory;
pub mod persist;
pub mod vcpu;
mod vm;
pub mod vstate;

pub use devices::SerialOutput;
pub use event_manager;
pub use loader::{BootProtocol, BootSource, KernelFormat, LoadError};
pub use memory::{
    create_guest_memory, observe_writes, populate, GuestMemory, GuestRegion, MemoryBacking,
    MemoryError, WriteObserver,
};
pub use vcpu::{VcpuError, VmExitReason};
pub use vm::{
    kvm_device_path, max_vcpus, open_kvm, open_restore_taps, region_list, set_kvm_device_path,
    MicroVm, RestoreOptions, RunState, StopHandle, VmConfig, VmController, VmShell,
};
pub use vm_memory;

/// Errors from building or running a VM. Each names the layer that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm cannot be used.
    #[error("KVM unavailable: {0}")]
    KvmUnavailable(String),
    /// The vCPU count is out of range.
    #[error("{requested} vCPUs requested, but this host allows 1 to {max}")]
    TooManyVcpus {
        /// Asked for.
        requested: u8,
        /// The limit.
        max: u8,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel or initrd could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Boot register set-up failed.
    #[error(transparent)]
    Regs(#[from] arch::regs::RegsError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] arch::acpi::AcpiError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] arch::mptable::MptableError),
    /// A vCPU thread failed or did not answer.
    #[error(transparent)]
    Vcpu(vcpu::VcpuError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The operation does not fit the VM's state.
    #[error("{0}")]
    State(String),
    /// A host I/O error.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    /// Reading or writing KVM state failed.
    #[error("VM state: {0}")]
    VmState(#[from] vstate::StateError),
    /// A snapshot does not fit this VM or host.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The host's TSC frequency differs from the saved one and cannot be scaled.
    #[error("this VM was saved on a host with a TSC of {saved_khz} kHz; this host runs at {host_khz} kHz and KVM cannot scale the TSC (KVM_CAP_TSC_CONTROL); restoring anyway (RestoreOptions::allow_tsc_mismatch) makes guest time run at the wrong rate")]
    TscMismatch {
        /// Saved frequency.
        saved_khz: u32,
        /// This host's.
        host_khz: u32,
    },
    /// More virtio devices than the MMIO slots hold.
    #[error("{0} virtio devices requested, but a VM has at most {max}", max = devices::virtio::MAX_DEVICES)]
    TooManyDevices(usize),
    /// A virtio device failed to set up or restore.
    #[error(transparent)]
    Virtio(#[from] devices::virtio::VirtioError),
    /// A disk cannot be used (missing, unreadable, or changed since a save).
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::DiskError),
    /// A tap cannot be opened or set up.
    #[error(transparent)]
    Tap(#[from] devices::virtio::tap::TapError),
    /// A restore names another number of taps than the save has net devices.
    #[error("the saved VM has {saved} network devices but {given} --net were given (give one per device, in order, or none to reattach to the taps recorded in the save)")]
    NetCountMismatch {
        /// Net devices in the save.
        saved: usize,
        /// Taps given.
        given: usize,
    },
    /// A restore gives a net device another MAC than the guest has.
    #[error("network device {device} has MAC {} in the save, not {} (the guest keeps its MAC across a restore)", devices::virtio::net::format_mac(saved), devices::virtio::net::format_mac(given))]
    NetMacMismatch {
        /// Device index.
        device: usize,
        /// The saved MAC.
        saved: devices::virtio::net::Mac,
        /// The MAC given.
        given: devices::virtio::net::Mac,
    },
    /// A bug or an unexpected condition inside microvm.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the error comes from the user's input (bad path, bad image,
    /// too many vCPUs, too little memory, no KVM) rather than a runtime failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::KvmUnavailable(_)
                | Error::TooManyVcpus { .. }
                | Error::Memory(MemoryError::InvalidSize(_))
                | Error::Memory(MemoryError::FileSizeMismatch { .. })
                | Error::Memory(MemoryError::OpenFile { .. })
                | Error::Load(_)
                | Error::Snapshot(_)
                | Error::TscMismatch { .. }
                | Error::TooManyDevices(_)
                | Error::Disk(_)
                | Error::Tap(_)
                | Error::NetCountMismatch { .. }
                | Error::NetMacMismatch { .. }
        )
    }
}

/// Compiles the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
