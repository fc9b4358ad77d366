//! Initial register state of the boot vCPU for each boot protocol.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_entry, segment_from_gdt, CODE32_FLAGS, CODE64_FLAGS, DATA_FLAGS, TSS_FLAGS};
use super::layout::{
    BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory is too small for the boot structures.
    #[error("cannot write the boot {what} into guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging with an identity map, RSI = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh {
        /// Entry point.
        entry: u64,
        /// Address of the hvm_start_info structure.
        start_info: u64,
    },
}

/// Writes the boot GDT, and for the 64-bit entry the identity page tables
/// (first 4 GiB with 2 MiB pages), and returns the special registers.
pub fn setup_sregs(
    mem: &GuestMemory,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let code = match mode {
        EntryMode::Linux64 { .. } => gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        EntryMode::Pvh { .. } => gdt_entry(CODE32_FLAGS, 0, 0xfffff),
    };
    // Slots 2 and 3 are the __BOOT_CS and __BOOT_DS selectors (0x10, 0x18)
    // the Linux boot protocol asks for.
    let gdt: [u64; super::layout::BOOT_GDT_ENTRIES] = [
        0,
        0,
        code,
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Write { what: "GDT" })?;
    }
    let code_seg = segment_from_gdt(gdt[2], 2);
    let data_seg = segment_from_gdt(gdt[3], 3);
    let tss_seg = segment_from_gdt(gdt[4], 4);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    match mode {
        EntryMode::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let err = |_| RegsError::Write {
        what: "page tables",
    };
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    for dir in 0..4u64 {
        mem.write_obj(
            (PDE_START + dir * 0x1000) | 0x03,
            GuestAddress(PDPTE_START + dir * 8),
        )
        .map_err(err)?;
    }
    // 2048 2 MiB pages: present, writable, page size.
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// General registers for the entry.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
    }
}

/// The FPU as the architecture resets it (x87 control word, MXCSR).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, MemoryBacking};

    #[test]
    fn long_mode_sregs() {
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let s = setup_sregs(
            &mem,
            EntryMode::Linux64 { entry: 0x100000 },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ds.selector, 0x18);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
    }

    #[test]
    fn pvh_sregs_have_paging_off() {
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let s = setup_sregs(
            &mem,
            EntryMode::Pvh {
                entry: 0x100000,
                start_info: 0x6000,
            },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cs.l, 0);
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.efer, 0);
    }
}
