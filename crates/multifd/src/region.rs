//! Regions of host memory holding guest RAM.

/// A region of host memory holding guest RAM: `len` bytes at host address
/// `ptr`, seen by the guest at `guest_addr`.
///
/// It is only a description (a pointer and a length): it neither owns nor
/// maps the memory. `Send + Sync`, `Copy`.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    guest_addr: u64,
    ptr: *mut u8,
    len: u64,
}

// SAFETY: a MemRegion is a plain description of memory; the contract of
// `MemRegion::new` makes the creator responsible for the memory staying valid
// while channels (on any thread) use it, and the channels never touch the same
// byte from two threads at once.
unsafe impl Send for MemRegion {}
// SAFETY: as for Send: shared references only give out the pointer value.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Describes `len` bytes of host memory at `ptr`, guest address `guest_addr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must stay mapped and valid for reads (and for writes
    /// when used as a restore target) for as long as any channel uses it;
    /// `len` and `ptr` must be page aligned. While a save reads it, nothing
    /// may write to it (the VM is stopped); while a load or receive writes it,
    /// nothing else may access it.
    pub unsafe fn new(guest_addr: u64, ptr: *mut u8, len: u64) -> MemRegion {
        MemRegion {
            guest_addr,
            ptr,
            len,
        }
    }

    /// The guest physical address of the region's first byte.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// The region's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the region's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Checks that the region is aligned to `page_size` (a power of two) and
    /// that its end does not wrap around the address space.
    pub(crate) fn check(&self, index: usize, page_size: u64) -> Result<(), crate::MultifdError> {
        let addr = self.ptr as usize as u64;
        if !addr.is_multiple_of(page_size) || !self.len.is_multiple_of(page_size) {
            return Err(crate::MultifdError::Layout(format!(
                "memory region {index} (guest {:#x}, host {:p}, {} bytes) is not aligned to the page size {page_size}",
                self.guest_addr, self.ptr, self.len
            )));
        }
        if addr.checked_add(self.len).is_none() || usize::try_from(self.len).is_err() {
            return Err(crate::MultifdError::Layout(format!(
                "memory region {index} (host {:p}, {} bytes) wraps around the address space",
                self.ptr, self.len
            )));
        }
        Ok(())
    }
}
