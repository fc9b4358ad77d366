//! Reading and writing KVM state: one vCPU's ([`save_vcpu`], [`restore_vcpu`])
//! and the VM-wide interrupt controllers, PIT and clock ([`save_vm`],
//! [`restore_vm`]). The order of the restore calls matters to KVM and follows
//! its documentation (CPUID first, LAPIC after the special registers that
//! hold the APIC base, MSRs after that, with the TSC before its deadline,
//! events last).

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::persist::{VcpuState, VmState};

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Words in the legacy XSAVE region.
const XSAVE_LEGACY_WORDS: usize = 1024;

/// Errors reading or writing KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM took only part of the MSRs.
    #[error("KVM_SET_MSRS refused MSR {index:#x} ({written} of {total} written)")]
    MsrRefused {
        /// The MSR that failed.
        index: u32,
        /// How many were written.
        written: usize,
        /// How many were given.
        total: usize,
    },
    /// The saved XSAVE area does not fit this host's.
    #[error(
        "saved XSAVE area is {saved} bytes but this host's KVM uses {host} bytes: the CPUs differ"
    )]
    XsaveSize {
        /// Saved size.
        saved: usize,
        /// Host size.
        host: usize,
    },
    /// A FAM structure could not be built.
    #[error("cannot build {0}")]
    Fam(&'static str),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Host facts needed to save and restore vCPUs.
#[derive(Clone, Debug)]
pub struct VcpuStateContext {
    /// MSR indices KVM says are saveable, TSC before TSC deadline.
    pub msr_indices: Vec<u32>,
    /// Extra XSAVE words beyond the legacy 4 KiB (from KVM_CAP_XSAVE2), if XSAVE2 exists.
    pub xsave2_extra_words: Option<usize>,
}

impl VcpuStateContext {
    /// Asks KVM.
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<Self, StateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut msr_indices: Vec<u32> = list.as_slice().to_vec();
        // The TSC deadline is relative to the TSC: restore it after.
        msr_indices.sort_by_key(|i| *i == MSR_IA32_TSC_DEADLINE);
        let size = vm.check_extension_int(Cap::Xsave2);
        let xsave2_extra_words = if size > 0 {
            Some(
                (size as usize)
                    .saturating_sub(XSAVE_LEGACY_WORDS * 4)
                    .div_ceil(4),
            )
        } else {
            None
        };
        Ok(VcpuStateContext {
            msr_indices,
            xsave2_extra_words,
        })
    }
}

fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    // KVM stops at the first MSR it cannot read: drop that one and retry, so
    // that the result is every listed MSR this vCPU has.
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Fam("MSR list"))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n == wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        log::debug!("MSR {:#x} is listed but not readable; not saved", wanted[n]);
        wanted.remove(n);
    }
}

/// Splits saved MSRs into those this host's KVM lists (`host`) and the
/// indices of the others.
fn msrs_this_host_knows(saved: &[kvm_msr_entry], host: &[u32]) -> (Vec<kvm_msr_entry>, Vec<u32>) {
    let (known, unknown): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) =
        saved.iter().partition(|m| host.contains(&m.index));
    (known, unknown.iter().map(|m| m.index).collect())
}

/// Reads the complete state of a vCPU (which must not be running).
pub fn save_vcpu(fd: &VcpuFd, ctx: &VcpuStateContext) -> Result<VcpuState, StateError> {
    // MP state first: KVM_GET_MP_STATE also flushes pending APIC events into
    // the state the other calls return.
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = match ctx.xsave2_extra_words {
        Some(extra) => {
            let mut x = Xsave::new(extra).map_err(|_| StateError::Fam("XSAVE area"))?;
            // SAFETY: `x` was allocated with the FAM length KVM_CAP_XSAVE2
            // reported, so KVM_GET_XSAVE2 writes within it.
            unsafe { fd.get_xsave2(&mut x) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
            let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
            words.extend_from_slice(x.as_slice());
            words
        }
        None => fd
            .get_xsave()
            .map_err(kvm_err("KVM_GET_XSAVE"))?
            .region
            .to_vec(),
    };
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, &ctx.msr_indices)?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        vcpu_events,
    })
}

/// Writes a saved state into a freshly created vCPU.
pub fn restore_vcpu(
    fd: &VcpuFd,
    state: &VcpuState,
    ctx: &VcpuStateContext,
) -> Result<(), StateError> {
    let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid)
        .map_err(|_| StateError::Fam("CPUID table"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    match ctx.xsave2_extra_words {
        Some(extra) => {
            let saved_extra = state.xsave.len().saturating_sub(XSAVE_LEGACY_WORDS);
            if state.xsave.len() < XSAVE_LEGACY_WORDS || saved_extra > extra {
                return Err(StateError::XsaveSize {
                    saved: state.xsave.len() * 4,
                    host: (XSAVE_LEGACY_WORDS + extra) * 4,
                });
            }
            let mut x = Xsave::new(extra).map_err(|_| StateError::Fam("XSAVE area"))?;
            // SAFETY: the wrapper owns the structure; we only copy words into
            // its fixed region and into its FAM, within their lengths.
            unsafe {
                x.as_mut_fam_struct()
                    .xsave
                    .region
                    .copy_from_slice(&state.xsave[..XSAVE_LEGACY_WORDS]);
            }
            x.as_mut_slice()[..saved_extra].copy_from_slice(&state.xsave[XSAVE_LEGACY_WORDS..]);
            // SAFETY: `x` holds the full area KVM_CAP_XSAVE2 reported.
            unsafe { fd.set_xsave2(&x) }.map_err(kvm_err("KVM_SET_XSAVE2"))?;
        }
        None => {
            if state.xsave.len() != XSAVE_LEGACY_WORDS {
                return Err(StateError::XsaveSize {
                    saved: state.xsave.len() * 4,
                    host: XSAVE_LEGACY_WORDS * 4,
                });
            }
            let mut x = kvm_bindings::kvm_xsave::default();
            x.region.copy_from_slice(&state.xsave);
            // SAFETY: without KVM_CAP_XSAVE2 the area is exactly the legacy 4 KiB.
            unsafe { fd.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
    }
    fd.set_xcrs(&state.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("KVM_SET_LAPIC"))?;
    let (mut msrs, unknown) = msrs_this_host_knows(&state.msrs, &ctx.msr_indices);
    if !unknown.is_empty() {
        // As QEMU does: an MSR the host's KVM does not list (another CPU
        // vendor's, say IA32_FEATURE_CONTROL saved on Intel and restored
        // on AMD) has nothing to be restored into here.
        log::warn!(
            "restoring vCPU state saved on another kind of host: MSRs {unknown:#x?} are not known to this host's KVM and are not restored"
        );
    }
    msrs.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
    let total = msrs.len();
    let list = Msrs::from_entries(&msrs).map_err(|_| StateError::Fam("MSR list"))?;
    let written = fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
    if written != total {
        return Err(StateError::MsrRefused {
            index: msrs[written].index,
            written,
            total,
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Reads the VM-wide state (vCPUs must be paused).
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Writes the VM-wide state into a fresh VM (irqchip and PIT created).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Only the clock value matters; KVM refuses flags it did not hand out itself.
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    vm.set_irqchip(&state.pic_master)
        .map_err(kvm_err("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&state.pic_slave)
        .map_err(kvm_err("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&state.ioapic)
        .map_err(kvm_err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::StateSection;

    /// A VM with the in-kernel irqchip and PIT the state refers to.
    fn fresh_vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        vm
    }

    fn bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).unwrap()
    }

    #[test]
    fn vm_state_round_trip() {
        let Ok(kvm) = Kvm::new() else {
            return; // no KVM here: nothing to check
        };
        let vm = fresh_vm(&kvm);
        let mut master = get_chip(&vm, KVM_IRQCHIP_PIC_MASTER).unwrap();
        // Writing a union field is safe; the PIC chip id selects `pic`.
        master.chip.pic.imr = 0xa5;
        vm.set_irqchip(&master).unwrap();
        let saved = save_vm(&vm).unwrap();
        let read = VmState::decode_versioned(VmState::VERSION, &saved.encode().unwrap()).unwrap();
        let vm2 = fresh_vm(&kvm);
        restore_vm(&vm2, &read).unwrap();
        let again = save_vm(&vm2).unwrap();
        assert_eq!(bytes(&again.pic_master), bytes(&saved.pic_master));
        assert_eq!(bytes(&again.pic_slave), bytes(&saved.pic_slave));
        assert_eq!(bytes(&again.ioapic), bytes(&saved.ioapic));
        // SAFETY: the union holds the PIC's state for a PIC chip id.
        assert_eq!(unsafe { again.pic_master.chip.pic.imr }, 0xa5);
        for (a, b) in again.pit.channels.iter().zip(saved.pit.channels.iter()) {
            assert_eq!((a.mode, a.count), (b.mode, b.count));
        }
    }

    #[test]
    fn vcpu_state_round_trip() {
        let Ok(kvm) = Kvm::new() else {
            return; // no KVM here: nothing to check
        };
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = fresh_vm(&kvm);
        let fd = vm.create_vcpu(0).unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        fd.set_regs(&regs).unwrap();
        let ctx = VcpuStateContext::new(&kvm, &vm).unwrap();
        let saved = save_vcpu(&fd, &ctx).unwrap();
        let read =
            VcpuState::decode_versioned(VcpuState::VERSION, &saved.encode().unwrap()).unwrap();

        let vm2 = fresh_vm(&kvm);
        let fd2 = vm2.create_vcpu(0).unwrap();
        let ctx2 = VcpuStateContext::new(&kvm, &vm2).unwrap();
        restore_vcpu(&fd2, &read, &ctx2).unwrap();
        let again = save_vcpu(&fd2, &ctx2).unwrap();
        assert_eq!(again.regs.rax, 0x1234_5678);
        assert_eq!(bytes(&again.regs), bytes(&saved.regs));
        assert_eq!(bytes(&again.sregs), bytes(&saved.sregs));
        assert_eq!(bytes(&again.xcrs), bytes(&saved.xcrs));
        assert_eq!(again.xsave, saved.xsave);
        assert_eq!(bytes(&again.cpuid), bytes(&saved.cpuid));
        assert_eq!(again.msrs.len(), saved.msrs.len());
    }

    #[test]
    fn msrs_the_host_does_not_list_are_set_aside() {
        let entry = |index| kvm_msr_entry {
            index,
            data: u64::from(index) * 2,
            ..Default::default()
        };
        let saved = [entry(0x10), entry(0x3a), entry(0x6e0)];
        let (known, unknown) = msrs_this_host_knows(&saved, &[0x6e0, 0x10, 0x174]);
        let kept: Vec<(u32, u64)> = known.iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(kept, [(0x10, 0x20), (0x6e0, 0xdc0)]);
        assert_eq!(unknown, [0x3a]);
    }

    #[test]
    fn msr_list_carries_the_tsc() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(_) => return, // no KVM here: nothing to check
        };
        let vm = kvm.create_vm().unwrap();
        let ctx = VcpuStateContext::new(&kvm, &vm).unwrap();
        eprintln!("{:x?}", ctx.msr_indices);
        assert!(ctx.msr_indices.contains(&0x10));
        // TSC deadline, when listed, comes last.
        if let Some(pos) = ctx
            .msr_indices
            .iter()
            .position(|i| *i == MSR_IA32_TSC_DEADLINE)
        {
            assert_eq!(pos, ctx.msr_indices.len() - 1);
        }
    }
}
