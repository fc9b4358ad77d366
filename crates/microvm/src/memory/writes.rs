//! The VMM's own writes into guest memory.
//!
//! KVM's dirty log sees only what the guest's vCPUs write. Device emulation
//! writes guest memory too (virtio-blk read data and status bytes, virtio-net
//! receive buffers, every used ring), always through the vm-memory API
//! (`Bytes`, `VolatileSlice`, virtio-queue's `Writer` and `add_used`), and
//! vm-memory reports each such write to the region's bitmap *after* the
//! bytes landed. Every region of [`GuestMemory`] carries a [`WriteTracker`]
//! as that bitmap: while a [`WriteObserver`] is attached ([`observe_writes`])
//! it hears every write as guest-physical `(address, length)`; otherwise a
//! write costs one relaxed atomic load.
//!
//! Writes through raw host pointers (restore reading pages into fresh
//! memory, a live snapshot's copies) bypass the tracker: they happen while
//! no vCPU or device runs, or are themselves the copy.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::GuestMemoryBackend;

use super::GuestMemory;

/// Hears the VMM's writes into guest memory while attached with
/// [`observe_writes`] (e.g. a dirty-page tracker for live migration).
pub trait WriteObserver: Send + Sync {
    /// The VMM wrote the guest-physical bytes `[addr, addr + len)`.
    fn wrote(&self, addr: u64, len: u64);
}

/// The vm-memory bitmap of one guest memory region: forwards the region's
/// writes to the attached [`WriteObserver`], if any. It keeps no state of its
/// own (`dirty_at` is always false): the observer decides what to remember.
pub struct WriteTracker {
    /// Guest-physical address of the region's first byte.
    guest_addr: u64,
    /// Whether an observer is attached: the only thing a write reads when
    /// none is.
    on: AtomicBool,
    observer: RwLock<Option<Arc<dyn WriteObserver>>>,
}

impl WriteTracker {
    /// A tracker, with no observer, for a region at `guest_addr`.
    pub fn new(guest_addr: u64) -> Self {
        WriteTracker {
            guest_addr,
            on: AtomicBool::new(false),
            observer: RwLock::new(None),
        }
    }

    /// Attaches `observer` (or detaches with `None`).
    fn set(&self, observer: Option<Arc<dyn WriteObserver>>) {
        let on = observer.is_some();
        if !on {
            self.on.store(false, Ordering::Release);
        }
        match self.observer.write() {
            Ok(mut o) => *o = observer,
            // A poisoned lock only means an observer panicked: replace it.
            Err(poisoned) => *poisoned.into_inner() = observer,
        }
        if on {
            self.on.store(true, Ordering::Release);
        }
    }

    fn report(&self, offset: usize, len: usize) {
        let observer = match self.observer.read() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(o) = observer.as_ref() {
            o.wrote(self.guest_addr.wrapping_add(offset as u64), len as u64);
        }
    }
}

impl fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteTracker")
            .field("guest_addr", &self.guest_addr)
            .field("observed", &self.on.load(Ordering::Relaxed))
            .finish()
    }
}

impl<'a> WithBitmapSlice<'a> for WriteTracker {
    type S = RefSlice<'a, WriteTracker>;
}

impl Bitmap for WriteTracker {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len != 0 && self.on.load(Ordering::Relaxed) {
            self.report(offset, len);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, WriteTracker> {
        RefSlice::new(self, offset)
    }
}

/// Attaches `observer` to every region of `memory` (and to every clone of
/// it: they share the regions), or detaches with `None`. Each write the VMM
/// makes through the vm-memory API from then on is reported after its bytes
/// landed, so a tracker that copies a page after taking its mark never
/// misses the write that set it.
pub fn observe_writes(memory: &GuestMemory, observer: Option<Arc<dyn WriteObserver>>) {
    for region in memory.iter() {
        region.bitmap().set(observer.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::memory::{anonymous_memory, RamRange};

    #[derive(Default)]
    struct Seen(Mutex<Vec<(u64, u64)>>);

    impl WriteObserver for Seen {
        fn wrote(&self, addr: u64, len: u64) {
            self.0.lock().unwrap().push((addr, len));
        }
    }

    fn two_regions() -> GuestMemory {
        anonymous_memory(&[
            RamRange {
                start: 0,
                len: 1 << 20,
            },
            RamRange {
                start: 1 << 32,
                len: 1 << 20,
            },
        ])
        .unwrap()
    }

    #[test]
    fn writes_are_reported_in_guest_physical_addresses_only_while_observed() {
        let mem = two_regions();
        mem.write_obj(1u32, GuestAddress(0x10)).unwrap();
        let seen = Arc::new(Seen::default());
        observe_writes(&mem.clone(), Some(seen.clone()));
        mem.write_obj(2u64, GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[7; 100], GuestAddress((1 << 32) + 0x3000))
            .unwrap();
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        // A slice taken into the middle of a region keeps its address.
        let slice = mem.get_slice(GuestAddress(0x5000), 0x100).unwrap();
        slice
            .subslice(0x10, 0x20)
            .unwrap()
            .write_obj(9u8, 3)
            .unwrap();
        observe_writes(&mem, None);
        mem.write_obj(3u32, GuestAddress(0x10)).unwrap();
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![(0x2000, 8), ((1 << 32) + 0x3000, 100), (0x5013, 1)]
        );
    }

    #[test]
    fn tracked_memory_is_ordinary_memory() {
        let mem = two_regions();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xfeed_u16, GuestAddress((1 << 32) + 6))
            .unwrap();
        let v: u16 = mem.read_obj(GuestAddress((1 << 32) + 6)).unwrap();
        assert_eq!(v, 0xfeed);
        assert!(!mem
            .find_region(GuestAddress(0))
            .unwrap()
            .bitmap()
            .dirty_at(0));
    }
}
