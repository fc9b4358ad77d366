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

/// Bytes of one block of the disk the kernel's disk reader (`cryo.blk`)
/// reads, and of one of its slots.
pub const READER_BLOCK: usize = 4096;

/// MurmurHash3's 64-bit finalizer, as `fmix64` in `kernel/kernel.h`.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Block `b` of the disk the disk reader checks (`blk_word` in
/// `kernel/blk.c`): word `j` is `fmix64(((b << 9) | j) ^ 0xb10c5eed)`,
/// little endian.
pub fn reader_block(b: u64) -> Vec<u8> {
    (0..(READER_BLOCK / 8) as u64)
        .flat_map(|j| fmix64(((b << 9) | j) ^ 0xb10c_5eed).to_le_bytes())
        .collect()
}

/// Writes a disk of `blocks` reader blocks at `path`.
pub fn write_reader_disk(path: &Path, blocks: u64) -> std::io::Result<()> {
    let bytes: Vec<u8> = (0..blocks).flat_map(reader_block).collect();
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_blocks_differ_and_match_the_kernels_pattern() {
        let b0 = reader_block(0);
        assert_eq!(b0.len(), READER_BLOCK);
        assert_ne!(b0, reader_block(1));
        // fmix64(0xb10c5eed), word 0 of block 0.
        assert_eq!(&b0[..8], &fmix64(0xb10c_5eed).to_le_bytes());
    }

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
