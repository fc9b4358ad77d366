//! Emulated legacy devices on the port I/O bus: the COM1 16550 serial port,
//! the i8042 keyboard controller (used for guest reset), a CMOS/RTC, and a
//! catch-all for ports no device claims.

mod acpi_pm;
mod cmos;
pub mod console;
mod serial;
pub mod virtio;

pub use acpi_pm::{AcpiPm, ACPI_PM_PORT, RESET_VALUE, SLEEP_TYPE_S5};
pub use cmos::Cmos;
pub use serial::{
    new_serial, restore_serial, EventFdTrigger, InputReady, RestoreSerialError, SerialDevice,
    SerialOutput, SerialWriter,
};

use std::sync::atomic::{AtomicU64, Ordering};

use log::debug;
use vm_superio::I8042Device;

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// The i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;
/// CMOS index port.
pub const CMOS_INDEX: u16 = 0x70;
/// CMOS data port.
pub const CMOS_DATA: u16 = 0x71;
/// The RTC's interrupt line.
pub const RTC_IRQ: u32 = 8;
/// The CMOS byte that holds the century (BCD), as the FADT announces it.
pub const RTC_CENTURY_INDEX: u8 = 0x32;

/// Every port I/O device of the VM. The vCPU threads call into it under a lock.
pub struct PioDevices {
    /// COM1.
    pub serial: SerialDevice,
    /// The keyboard controller; its reset trigger ends the VM.
    pub i8042: I8042Device<EventFdTrigger>,
    /// CMOS and RTC.
    pub cmos: Cmos,
    /// ACPI sleep control (power off) and reset register.
    pub acpi_pm: AcpiPm,
    unhandled: AtomicU64,
}

impl PioDevices {
    /// Groups the devices.
    pub fn new(serial: SerialDevice, i8042: I8042Device<EventFdTrigger>, acpi_pm: AcpiPm) -> Self {
        PioDevices {
            serial,
            i8042,
            cmos: Cmos::new(),
            acpi_pm,
            unhandled: AtomicU64::new(0),
        }
    }

    /// Guest reads `data.len()` bytes from `port`. Ports no device owns read as all ones.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match (port, data.len()) {
            (COM1_BASE..=0x3ff, 1) => {
                data[0] = serial::guest_read(&mut self.serial, (port - COM1_BASE) as u8)
            }
            (I8042_DATA | I8042_COMMAND, 1) => data[0] = self.i8042.read((port - I8042_DATA) as u8),
            (CMOS_INDEX | CMOS_DATA, 1) => data[0] = self.cmos.read(port - CMOS_INDEX),
            (ACPI_PM_PORT, 1) => data[0] = self.acpi_pm.read(),
            _ => {
                self.note_unhandled("read", port, data.len());
                data.fill(0xff);
            }
        }
    }

    /// Guest writes `data` to `port`. Writes to ports no device owns are dropped.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        match (port, data.len()) {
            (COM1_BASE..=0x3ff, 1) => {
                if let Err(e) = self.serial.write((port - COM1_BASE) as u8, data[0]) {
                    log::warn!("serial: {e:?}");
                }
            }
            (I8042_DATA | I8042_COMMAND, 1) => {
                if let Err(e) = self.i8042.write((port - I8042_DATA) as u8, data[0]) {
                    log::warn!("i8042: signalling reset failed: {e:?}");
                }
            }
            (CMOS_INDEX | CMOS_DATA, 1) => self.cmos.write(port - CMOS_INDEX, data[0]),
            (ACPI_PM_PORT, 1) => self.acpi_pm.write(data[0]),
            // POST code port: firmware and kernels write progress codes here.
            (0x80, _) => {}
            _ => self.note_unhandled("write", port, data.len()),
        }
    }

    fn note_unhandled(&self, what: &str, port: u16, len: usize) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // Log the first few only: a guest probing hardware pokes many ports.
        if n < 64 {
            debug!("unhandled port {what}: port {port:#x} size {len}");
        }
    }

    /// How many accesses hit ports no device owns.
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}
