//! Guest RAM: its layout in guest physical address space and its host backing.
//!
//! RAM is one region from address 0 up to the 32-bit MMIO gap and, for guests
//! larger than that, a second region from 4 GiB. The backing is anonymous
//! private memory by default, or a host file mapped shared, so that the host
//! sees (and keeps) what the guest writes. Each region tracks the VMM's own
//! writes into it for whoever observes them ([`writes`]: live migration).

mod writes;

pub use writes::{observe_writes, WriteObserver, WriteTracker};

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as this crate uses it: vm-memory's mmap backend, each
/// region with a [`WriteTracker`] for the VMM's own writes.
pub type GuestMemory = GuestMemoryMmap<WriteTracker>;
/// One region of [`GuestMemory`].
pub type GuestRegion = GuestRegionMmap<WriteTracker>;

/// Smallest guest we build: the boot structures live in the first MiB and a
/// kernel needs room above it.
pub const MIN_MEM_MIB: u64 = 4;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("guest memory of {0} MiB is invalid: it must be at least {MIN_MEM_MIB} MiB and fit the host address space")]
    InvalidSize(u64),
    /// The backing file could not be opened or created.
    #[error("cannot open memory file {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The backing file exists with another size.
    #[error("memory file {path} is {actual} bytes but the guest needs {expected} bytes")]
    FileSizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size the guest needs.
        expected: u64,
    },
    /// Sizing the backing file failed.
    #[error("cannot size memory file {path}: {source}")]
    SizeFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// Faulting the memory in ahead failed (out of memory, or a kernel
    /// older than 5.14, which lacks `MADV_POPULATE_WRITE`).
    #[error("cannot fault in guest memory ahead: {0}")]
    Populate(std::io::Error),
}

/// One range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// First guest physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Where `size` bytes of guest RAM go: below the MMIO gap first, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_GAP_START {
        vec![RamRange {
            start: 0,
            len: size,
        }]
    } else {
        vec![
            RamRange {
                start: 0,
                len: MMIO_GAP_START,
            },
            RamRange {
                start: MMIO_GAP_END,
                len: size - MMIO_GAP_START,
            },
        ]
    }
}

/// How guest RAM is backed on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous private memory, zero-filled.
    #[default]
    Anonymous,
    /// A host file mapped shared: created and sized if absent, reused if it has the right size.
    SharedFile(PathBuf),
}

/// Maps guest RAM of `size_mib` MiB with the given backing.
pub fn create_guest_memory(
    size_mib: u64,
    backing: &MemoryBacking,
) -> Result<GuestMemory, MemoryError> {
    let size = size_mib
        .checked_mul(1 << 20)
        .filter(|_| size_mib >= MIN_MEM_MIB)
        .filter(|s| usize::try_from(*s).is_ok() && *s < (1 << 46))
        .ok_or(MemoryError::InvalidSize(size_mib))?;
    let ranges = ram_ranges(size);
    match backing {
        MemoryBacking::Anonymous => anonymous_memory(&ranges),
        MemoryBacking::SharedFile(path) => {
            let file = Arc::new(open_backing_file(path, size)?);
            let mut offset = 0u64;
            let mut regions = Vec::with_capacity(ranges.len());
            for r in &ranges {
                let at = FileOffset::from_arc(Arc::clone(&file), offset);
                regions.push(map_region(r.start, r.len, Some(at), SHARED)?);
                offset += r.len;
            }
            collect(regions)
        }
    }
}

/// Faults all of `memory` in for writing now (`MADV_POPULATE_WRITE`), so
/// that the first write to each page later costs no fault: a migration's
/// destination does this before it waits, as QEMU's `-mem-prealloc` does,
/// where faulting in fresh memory is slow. The contents do not change
/// (fresh memory stays zero).
pub fn populate(memory: &GuestMemory) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in memory.iter() {
        let len = usize::try_from(r.len()).map_err(|_| {
            MemoryError::Populate(std::io::Error::from(std::io::ErrorKind::InvalidInput))
        })?;
        // SAFETY: the range is a live mapping owned by `memory`;
        // MADV_POPULATE_WRITE only faults pages in and never alters data.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(MemoryError::Populate(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// mmap flags of anonymous guest RAM (as vm-memory's `from_ranges`).
const ANONYMOUS: i32 = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE;
/// mmap flags of guest RAM shared with its backing file.
const SHARED: i32 = libc::MAP_NORESERVE | libc::MAP_SHARED;
/// mmap flags of guest RAM read copy-on-write from a file.
const PRIVATE_FILE: i32 = libc::MAP_NORESERVE | libc::MAP_PRIVATE;

/// Maps one region of `len` bytes at guest address `start`, read-write,
/// with its [`WriteTracker`].
fn map_region(
    start: u64,
    len: u64,
    file: Option<FileOffset>,
    flags: i32,
) -> Result<GuestRegion, MemoryError> {
    let size = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(len >> 20))?;
    let mut builder = MmapRegionBuilder::new_with_bitmap(size, WriteTracker::new(start))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags);
    if let Some(file) = file {
        builder = builder.with_file_offset(file);
    }
    let mapping = builder.build().map_err(|e| MemoryError::Map(e.into()))?;
    GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::InvalidSize(len >> 20))
}

fn collect(regions: Vec<GuestRegion>) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.into()))
}

/// Maps zero-filled anonymous guest RAM over `ranges` (sorted, disjoint).
pub fn anonymous_memory(ranges: &[RamRange]) -> Result<GuestMemory, MemoryError> {
    let regions = ranges
        .iter()
        .map(|r| map_region(r.start, r.len, None, ANONYMOUS))
        .collect::<Result<Vec<_>, _>>()?;
    collect(regions)
}

fn open_backing_file(path: &Path, size: u64) -> Result<std::fs::File, MemoryError> {
    use std::os::unix::fs::OpenOptionsExt;
    // A file created here holds guest memory: owner-only (0600).
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_owned(),
            source,
        })?;
    let actual = file
        .metadata()
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_owned(),
            source,
        })?
        .len();
    if actual == 0 {
        file.set_len(size).map_err(|source| MemoryError::SizeFile {
            path: path.to_owned(),
            source,
        })?;
    } else if actual != size {
        return Err(MemoryError::FileSizeMismatch {
            path: path.to_owned(),
            actual,
            expected: size,
        });
    }
    Ok(file)
}

/// A guest RAM range backed by part of a file (see [`map_file_private`]).
#[derive(Clone, Debug)]
pub struct FileRange {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// The file.
    pub file: Arc<std::fs::File>,
    /// Offset of the range in the file.
    pub offset: u64,
}

/// Maps file ranges copy-on-write (MAP_PRIVATE) as guest memory: reads come
/// from the file on first touch (holes read as zeros), writes stay private
/// to this process. The file must outlive the VM (it does: the mapping holds it).
pub fn map_file_private(ranges: &[FileRange]) -> Result<GuestMemory, MemoryError> {
    let regions = ranges
        .iter()
        .map(|r| {
            let at = FileOffset::from_arc(Arc::clone(&r.file), r.offset);
            map_region(r.guest_addr, r.size, Some(at), PRIVATE_FILE)
        })
        .collect::<Result<Vec<_>, _>>()?;
    collect(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn populated_memory_is_resident_and_still_zero() {
        let mem = create_guest_memory(8, &MemoryBacking::Anonymous).unwrap();
        populate(&mem).unwrap();
        let region = mem.iter().next().unwrap();
        let pages = (region.len() / 4096) as usize;
        let mut resident = vec![0u8; pages];
        // SAFETY: the range is `region`'s live mapping; `resident` holds one
        // byte per page of it.
        let rc = unsafe {
            libc::mincore(
                region.as_ptr().cast(),
                region.len() as usize,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        assert!(resident.iter().all(|b| b & 1 == 1));
        let mut buf = [0xffu8; 4096];
        mem.read_slice(&mut buf, vm_memory::GuestAddress(4 << 20))
            .unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                start: 0,
                len: 256 << 20
            }]
        );
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_GAP_START);
        assert_eq!(r[1].start, MMIO_GAP_END);
        assert_eq!(r[0].len + r[1].len, 4 << 30);
    }

    #[test]
    fn rejects_tiny_guest() {
        assert!(matches!(
            create_guest_memory(1, &MemoryBacking::Anonymous),
            Err(MemoryError::InvalidSize(1))
        ));
    }

    #[test]
    fn file_backing_is_shared_with_the_host() {
        let dir = std::env::temp_dir().join(format!("microvm-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let _ = std::fs::remove_file(&path);
        let mem = create_guest_memory(8, &MemoryBacking::SharedFile(path.clone())).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        drop(mem);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 8 << 20);
        assert_eq!(&data[0x1000..0x1004], &0xdead_beef_u32.to_le_bytes());
        // A file of the wrong size is refused.
        assert!(matches!(
            create_guest_memory(16, &MemoryBacking::SharedFile(path.clone())),
            Err(MemoryError::FileSizeMismatch { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
