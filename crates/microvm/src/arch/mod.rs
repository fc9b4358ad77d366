//! x86_64 specifics: memory layout, boot GDT and registers, CPUID, MSRs,
//! local APIC, and the firmware tables (MP table, ACPI).

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
