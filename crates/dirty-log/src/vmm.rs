//! Pages the VMM itself writes into guest memory (device emulation): KVM only
//! logs the guest's own writes, so emulated devices report theirs here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bitmap::{words_for, DirtyBitmap, PAGE_SIZE};

struct SlotBits {
    guest_phys_addr: u64,
    size: u64,
    words: Vec<AtomicU64>,
}

/// A cheap, cloneable handle through which device emulation marks the guest
/// memory it wrote; [`DirtyLog::fetch_and_clear`](crate::DirtyLog::fetch_and_clear)
/// adds these pages to KVM's. Lock-free: marking is a few atomic ORs.
#[derive(Clone)]
pub struct VmmDirty {
    slots: Arc<Vec<SlotBits>>,
}

impl VmmDirty {
    /// A tracker for slots given as `(guest_phys_addr, size)` in bytes.
    pub fn new(slots: &[(u64, u64)]) -> Self {
        let slots = slots
            .iter()
            .map(|&(guest_phys_addr, size)| SlotBits {
                guest_phys_addr,
                size,
                words: (0..words_for(size.div_ceil(PAGE_SIZE)))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        VmmDirty {
            slots: Arc::new(slots),
        }
    }

    /// Marks the guest-physical bytes `[addr, addr + len)` dirty. Bytes
    /// outside every slot are ignored (they are not RAM).
    pub fn mark(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = addr.saturating_add(len);
        for s in self.slots.iter() {
            let lo = addr.max(s.guest_phys_addr);
            let hi = end.min(s.guest_phys_addr + s.size);
            if lo >= hi {
                continue;
            }
            let first = (lo - s.guest_phys_addr) / PAGE_SIZE;
            let last = (hi - 1 - s.guest_phys_addr) / PAGE_SIZE;
            for page in first..=last {
                s.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// Moves slot `index`'s marks into `into` (ORed), leaving the slot clean.
    pub(crate) fn take_into(&self, index: usize, into: &mut DirtyBitmap) {
        let Some(s) = self.slots.get(index) else {
            return;
        };
        for (dst, src) in into.words_mut().iter_mut().zip(&s.words) {
            *dst |= src.swap(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_land_in_the_right_slot_and_pages() {
        let v = VmmDirty::new(&[(0, 0x10_0000), (0x1_0000_0000, 0x10_0000)]);
        v.mark(0x1fff, 2); // straddles pages 1 and 2
        v.mark(0xf_f000, 0x2000); // last page of slot 0, then a hole
        v.mark(0x1_0000_0000, 1);
        v.mark(0x5000, 0);
        let mut a = DirtyBitmap::new(0, 256);
        v.take_into(0, &mut a);
        assert_eq!(a.iter_dirty().collect::<Vec<_>>(), vec![1, 2, 255]);
        let mut b = DirtyBitmap::new(0x1_0000_0000, 256);
        v.take_into(1, &mut b);
        assert_eq!(b.iter_dirty().collect::<Vec<_>>(), vec![0]);
        // Taken means cleared.
        let mut again = DirtyBitmap::new(0, 256);
        v.take_into(0, &mut again);
        assert!(again.is_clean());
    }

    #[test]
    fn clones_share_the_marks() {
        let v = VmmDirty::new(&[(0, 0x4000)]);
        v.clone().mark(0x3000, 1);
        let mut a = DirtyBitmap::new(0, 4);
        v.take_into(0, &mut a);
        assert!(a.is_dirty(3));
    }
}
