//! Dirty logging on a real KVM VM with one anonymous slot (no guest code runs:
//! the guest-write path is tested with the test kernel in `tests/`).

use super::*;

const SLOT_SIZE: u64 = 2 << 20;

struct Vm {
    _kvm: kvm_ioctls::Kvm,
    fd: VmFd,
    slot: kvm_userspace_memory_region,
    host: *mut libc::c_void,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `vm()`; the VM fd goes right
        // after (fields drop after this), and nothing touches the mapping.
        unsafe { libc::munmap(self.host, SLOT_SIZE as usize) };
    }
}

fn vm() -> Vm {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let fd = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: a fresh anonymous mapping, checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOT_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0x10_0000,
        memory_size: SLOT_SIZE,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping lives until `Vm` drops, after the slot's last use.
    unsafe { fd.set_user_memory_region(slot) }.expect("KVM_SET_USER_MEMORY_REGION");
    Vm {
        _kvm: kvm,
        fd,
        slot,
        host,
    }
}

#[test]
fn start_fetch_stop_and_start_again() {
    let vm = vm();
    for _ in 0..2 {
        // SAFETY: the slot as registered; its mapping outlives the VM.
        let mut log = unsafe { DirtyLog::start(&vm.fd, &[vm.slot]) }.expect("start");
        let maps = log.fetch_and_clear(&vm.fd).expect("fetch");
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].pages(), SLOT_SIZE / PAGE_SIZE);
        assert_eq!(maps[0].guest_phys_addr(), 0x10_0000);
        assert!(maps[0].is_clean(), "no guest code ran");
        log.stop(&vm.fd).expect("stop");
    }
    // Logging is off: KVM refuses to hand out a log.
    assert!(vm.fd.get_dirty_log(0, SLOT_SIZE as usize).is_err());
}

#[test]
fn vmm_writes_show_once() {
    let vm = vm();
    // SAFETY: the slot as registered; its mapping outlives the VM.
    let mut log = unsafe { DirtyLog::start(&vm.fd, &[vm.slot]) }.expect("start");
    let writes = log.vmm_writes();
    writes.mark(0x10_0000 + 5 * PAGE_SIZE, 10);
    writes.mark(0x1000, 1); // not RAM of this VM
    let maps = log.fetch_and_clear(&vm.fd).expect("fetch");
    assert_eq!(maps[0].iter_dirty().collect::<Vec<_>>(), vec![5]);
    let maps = log.fetch_and_clear(&vm.fd).expect("fetch");
    assert!(maps[0].is_clean());
    log.stop(&vm.fd).expect("stop");
}

#[test]
fn bad_slot_size_is_refused_before_anything_changes() {
    let vm = vm();
    let odd = kvm_userspace_memory_region {
        memory_size: SLOT_SIZE - 1,
        ..vm.slot
    };
    // SAFETY: refused before any ioctl (the size check comes first).
    let r = unsafe { DirtyLog::start(&vm.fd, &[odd]) };
    assert!(matches!(r, Err(Error::BadSlotSize { slot: 0, .. })));
    assert!(vm.fd.get_dirty_log(0, SLOT_SIZE as usize).is_err());
}

#[test]
fn initially_set_is_used_where_offered() {
    let vm = vm();
    let offered = offered_flags(&vm.fd);
    let wanted = wanted_flags(offered);
    if offered & sys::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
        assert_eq!(
            wanted & sys::KVM_DIRTY_LOG_INITIALLY_SET,
            offered & sys::KVM_DIRTY_LOG_INITIALLY_SET
        );
    } else {
        assert_eq!(wanted, 0, "no manual protection: the plain log");
    }
    // Without manual protection, "initially set" is never asked for alone.
    assert_eq!(wanted_flags(sys::KVM_DIRTY_LOG_INITIALLY_SET), 0);
}

/// With "initially set", every page starts dirty; clearing the log in steps
/// (the last one shorter, ending mid-word) leaves it empty.
#[test]
fn protecting_in_steps_clears_an_initially_set_log() {
    let vm = vm();
    let flags = wanted_flags(offered_flags(&vm.fd));
    if flags & sys::KVM_DIRTY_LOG_INITIALLY_SET == 0 {
        eprintln!("SKIPPED protecting_in_steps_clears_an_initially_set_log: KVM does not offer KVM_DIRTY_LOG_INITIALLY_SET here");
        return;
    }
    set_manual_protect(&vm.fd, flags).expect("enable");
    // A slot of 500 pages: steps of 192, 192 and 116 (not a whole word).
    let slot = kvm_userspace_memory_region {
        memory_size: 500 * PAGE_SIZE,
        ..vm.slot
    };
    // SAFETY: a smaller slot at the same place, backed by the same mapping.
    unsafe {
        vm.fd.set_user_memory_region(kvm_userspace_memory_region {
            memory_size: 0,
            ..slot
        })
    }
    .expect("delete slot");
    // SAFETY: as above.
    unsafe { set_flags(&vm.fd, &slot, KVM_MEM_LOG_DIRTY_PAGES) }.expect("log on");
    let all = vm
        .fd
        .get_dirty_log(0, slot.memory_size as usize)
        .expect("log");
    let before = DirtyBitmap::from_words(slot.guest_phys_addr, 500, all);
    assert_eq!(before.count(), 500, "initially set: every page dirty");
    protect_in_steps(&vm.fd, &slot, 192).expect("protect");
    let after = vm
        .fd
        .get_dirty_log(0, slot.memory_size as usize)
        .expect("log");
    assert!(after.iter().all(|w| *w == 0), "cleared: {after:x?}");
    // A step that is not a whole number of words is refused by the check.
    assert!(protect_in_steps(&vm.fd, &slot, 100).is_err());
}
