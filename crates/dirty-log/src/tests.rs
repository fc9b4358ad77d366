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
