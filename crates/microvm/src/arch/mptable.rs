//! The Intel MultiProcessor table (spec 1.4) in the BIOS area, for kernels that
//! look for CPUs and the IOAPIC there rather than in ACPI.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, MPTABLE_START};
use crate::memory::GuestMemory;

/// ISA interrupts routed through the IOAPIC (0-15).
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the space reserved.
    #[error("an MP table for {0} vCPUs does not fit below 1 MiB")]
    TooLarge(u8),
    /// Writing it failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table bytes for `vcpus` vCPUs placed at `base`.
fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let config_addr = base + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        // CPU signature: family 6; features: FPU, APIC.
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        e[8..12].copy_from_slice(&((1u32 << 0) | (1 << 9)).to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC, with the ID after the CPUs.
    let ioapic_id = vcpus;
    let mut e = [0u8; 8];
    e[0] = 2;
    e[1] = ioapic_id;
    e[2] = IOAPIC_VERSION;
    e[3] = 1;
    e[4..8].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // ISA IRQ i -> IOAPIC pin i (IRQ 0 is the 8259's ExtINT on pin 0).
    for irq in 0..ISA_IRQS {
        let kind = if irq == 0 { MP_EXTINT } else { MP_INT };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    header[4..6].copy_from_slice(&length.to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"CRYO    ");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    let mut config = header.to_vec();
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = [0u8; 16];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&(config_addr as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4;
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&config);
    out
}

/// Writes the MP table for `vcpus` vCPUs at the start of the 0xF0000 segment,
/// where kernels scan for the floating pointer.
pub fn setup_mptable(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(MPTABLE_START, vcpus);
    if bytes.len() > 0x1_0000 {
        return Err(MptableError::TooLarge(vcpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(MPTABLE_START, 2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[0..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
    }

    #[test]
    fn largest_vm_fits() {
        assert!(build(MPTABLE_START, crate::arch::layout::MAX_VCPUS).len() <= 0x1_0000);
    }
}
