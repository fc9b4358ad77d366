//! The cryo test kernel.
//!
//! A tiny x86_64 guest kernel image, built from C and GNU assembly (in
//! `kernel/`) by this crate's build script with the system C compiler. It is
//! the guest of cryo's test suite: an ELF64 image loaded at 1 MiB with both a
//! Linux 64-bit boot protocol entry (`e_entry`) and a PVH entry
//! (`XEN_ELFNOTE_PHYS32_ENTRY`). After a short ring-0 prologue (page tables,
//! GDT, TSS with an I/O bitmap for COM1, IDT, AP start-up) every vCPU drops to
//! ring 3 and runs a self-verifying memory workload: it fills its share of
//! guest memory with a pattern derived from (page, generation, salt), keeps
//! rewriting pages and bumping generations, continuously re-verifies pages,
//! and prints heartbeats and any mismatch on the serial console (COM1).
//!
//! The command line options and every output line are specified in
//! `docs/test-kernel.md` at the workspace root.

use std::path::Path;

/// Absolute path of the built kernel image (an ELF64 executable).
pub const KERNEL_PATH: &str = concat!(env!("OUT_DIR"), "/cryo-test-kernel.elf");

/// The built kernel image, as a [`Path`].
pub fn kernel_path() -> &'static Path {
    Path::new(KERNEL_PATH)
}

/// The kernel image itself (about 100 KiB), for programs that must work
/// without the build tree (e.g. an installed `cryo bench`).
pub static KERNEL_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cryo-test-kernel.elf"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_x86_64_elf() {
        let bytes = std::fs::read(kernel_path()).expect("kernel image exists");
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(bytes[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 62, "EM_X86_64");
        let entry = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        assert!(entry >= 0x10_0000, "entry {entry:#x} at or above 1 MiB");
    }
}
