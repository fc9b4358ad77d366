//! Point-in-time snapshot of memory that other threads keep writing (a running
//! VM's RAM written by its vCPUs), with userfaultfd write-protection, as QEMU's
//! background snapshot does.
//!
//! 1. [`arm`] (call it while the writers are paused: this is time T0) creates
//!    a userfaultfd, registers every [`MemRange`] in write-protect mode and
//!    write-protects all of it. Then the owner resumes its writers.
//! 2. [`Armed::run`] copies every block exactly once to a [`BlockSink`]:
//!    walker threads copy blocks straight from the still-protected memory and
//!    leave them protected; a fault thread serves writers that hit a protected
//!    block (not yet copied: copy the written page to a buffer and un-protect
//!    only that page, so the writer goes on; the block's walker takes the
//!    copy instead of memory; copied already: un-protect the block). The
//!    sink sees exactly the memory at T0.
//! 3. Protection is always removed before `run`, [`Armed::disarm`] or the
//!    drop of an [`Armed`] returns, also on error and on cancel
//!    ([`CancelHandle`]).
//!
//! To keep the writers' pause short whatever the memory size, protect ahead
//! of it: [`prepare`] and [`Prepared::pre_arm`] while the writers run (their
//! writes are let through and remembered), then [`PreArmed::arm`] in the
//! pause re-protects only the blocks written since (module `prearm`).
//!
//! [`check_support`] says what the kernel offers. Never-touched anonymous
//! memory is protected with `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4) or,
//! without it, by pre-touching (read-faulting) every page at arm time.
//! The design, guarantees and traps are in `docs/bg-snapshot.md`.
//!
//! ```
//! use bg_snapshot::{arm, BlockSink, MemRange, SinkError};
//! use std::sync::Mutex;
//!
//! struct VecSink(Mutex<Vec<u8>>);
//! impl BlockSink for VecSink {
//!     fn block_size(&self) -> usize { 64 * 1024 }
//!     fn write_block(&self, _range: usize, block: u64, data: &[u8]) -> Result<(), SinkError> {
//!         let off = block as usize * self.block_size();
//!         self.0.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), bg_snapshot::SnapshotError> {
//! let mut mem = vec![7u8; (1 << 20) + 4096];
//! let start = (mem.as_mut_ptr() as usize + 4095) & !4095;
//! // SAFETY: the range lies inside `mem`, which outlives the snapshot.
//! let range = unsafe { MemRange::new(start as *mut u8, 1 << 20) };
//! let sink = VecSink(Mutex::new(vec![0; 1 << 20]));
//! let armed = arm(&[range], sink.block_size())?; // writers paused here: T0
//! let report = armed.run(&sink, 2)?;             // writers may run meanwhile
//! assert!(sink.0.lock().unwrap().iter().all(|&b| b == 7));
//! assert_eq!(report.blocks_by_walkers + report.blocks_by_faults, 16);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod blocks;
mod engine;
mod error;
mod pages;
mod prearm;
mod report;
mod sys;

pub use engine::{arm, arm_with, prepare, prepare_with, ArmOptions, Armed, CancelHandle, Prepared};
pub use error::{SinkError, SnapshotError};
pub use prearm::PreArmed;
pub use report::{LatencyStats, PreArmStats, SnapshotReport};
pub use sys::UffdSource;

/// A range of host memory to snapshot: a page-aligned pointer and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRange {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a MemRange is only an address and a length; the contract of
// `MemRange::new` makes the memory valid for the whole snapshot from any thread.
unsafe impl Send for MemRange {}
// SAFETY: as above; a MemRange offers no access by itself.
unsafe impl Sync for MemRange {}

impl MemRange {
    /// A range of `len` bytes at `ptr`; both must be page-aligned (checked by [`arm`]).
    ///
    /// # Safety
    /// The memory must stay mapped, readable and writable for the whole snapshot
    /// (until `run`/`disarm` returns or the [`Armed`] is dropped). Other threads
    /// may write it concurrently only through ordinary stores to this mapping
    /// (or KVM on its behalf): nobody unmaps, remaps, `madvise`-discards it, or
    /// writes it through another mapping of the same pages (an alias is not
    /// protected, so its writes would leak into the snapshot).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> MemRange {
        MemRange { ptr, len }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the range is empty (which [`arm`] rejects).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr as usize
    }
}

/// Where the snapshot's blocks go (a file at fixed offsets, a stream, channels).
///
/// `write_block` is called from several threads at once (walkers and the fault
/// thread), exactly once per block, in no particular order.
pub trait BlockSink: Sync {
    /// The block size: a power of two, a multiple of the page size. Must equal
    /// the block size given to [`arm`].
    fn block_size(&self) -> usize;

    /// The T0 content of block `block` of range `range`: `data.len()` is the
    /// block size, shorter for a range's tail block. An `Err` aborts the
    /// snapshot (protection is removed) and `run` returns
    /// [`SnapshotError::Sink`].
    fn write_block(&self, range: usize, block: u64, data: &[u8]) -> Result<(), SinkError>;

    /// Block `block` of range `range` (`len` bytes) was never populated, so
    /// its T0 content is all zeros; called instead of `write_block` for such
    /// blocks, which are not read. The default hands `len` zero bytes to
    /// `write_block`; a sink that stores zeros as holes can record them
    /// without writing.
    fn write_zero_block(&self, range: usize, block: u64, len: usize) -> Result<(), SinkError> {
        self.write_block(range, block, &vec![0u8; len])
    }
}

/// What the kernel's userfaultfd offers (from [`check_support`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Support {
    /// Write-protect for anonymous memory (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`, Linux 5.7).
    /// Always true when `check_support` returns `Ok`.
    pub wp: bool,
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): never-touched memory can be protected
    /// without pre-touching it.
    pub wp_unpopulated: bool,
    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write tracking without fault round trips
    /// (not used by this crate; reported for dirty tracking).
    pub wp_async: bool,
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19): shmem and hugetlbfs can be protected.
    pub wp_shmem_hugetlbfs: bool,
    /// All feature bits the kernel reports.
    pub api_features: u64,
    /// How the userfaultfd was created.
    pub source: UffdSource,
    /// The running kernel's release.
    pub kernel: String,
}

/// Says what the kernel's userfaultfd offers.
///
/// Errors: [`SnapshotError::Unsupported`] when userfaultfd (Linux 4.3) or
/// write-protection of anonymous memory (Linux 5.7) is missing, naming the
/// feature and the version; [`SnapshotError::PermissionDenied`] when the
/// process may not create a userfaultfd.
pub fn check_support() -> Result<Support, SnapshotError> {
    let uffd = engine::create_uffd()?;
    let api = uffd
        .api(0)
        .map_err(|e| SnapshotError::io("UFFDIO_API handshake", e))?;
    let f = api.features;
    let support = Support {
        wp: f & sys::FEATURE_PAGEFAULT_FLAG_WP != 0,
        wp_unpopulated: f & sys::FEATURE_WP_UNPOPULATED != 0,
        wp_async: f & sys::FEATURE_WP_ASYNC != 0,
        wp_shmem_hugetlbfs: f & sys::FEATURE_WP_HUGETLBFS_SHMEM != 0,
        api_features: f,
        source: uffd.source,
        kernel: sys::kernel_release(),
    };
    if !support.wp {
        return Err(SnapshotError::Unsupported {
            feature:
                "userfaultfd write-protection of anonymous memory (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
            since: "5.7",
            kernel: support.kernel,
            detail: format!("UFFDIO_API reported features {f:#x}"),
        });
    }
    Ok(support)
}

/// Compiles the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
