//! # dirty-log: which guest pages changed since the last look
//!
//! Live migration copies a running guest's RAM, then copies again the pages
//! the guest wrote meanwhile, round after round. This crate tracks those
//! pages with KVM's dirty logging:
//!
//! - [`DirtyLog::start`] re-registers each memory slot with
//!   `KVM_MEM_LOG_DIRTY_PAGES`, and enables manual protection
//!   (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) where KVM offers it, so fetching the
//!   log does not write-protect every page of a slot at once; with
//!   `KVM_DIRTY_LOG_INITIALLY_SET` where offered, so that switching logging
//!   on does not either (the pages are protected 64 MiB at a time);
//! - [`DirtyLog::fetch_and_clear`] returns one [`DirtyBitmap`] per slot
//!   (`KVM_GET_DIRTY_LOG`, then `KVM_CLEAR_DIRTY_LOG` for the pages found,
//!   when manual protection is on), with the pages the VMM itself wrote added;
//! - [`DirtyLog::stop`] turns logging off again.
//!
//! KVM logs only the guest's writes. Device emulation that writes guest memory
//! reports its writes through a [`VmmDirty`] handle ([`DirtyLog::vmm_writes`]).
//!
//! The crate knows nothing of any VMM: it takes the KVM VM fd and the slots as
//! registered (`kvm_userspace_memory_region`).
//!
//! ```no_run
//! use dirty_log::DirtyLog;
//! # fn demo(vm: &kvm_ioctls::VmFd, slots: &[kvm_bindings::kvm_userspace_memory_region]) -> Result<(), dirty_log::Error> {
//! // SAFETY: `slots` are the VM's memory slots exactly as registered, and
//! // their mappings outlive the VM fd.
//! let mut log = unsafe { DirtyLog::start(vm, slots) }?;
//! // ... copy all of RAM while the guest runs ...
//! for bitmap in log.fetch_and_clear(vm)? {
//!     for (addr, len) in bitmap.dirty_ranges() {
//!         // ... copy [addr, addr + len) again ...
//!         # let _ = (addr, len);
//!     }
//! }
//! log.stop(vm)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod bitmap;
mod sys;
mod vmm;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

pub use bitmap::{DirtyBitmap, PAGE_SIZE};
pub use vmm::VmmDirty;

/// Errors of dirty logging.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A slot's size is not a whole number of pages, or too large to clear in
    /// one `KVM_CLEAR_DIRTY_LOG`.
    #[error("memory slot {slot} has a size ({size:#x} bytes) dirty logging cannot track")]
    BadSlotSize {
        /// The slot number.
        slot: u32,
        /// Its size in bytes.
        size: u64,
    },
}

/// Dirty logging switched on for a VM's memory slots.
///
/// Call [`DirtyLog::stop`] when done: the log holds no reference to the VM,
/// so it cannot switch logging off by itself when dropped.
pub struct DirtyLog {
    slots: Vec<kvm_userspace_memory_region>,
    manual_protect: bool,
    vmm: VmmDirty,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// The manual-protection flags KVM offers on this VM (0: none).
fn offered_flags(vm: &VmFd) -> u32 {
    let flags = vm.check_extension_raw(u64::from(sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
    u32::try_from(flags).unwrap_or(0)
}

/// Whether KVM offers manual dirty-log protection on this VM.
pub fn manual_protect_available(vm: &VmFd) -> bool {
    offered_flags(vm) & sys::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0
}

/// Sets the manual-protection flags (`KVM_DIRTY_LOG_*`; 0 switches it off).
fn set_manual_protect(vm: &VmFd, flags: u32) -> Result<(), Error> {
    let mut cap = kvm_enable_cap {
        cap: sys::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(flags);
    vm.enable_cap(&cap)
        .map_err(kvm("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))
}

/// The manual-protection flags [`DirtyLog::start`] asks for, out of those
/// `offered`: manual protection, and "initially set" with it when offered.
fn wanted_flags(offered: u32) -> u32 {
    let manual = sys::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if offered & manual == 0 {
        return 0;
    }
    manual | (offered & sys::KVM_DIRTY_LOG_INITIALLY_SET)
}

/// Pages one `KVM_CLEAR_DIRTY_LOG` of [`protect_in_steps`] covers (64 MiB):
/// KVM holds its MMU lock for one call, so a vCPU that faults meanwhile
/// waits for one step at most, not for a pass over the whole slot.
const PROTECT_STEP_PAGES: u64 = 16384;

/// Clears the whole log of `slot` (all its bits set, as
/// `KVM_DIRTY_LOG_INITIALLY_SET` leaves it), `step` pages (a multiple of
/// 64) per `KVM_CLEAR_DIRTY_LOG`: every page is write-protected and clean.
fn protect_in_steps(vm: &VmFd, slot: &kvm_userspace_memory_region, step: u64) -> Result<(), Error> {
    let pages = slot.memory_size / PAGE_SIZE;
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(step);
        let mut ones = vec![u64::MAX; bitmap::words_for(n)];
        if let (Some(last), tail @ 1..) = (ones.last_mut(), n % 64) {
            *last = (1u64 << tail) - 1;
        }
        // `check_slot` keeps the page count within u32.
        sys::clear_dirty_log_range(vm, slot.slot, first, n as u32, &mut ones)
            .map_err(kvm("KVM_CLEAR_DIRTY_LOG"))?;
        first += n;
    }
    Ok(())
}

/// Re-registers `slot` with `flags`.
///
/// # Safety
/// `slot` must be registered in `vm` with these very address fields, and its
/// mapping must stay valid as long as the slot exists.
unsafe fn set_flags(
    vm: &VmFd,
    slot: &kvm_userspace_memory_region,
    flags: u32,
) -> Result<(), Error> {
    let region = kvm_userspace_memory_region { flags, ..*slot };
    // SAFETY: same slot, same mapping as already registered (the caller's
    // contract); only the flags change.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))
}

fn check_slot(slot: &kvm_userspace_memory_region) -> Result<(), Error> {
    let pages = slot.memory_size / PAGE_SIZE;
    if !slot.memory_size.is_multiple_of(PAGE_SIZE) || u32::try_from(pages).is_err() {
        return Err(Error::BadSlotSize {
            slot: slot.slot,
            size: slot.memory_size,
        });
    }
    Ok(())
}

impl DirtyLog {
    /// Switches dirty logging on for `slots`. From this call on, every page
    /// the guest writes is reported by the next [`DirtyLog::fetch_and_clear`].
    /// On failure, slots already switched are switched back.
    ///
    /// # Safety
    /// `slots` must be memory slots of `vm` exactly as registered (slot
    /// number, addresses, size; their flags are replaced), and their host
    /// mappings must stay valid for as long as the slots exist.
    pub unsafe fn start(vm: &VmFd, slots: &[kvm_userspace_memory_region]) -> Result<Self, Error> {
        slots.iter().try_for_each(check_slot)?;
        let flags = wanted_flags(offered_flags(vm));
        if flags != 0 {
            set_manual_protect(vm, flags)?;
        }
        // SAFETY: the caller's contract.
        if let Err(e) = unsafe { Self::log_slots(vm, slots, flags) } {
            if flags != 0 {
                let _ = set_manual_protect(vm, 0);
            }
            return Err(e);
        }
        let ranges: Vec<(u64, u64)> = slots
            .iter()
            .map(|s| (s.guest_phys_addr, s.memory_size))
            .collect();
        Ok(DirtyLog {
            slots: slots.to_vec(),
            manual_protect: flags != 0,
            vmm: VmmDirty::new(&ranges),
        })
    }

    /// Switches logging on for each slot. With `KVM_DIRTY_LOG_INITIALLY_SET`
    /// in `flags`, that write-protects nothing and reports every page
    /// dirty; the log is then cleared in steps ([`protect_in_steps`]), which
    /// write-protects the pages a step at a time. Without it, KVM
    /// write-protects the whole slot in the one call that switches logging
    /// on. Either way the log starts empty, every page protected. On
    /// failure every slot gets its flags back.
    ///
    /// # Safety
    /// [`DirtyLog::start`]'s contract.
    unsafe fn log_slots(
        vm: &VmFd,
        slots: &[kvm_userspace_memory_region],
        flags: u32,
    ) -> Result<(), Error> {
        let initially_set = flags & sys::KVM_DIRTY_LOG_INITIALLY_SET != 0;
        for (done, slot) in slots.iter().enumerate() {
            // SAFETY: the caller's contract.
            let r = unsafe { set_flags(vm, slot, slot.flags | KVM_MEM_LOG_DIRTY_PAGES) };
            let r = r.and_then(|()| {
                if initially_set {
                    protect_in_steps(vm, slot, PROTECT_STEP_PAGES)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = r {
                for s in &slots[..=done] {
                    // SAFETY: the caller's contract; best effort on the way out.
                    let _ = unsafe { set_flags(vm, s, s.flags) };
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether KVM's manual protection is in use (else each fetch
    /// write-protects the whole slot again, as KVM did before Linux 5.8).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The handle device emulation marks its own writes through.
    pub fn vmm_writes(&self) -> VmmDirty {
        self.vmm.clone()
    }

    /// The pages written since the start or the last fetch, one bitmap per
    /// slot (in the order given to [`DirtyLog::start`]); the log starts over
    /// empty. Copy a page only after it was fetched: a write after the fetch
    /// shows in the next one.
    pub fn fetch_and_clear(&mut self, vm: &VmFd) -> Result<Vec<DirtyBitmap>, Error> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (index, slot) in self.slots.iter().enumerate() {
            let pages = slot.memory_size / PAGE_SIZE;
            let words = vm
                .get_dirty_log(slot.slot, slot.memory_size as usize)
                .map_err(kvm("KVM_GET_DIRTY_LOG"))?;
            let mut bitmap = DirtyBitmap::from_words(slot.guest_phys_addr, pages, words);
            if self.manual_protect && !bitmap.is_clean() {
                sys::clear_dirty_log(vm, slot.slot, pages as u32, bitmap.words_mut())
                    .map_err(kvm("KVM_CLEAR_DIRTY_LOG"))?;
            }
            self.vmm.take_into(index, &mut bitmap);
            out.push(bitmap);
        }
        Ok(out)
    }

    /// Switches dirty logging off (the slots get their flags back).
    pub fn stop(self, vm: &VmFd) -> Result<(), Error> {
        let mut first_error = None;
        for slot in &self.slots {
            // SAFETY: `start`'s contract covers these slots until they are
            // switched back.
            if let Err(e) = unsafe { set_flags(vm, slot, slot.flags) } {
                first_error.get_or_insert(e);
            }
        }
        if self.manual_protect {
            if let Err(e) = set_manual_protect(vm, 0) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;

/// Compiles the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
