//! Virtio 1.x devices on the MMIO transport.
//!
//! [`MmioTransport`] implements the virtio-mmio register block (version 2,
//! "modern") over any [`VirtioDevice`]; [`block::Block`] is a virtio-blk
//! device backed by a raw file, [`net::Net`] a virtio-net device on a host
//! tap ([`tap::Tap`]). Each transport sits in a 4 KiB window of the
//! 32-bit MMIO gap ([`mmio_base`]) and raises its interrupt through an irqfd
//! on an IOAPIC pin ([`mmio_irq`]); the guest finds it in the ACPI DSDT
//! (`LNRO0005` devices, see [`crate::arch::acpi`]), or, for kernels booted
//! without ACPI but built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, from
//! command-line entries the user adds ([`cmdline_entry`]). Queue
//! notifications arrive on ioeventfds that the VM's event loop watches.
//!
//! The guest is not trusted: a bad descriptor chain, a ring index out of
//! range, or a buffer outside guest memory makes the device report an error
//! to the driver (`DEVICE_NEEDS_RESET`, queue processing stops), and never
//! panics the host.

pub mod block;
pub mod bus;
pub mod disk_copy;
mod mmio;
pub mod net;
pub mod state;
pub mod tap;

pub use mmio::MmioTransport;

use std::os::fd::BorrowedFd;

use virtio_queue::Queue;

use crate::arch::layout::MMIO_GAP_START;
use crate::memory::{GuestMemory, WriteTracker};

/// virtio-queue's reader of a chain's device-readable buffers in [`GuestMemory`].
type ChainReader<'a> = virtio_queue::Reader<'a, vm_memory::bitmap::RefSlice<'a, WriteTracker>>;
/// virtio-queue's writer into a chain's device-writable buffers in
/// [`GuestMemory`]: its writes reach the regions' [`WriteTracker`]s.
type ChainWriter<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::RefSlice<'a, WriteTracker>>;

/// Size of each device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// First device window: 256 MiB into the 32-bit MMIO gap, well clear of
/// RAM (which ends at the gap) and of the IOAPIC and LAPIC near 4 GiB.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START + 0x1000_0000;
/// IOAPIC pins for virtio devices: ISA lines no emulated device uses
/// (COM1 is 4, the RTC 8).
pub const VIRTIO_IRQS: [u32; 8] = [5, 6, 7, 9, 10, 11, 12, 13];
/// Most virtio devices a VM can have.
pub const MAX_DEVICES: usize = VIRTIO_IRQS.len();

/// The guest physical address of device `slot`'s window.
pub fn mmio_base(slot: usize) -> u64 {
    MMIO_DEVICES_START + slot as u64 * MMIO_WINDOW
}

/// The IOAPIC pin (GSI) of device `slot`, if the slot exists.
pub fn mmio_irq(slot: usize) -> Option<u32> {
    VIRTIO_IRQS.get(slot).copied()
}

/// The kernel command-line parameter that announces device `slot` to
/// Linux's virtio_mmio driver (for kernels that do not read the DSDT; do not
/// combine with ACPI, which already announces the device).
pub fn cmdline_entry(slot: usize) -> Option<String> {
    let irq = mmio_irq(slot)?;
    Some(format!(
        "virtio_mmio.device=4K@{:#x}:{irq}",
        mmio_base(slot)
    ))
}

/// Errors of virtio devices. Those caused by the guest put the device in
/// the `DEVICE_NEEDS_RESET` state; none ends the VM.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver broke the queue protocol (ring index out of range,
    /// queue used before it was set up, ring outside guest memory).
    #[error("virtio queue {queue}: {source}")]
    Queue {
        /// The queue index.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// A request's descriptor chain is malformed (missing header or
    /// status byte, buffers outside guest memory).
    #[error("bad descriptor chain at head {head}: {reason}")]
    BadChain {
        /// The head descriptor's index.
        head: u16,
        /// What is wrong.
        reason: String,
    },
    /// A queue index the device does not have.
    #[error("no queue {0}")]
    NoQueue(usize),
    /// A host-side failure (eventfd, backing file).
    #[error("host I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The tap of a net device failed.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// Saved state that does not fit the device it is restored into.
    #[error("device state: {0}")]
    State(String),
}

/// A virtio device behind a transport: its identity, features, config
/// space and request handling.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (`VIRTIO_F_VERSION_1` included).
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device's config space, as the driver reads it.
    fn config_space(&self) -> Vec<u8>;
    /// Reads device config space at `offset` (bytes past its end read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    /// Writes device config space (by default read-only: ignored).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves every available request of queue `index`. Returns whether
    /// any buffer was returned to the driver (an interrupt is due).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, VirtioError>;
    /// Completes outstanding work (e.g. flushes the disk) before a save.
    fn quiesce(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// The driver started the device with features `acked` (DRIVER_OK,
    /// or a restore of a started device): apply what depends on them.
    fn activate(&mut self, _acked: u64) -> Result<(), VirtioError> {
        Ok(())
    }
    /// A host fd whose readability means work for a queue (a tap's
    /// incoming frames for the receive queue), and that queue's index.
    /// The event loop watches it edge-triggered: the device reads it until
    /// it would block or the queue has no more buffers.
    fn backend(&self) -> Option<(BorrowedFd<'_>, usize)> {
        None
    }
}

#[cfg(test)]
mod tests;
