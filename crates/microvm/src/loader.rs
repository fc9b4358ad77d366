//! Loading a kernel image (ELF vmlinux or bzImage), its initrd and command
//! line into guest memory, and writing the boot information the chosen entry
//! expects: the Linux zero page with an e820 map, or the PVH start info.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{
    BIOS_AREA_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START,
    PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::arch::regs::EntryMode;
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_START: u64 = 0x6200;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
const LOADED_HIGH: u8 = 1;
const PAGE_SIZE: u64 = 4096;

/// Errors loading a kernel. Most of them are the user's input being wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel or initrd file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(PathBuf),
    /// The image is one of ours but malformed or unsupported.
    #[error("{path}: {reason}")]
    BadImage {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Guest memory is too small for what must be loaded.
    #[error("guest memory too small: {what} needs {needed_mib} MiB of RAM below 3 GiB, the guest has {have_mib} MiB there")]
    MemoryTooSmall {
        /// What did not fit.
        what: &'static str,
        /// MiB needed.
        needed_mib: u64,
        /// MiB there.
        have_mib: u64,
    },
    /// The command line is too long or has a NUL byte.
    #[error("kernel command line invalid: {0}")]
    Cmdline(String),
    /// PVH was asked for but the image has no PVH entry.
    #[error(
        "{0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); boot it with the Linux protocol"
    )]
    NoPvhEntry(PathBuf),
    /// linux-loader refused the image.
    #[error("loading {path}: {source}")]
    Loader {
        /// The file.
        path: PathBuf,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// Writing the boot information failed.
    #[error("writing boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
}

/// Which entry protocol to boot with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the image is an ELF with a PVH note, else the Linux 64-bit protocol.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (ELF `e_entry`, or bzImage load address + 0x200).
    Linux,
    /// The PVH entry of an ELF image.
    Pvh,
}

/// The kernel image formats we load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF64 vmlinux.
    Elf,
    /// A bzImage with a Linux setup header.
    BzImage,
}

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct BootSource {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Optional initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Entry protocol.
    pub protocol: BootProtocol,
}

/// Result of loading: how the boot vCPU enters and what was loaded where.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// Entry mode and address.
    pub entry: EntryMode,
    /// End of the kernel in guest memory.
    pub kernel_end: u64,
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Read {
        path: path.to_owned(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::BadImage {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Tells the format of a kernel image from its first bytes.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, LoadError> {
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let n = read_up_to(file, &mut head).map_err(read_err(path))?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && le_u32(&head, 0x202) == HDRS_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoadError::UnknownFormat(path.to_owned()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The part of a loadable ELF segment that is in memory but not in the
/// file (`.bss`): guest address and length.
type BssRange = (u64, u64);

/// Lowest and highest (exclusive) guest physical address the ELF's loadable
/// segments use, and each segment's `.bss` (memsz beyond filesz).
fn elf_extent(path: &Path, file: &mut File) -> Result<(u64, u64, Vec<BssRange>), LoadError> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    if read_up_to(file, &mut ehdr).map_err(read_err(path))? < 64 {
        return Err(bad(path, "truncated ELF header"));
    }
    if ehdr[4] != 2 || ehdr[5] != 1 || le_u16(&ehdr, 18) != 62 {
        return Err(bad(path, "not a little-endian x86_64 ELF64 image"));
    }
    let phoff = le_u64(&ehdr, 0x20);
    let phentsize = le_u16(&ehdr, 0x36) as usize;
    let phnum = le_u16(&ehdr, 0x38) as usize;
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return Err(bad(path, "ELF program header table is invalid"));
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).map_err(read_err(path))?;
    if read_up_to(file, &mut table).map_err(read_err(path))? < table.len() {
        return Err(bad(path, "truncated ELF program headers"));
    }
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let mut bss = Vec::new();
    for ph in table.chunks_exact(phentsize) {
        const PT_LOAD: u32 = 1;
        let (filesz, memsz) = (le_u64(ph, 32), le_u64(ph, 40));
        if le_u32(ph, 0) != PT_LOAD || memsz == 0 {
            continue;
        }
        let paddr = le_u64(ph, 24);
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad(path, "ELF segment wraps around"))?;
        if filesz > memsz {
            return Err(bad(
                path,
                "ELF segment has more file bytes than memory bytes",
            ));
        }
        if memsz > filesz {
            bss.push((paddr + filesz, memsz - filesz));
        }
        lo = lo.min(paddr);
        hi = hi.max(end);
    }
    if hi == 0 {
        return Err(bad(path, "ELF image has no loadable segments"));
    }
    if lo < HIMEM_START {
        return Err(bad(
            path,
            format!("ELF segment at {lo:#x} is below 1 MiB, where the boot structures live"),
        ));
    }
    Ok((lo, hi, bss))
}

/// Zeroes each segment's `.bss`, as the ELF specification asks: guest
/// memory is not always zero to begin with (a reused `--mem-file`).
fn zero_bss(mem: &GuestMemory, path: &Path, bss: &[BssRange]) -> Result<(), LoadError> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    for &(start, len) in bss {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            mem.write_slice(&ZEROS[..n], GuestAddress(start + done))
                .map_err(|e| bad(path, format!("zeroing .bss at {:#x}: {e}", start + done)))?;
            done += n as u64;
        }
    }
    Ok(())
}

/// The RAM layout as the guest is told in e820 form: (address, size, type).
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (
            BIOS_AREA_START,
            HIMEM_START - BIOS_AREA_START,
            E820_RESERVED,
        ),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().0 == 0)
        .map(|r| r.len())
        .next()
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Loads the kernel, initrd and command line, and writes the boot information
/// (zero page and PVH start info). `rsdp` is the ACPI RSDP address to pass on.
pub fn load(
    mem: &GuestMemory,
    source: &BootSource,
    rsdp: Option<u64>,
) -> Result<LoadedKernel, LoadError> {
    let path = source.kernel.as_path();
    let mut file = File::open(path).map_err(read_err(path))?;
    let format = detect_format(path, &mut file)?;
    let low_end = low_ram_end(mem);
    let have_mib = low_end >> 20;

    let cmdline = source.cmdline.as_bytes();
    if cmdline.len() > CMDLINE_MAX_SIZE || cmdline.contains(&0) {
        return Err(LoadError::Cmdline(format!(
            "it must be at most {CMDLINE_MAX_SIZE} bytes without NUL bytes"
        )));
    }

    // Check the image fits before copying anything, so that a too-small guest
    // gets a clear message rather than a loader error.
    let mut setup_header = None;
    let (entry_linux, pvh, kernel_end) = match format {
        KernelFormat::Elf => {
            let (_, hi, bss) = elf_extent(path, &mut file)?;
            if hi > low_end {
                return Err(LoadError::MemoryTooSmall {
                    what: "the kernel",
                    needed_mib: mib_up(hi),
                    have_mib,
                });
            }
            let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
                |source| LoadError::Loader {
                    path: path.to_owned(),
                    source,
                },
            )?;
            zero_bss(mem, path, &bss)?;
            let pvh = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            (res.kernel_load.0, pvh, res.kernel_end)
        }
        KernelFormat::BzImage => {
            let mut hdr = [0u8; 0x268];
            file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
            if read_up_to(&mut file, &mut hdr).map_err(read_err(path))? < hdr.len() {
                return Err(bad(path, "truncated bzImage setup header"));
            }
            let version = le_u16(&hdr, 0x206);
            if version < 0x020c || le_u16(&hdr, 0x236) & XLF_KERNEL_64 == 0 {
                return Err(bad(
                    path,
                    format!("boot protocol {version:#06x} without a 64-bit entry (need 2.12 and XLF_KERNEL_64)"),
                ));
            }
            if hdr[0x211] & LOADED_HIGH == 0 {
                return Err(bad(path, "zImage (not loaded high) is not supported"));
            }
            let init_size = u64::from(le_u32(&hdr, 0x260));
            let needed = HIMEM_START + init_size;
            if needed > low_end {
                return Err(LoadError::MemoryTooSmall {
                    what: "the kernel (its init_size)",
                    needed_mib: mib_up(needed),
                    have_mib,
                });
            }
            let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|source| LoadError::Loader {
                    path: path.to_owned(),
                    source,
                })?;
            setup_header = res.setup_header;
            (res.kernel_load.0 + 0x200, None, needed.max(res.kernel_end))
        }
    };

    let entry = match (source.protocol, pvh) {
        (BootProtocol::Pvh, None) => return Err(LoadError::NoPvhEntry(path.to_owned())),
        (BootProtocol::Pvh | BootProtocol::Auto, Some(pvh_entry)) => EntryMode::Pvh {
            entry: pvh_entry,
            start_info: PVH_INFO_START,
        },
        (_, _) => EntryMode::Linux64 { entry: entry_linux },
    };

    // Initrd at the top of low RAM, page aligned, above the kernel.
    let initrd = match &source.initrd {
        None => None,
        Some(ipath) => {
            let mut f = File::open(ipath).map_err(read_err(ipath))?;
            let size = f.metadata().map_err(read_err(ipath))?.len();
            let mut top = low_end;
            if let Some(h) = setup_header {
                let max = u64::from(h.initrd_addr_max);
                if max != 0 {
                    top = top.min(max + 1);
                }
            }
            let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
            match addr {
                Some(a) if size > 0 && a >= kernel_end => {
                    mem.read_exact_volatile_from(GuestAddress(a), &mut f, size as usize)
                        .map_err(|e| LoadError::Read {
                            path: ipath.clone(),
                            source: std::io::Error::other(e.to_string()),
                        })?;
                    Some((a, size))
                }
                Some(_) if size == 0 => None,
                _ => {
                    return Err(LoadError::MemoryTooSmall {
                        what: "the kernel and initrd",
                        needed_mib: mib_up(kernel_end + size),
                        have_mib,
                    })
                }
            }
        }
    };

    let mut cmdline_buf = cmdline.to_vec();
    cmdline_buf.push(0);
    mem.write_slice(&cmdline_buf, GuestAddress(CMDLINE_START))
        .map_err(|_| LoadError::Cmdline("cannot write it into guest memory".into()))?;

    write_zero_page(mem, setup_header, cmdline.len(), initrd, rsdp)?;
    if let EntryMode::Pvh { .. } = entry {
        write_pvh_info(mem, initrd, rsdp)?;
    }

    Ok(LoadedKernel {
        format,
        entry,
        kernel_end,
        initrd,
    })
}

fn write_zero_page(
    mem: &GuestMemory,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), LoadError> {
    let mut params = boot_params::default();
    if let Some(h) = setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r;
    }
    let map = e820_map(mem);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)?;
    Ok(())
}

fn write_pvh_info(
    mem: &GuestMemory,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), LoadError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        bp.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    bp.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, MemoryBacking};

    fn tmp(name: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("microvm-loader-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let p = tmp("garbage", &[0x55; 4096]);
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let src = BootSource {
            kernel: p.clone(),
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, &src, None),
            Err(LoadError::UnknownFormat(_))
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn empty_file_is_not_a_kernel() {
        let p = tmp("empty", &[]);
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let src = BootSource {
            kernel: p.clone(),
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, &src, None),
            Err(LoadError::UnknownFormat(_))
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn truncated_elf_is_reported() {
        let p = tmp("trunc-elf", b"\x7fELF\x02\x01\x01");
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        let src = BootSource {
            kernel: p.clone(),
            ..Default::default()
        };
        assert!(matches!(
            load(&mem, &src, None),
            Err(LoadError::BadImage { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn elf_bss_is_zeroed_in_memory_that_was_not_zero() {
        // One PT_LOAD at 2 MiB: 4 bytes in the file (an endless loop), 8 KiB in memory.
        let paddr = 2u64 << 20;
        let code = [0xeb, 0xfe, 0x90, 0x90];
        let mut f = vec![0u8; 0x1000 + code.len()];
        f[0..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        f[16] = 2; // ET_EXEC
        f[18] = 62; // EM_X86_64
        f[20] = 1;
        f[24..32].copy_from_slice(&paddr.to_le_bytes());
        f[32] = 64; // e_phoff
        f[52] = 64;
        f[54] = 56;
        f[56] = 1;
        let ph = 64;
        f[ph] = 1; // PT_LOAD
        f[ph + 4] = 5;
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes());
        f[0x1000..].copy_from_slice(&code);
        let p = tmp("bss-elf", &f);
        let mem = create_guest_memory(16, &MemoryBacking::Anonymous).unwrap();
        mem.write_slice(&[0xa5; 0x3000], GuestAddress(paddr))
            .unwrap();
        let src = BootSource {
            kernel: p.clone(),
            ..Default::default()
        };
        load(&mem, &src, None).unwrap();
        let mut back = [0u8; 0x3000];
        mem.read_slice(&mut back, GuestAddress(paddr)).unwrap();
        assert_eq!(&back[..4], &code);
        assert!(back[4..0x2000].iter().all(|b| *b == 0), ".bss not zeroed");
        assert!(
            back[0x2000..].iter().all(|b| *b == 0xa5),
            "beyond memsz changed"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn e820_has_holes_for_bios_and_gap() {
        let mem = create_guest_memory(4 << 10, &MemoryBacking::Anonymous).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert!(map.contains(&(HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)));
        assert!(map.contains(&(1 << 32, (4 << 30) - MMIO_GAP_START, E820_RAM)));
    }
}
