//! The raw ioctl kvm-ioctls has no wrapper for.

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

pub(crate) use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Clears (and write-protects again) the pages of slot `slot` whose bits are
/// set in `bitmap`, which covers the slot's `pages` pages from page 0.
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    pages: u32,
    bitmap: &mut [u64],
) -> Result<(), kvm_ioctls::Error> {
    clear_dirty_log_range(vm, slot, 0, pages, bitmap)
}

/// [`clear_dirty_log`] for the `pages` pages from `first_page` (a multiple
/// of 64; `pages` too, unless the range ends at the slot's end), whose
/// bits `bitmap` holds from its bit 0.
pub(crate) fn clear_dirty_log_range(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    pages: u32,
    bitmap: &mut [u64],
) -> Result<(), kvm_ioctls::Error> {
    if bitmap.len() < (pages as usize).div_ceil(64) || !first_page.is_multiple_of(64) {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a KVM VM fd; `arg` points to a bitmap of at least one
    // bit per page of the range it names (checked above), which KVM reads
    // during the call only.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}
