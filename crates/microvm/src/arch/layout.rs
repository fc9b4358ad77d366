//! Where things live in guest physical memory on x86_64.
//!
//! Low memory (below 1 MiB) holds what the VMM builds for the boot: the boot
//! GDT, the zero page, the PVH start info, the identity page tables, the
//! command line, the MP table (in the EBDA) and the ACPI tables (in the BIOS
//! area). Guest RAM runs from 0 up to the 32-bit MMIO gap and continues above
//! 4 GiB when the guest is larger than the gap allows.

/// Start of the EBDA; RAM in the e820 map's first entry ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the BIOS area (0xE0000-0xFFFFF), reserved in the e820 map.
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// Where the ACPI tables start (RSDP first), inside the BIOS area.
pub const ACPI_START: u64 = BIOS_AREA_START;
/// Where the MP floating pointer and table go (the 0xF0000 segment kernels scan).
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of the BIOS area: first byte above it is high memory.
pub const HIMEM_START: u64 = 0x10_0000;

/// The boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of boot GDT entries.
pub const BOOT_GDT_ENTRIES: usize = 5;
/// The Linux zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The PVH start info (struct hvm_start_info).
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH memory map, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Initial stack pointer of the boot vCPU for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Boot page tables: PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Boot page tables: four page directories (2 MiB pages, first 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we accept (bytes, without the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// Start of the 32-bit MMIO gap: low RAM ends here at most.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap: high RAM starts here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_ADDR: u64 = 0xfee0_0000;

/// Address of the TSS pages KVM needs on Intel (three pages below 4 GiB).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel (one page, below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Most vCPUs a VM may have: APIC IDs in the MP table and the MADT are one byte,
/// and 0xff is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;
