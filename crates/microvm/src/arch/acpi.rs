//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) so that kernels that find CPUs
//! and the IOAPIC only through ACPI (such as Debian's cloud kernel) see them.
//!
//! The FADT declares a hardware-reduced ACPI platform: no SCI, no PM timer,
//! no legacy PIC for Linux to program. On such a platform Linux sets up no
//! ISA interrupt lines by itself, so every legacy device that wants an
//! interrupt must be described in the DSDT with its resources: COM1
//! (`PNP0501`, IRQ 4) and the CMOS RTC (`PNP0B00`, IRQ 8). Without them the
//! 8250 driver cannot get IRQ 4 (user-space console output never leaves the
//! transmit queue) and `rtc_cmos` fails its probe with -EINVAL.
//!
//! Virtio-mmio devices are described the same way (`LNRO0005`, their 4 KiB
//! MMIO window and interrupt line), which is how Linux's `virtio_mmio`
//! driver finds them on kernels built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's, among others).

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_START, APIC_ADDR, IOAPIC_ADDR, MPTABLE_START};
use crate::devices::{
    ACPI_PM_PORT, CMOS_INDEX, COM1_BASE, COM1_IRQ, RESET_VALUE, RTC_IRQ, SLEEP_TYPE_S5,
};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"CRYO  ";
const OEM_TABLE_ID: [u8; 8] = *b"CRYOVM  ";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA and no MSI (there is no PCI bus).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the BIOS area.
    #[error("ACPI tables of {0} bytes do not fit below 1 MiB")]
    TooLarge(usize),
    /// Writing them to guest memory failed.
    #[error("cannot write ACPI tables into guest memory")]
    Write,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// A legacy ISA device in the DSDT: its PNP id, one port range, one
/// edge-triggered active-high interrupt.
fn isa_device(path: &str, pnp_id: &str, port: u16, ports: u8, irq: u32) -> Vec<u8> {
    let hid = EISAName::new(pnp_id);
    let interrupt = Interrupt::new(true, true, false, false, irq);
    let io = IO::new(port, port, 0, ports);
    let resources = ResourceTemplate::new(vec![&io, &interrupt]);
    let hid_name = Name::new("_HID".into(), &hid);
    let crs_name = Name::new("_CRS".into(), &resources);
    bytes_of(&Device::new(path.into(), vec![&hid_name, &crs_name]))
}

/// A virtio-mmio device in the DSDT: `LNRO0005`, its window, its interrupt.
fn virtio_mmio_device(slot: usize, base: u64, irq: u32) -> Vec<u8> {
    let hid: &'static str = "LNRO0005";
    let uid = slot as u32;
    let mem = Memory32Fixed::new(
        true,
        base as u32,
        crate::devices::virtio::MMIO_WINDOW as u32,
    );
    let interrupt = Interrupt::new(true, true, false, false, irq);
    let resources = ResourceTemplate::new(vec![&mem, &interrupt]);
    let hid_name = Name::new("_HID".into(), &hid);
    let uid_name = Name::new("_UID".into(), &uid);
    let crs_name = Name::new("_CRS".into(), &resources);
    let path = format!("_SB_.VR{slot:02X}");
    bytes_of(&Device::new(
        path.as_str().into(),
        vec![&hid_name, &uid_name, &crs_name],
    ))
}

/// The DSDT: the legacy devices that raise interrupts, the sleep type of
/// soft-off (`\_S5`) that the guest writes to power off, and
/// `virtio_devices` virtio-mmio devices in slots 0, 1, ...
fn dsdt(virtio_devices: usize) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_type = SLEEP_TYPE_S5;
    let s5 = Package::new(vec![&s5_type]);
    dsdt.append_slice(&bytes_of(&Name::new("_S5_".into(), &s5)));
    dsdt.append_slice(&isa_device("_SB_.COM1", "PNP0501", COM1_BASE, 8, COM1_IRQ));
    dsdt.append_slice(&isa_device("_SB_.RTC_", "PNP0B00", CMOS_INDEX, 2, RTC_IRQ));
    for slot in 0..virtio_devices {
        if let Some(irq) = crate::devices::virtio::mmio_irq(slot) {
            let base = crate::devices::virtio::mmio_base(slot);
            dsdt.append_slice(&virtio_mmio_device(slot, base, irq));
        }
    }
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

/// Writes the ACPI tables for `vcpus` vCPUs and `virtio_devices` virtio-mmio
/// devices; returns the RSDP address.
pub fn setup_acpi(mem: &GuestMemory, vcpus: u8, virtio_devices: usize) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + 36);
    // The XSDT has three entries: FADT, MADT (DSDT is reached through the FADT).
    let xsdt_len = 36 + 3 * 8;
    let dsdt_addr = align16(xsdt_addr + xsdt_len);

    let dsdt_bytes = dsdt(virtio_devices);
    let fadt_addr = align16(dsdt_addr + dsdt_bytes.len() as u64);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED).into();
    // The CMOS byte that holds the century, read by Linux's rtc_cmos.
    fadt.century = crate::devices::RTC_CENTURY_INDEX;
    // One byte-wide port is the sleep control, sleep status and reset
    // register: power off (S5) and reset end the VM.
    let pm_port = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_PM_PORT),
    );
    fadt.sleep_control_reg = pm_port;
    fadt.sleep_status_reg = pm_port;
    fadt.reset_reg = pm_port;
    fadt.reset_value = RESET_VALUE;
    let fadt_bytes = bytes_of(&fadt.finalize());
    let madt_addr = align16(fadt_addr + fadt_bytes.len() as u64);

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    let madt_bytes = bytes_of(&madt);
    let end = madt_addr + madt_bytes.len() as u64;
    if end > MPTABLE_START {
        return Err(AcpiError::TooLarge((end - ACPI_START) as usize));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = bytes_of(&xsdt);
    let rsdp_bytes = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, bytes) in [
        (rsdp_addr, &rsdp_bytes),
        (xsdt_addr, &xsdt_bytes),
        (dsdt_addr, &dsdt_bytes),
        (fadt_addr, &fadt_bytes),
        (madt_addr, &madt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, MemoryBacking};

    fn checksum_ok(mem: &GuestMemory, addr: u64, len: usize) -> bool {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let rsdp = setup_acpi(&mem, 4, 2).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(checksum_ok(&mem, rsdp, 20));
        assert!(checksum_ok(&mem, rsdp, 36));
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let xsdt_len: u32 = mem.read_obj(GuestAddress(xsdt + 4)).unwrap();
        assert!(checksum_ok(&mem, xsdt, xsdt_len as usize));
        let mut found_madt = false;
        for i in 0..(xsdt_len as u64 - 36) / 8 {
            let t: u64 = mem.read_obj(GuestAddress(xsdt + 36 + 8 * i)).unwrap();
            let mut s = [0u8; 4];
            mem.read_slice(&mut s, GuestAddress(t)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(t + 4)).unwrap();
            assert!(checksum_ok(&mem, t, len as usize), "{:?}", s);
            if &s == b"APIC" {
                found_madt = true;
                // Header 44 bytes + 4 local APICs (8 bytes) + IOAPIC (12 bytes).
                assert_eq!(len, 44 + 4 * 8 + 12);
            }
        }
        assert!(found_madt);
    }
}
