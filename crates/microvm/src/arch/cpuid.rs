//! CPUID as each vCPU sees it: what KVM supports, with the topology, the
//! hypervisor bit and the TSC frequency leaf filled in for this VM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Hypervisor leaf that reports the TSC and LAPIC-bus frequencies (kHz),
/// as VMware and QEMU (`vmware-cpuid-freq`) define it.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's frequency of the LAPIC timer bus, in kHz (1 GHz).
const LAPIC_BUS_KHZ: u32 = 1_000_000;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Number of bits an APIC ID needs to number `count` CPUs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts the supported CPUID for vCPU `index` of `count`, given the TSC frequency.
pub fn filter_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 1);
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package sharing this cache level.
                e.eax = (e.eax & 0x03ff_ffff) | ((count32.saturating_sub(1)) << 26);
            }
            0xb | 0x1f => {
                // x2APIC topology: one thread per core, `count` cores per package.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(count32);
                        e.ebx = count32;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x4000_0000 if tsc_khz.is_some() => {
                e.eax = e.eax.max(TIMING_LEAF);
            }
            0x8000_0001 => {
                // CmpLegacy: the package has several cores.
                if count > 1 {
                    e.ecx |= 1 << 1;
                } else {
                    e.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (count32.saturating_sub(1)) | (id_bits(count32) << 12);
            }
            _ => {}
        }
        entries.push(e);
    }
    if let Some(khz) = tsc_khz {
        if !entries.iter().any(|e| e.function == TIMING_LEAF) {
            entries.push(kvm_cpuid_entry2 {
                function: TIMING_LEAF,
                index: 0,
                flags: 0,
                eax: khz,
                ebx: LAPIC_BUS_KHZ,
                ..Default::default()
            });
        }
    }
    for e in entries.iter_mut() {
        if e.function == 0xb || e.function == 0x1f || e.function == 4 {
            e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        }
    }
    CpuId::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let c = filter_cpuid(&sample(), 3, 4, Some(2_000_000)).unwrap();
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
    }

    #[test]
    fn timing_leaf_added() {
        let c = filter_cpuid(&sample(), 0, 1, Some(2_500_000)).unwrap();
        let base = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x4000_0000)
            .unwrap();
        assert_eq!(base.eax, TIMING_LEAF);
        let t = c
            .as_slice()
            .iter()
            .find(|e| e.function == TIMING_LEAF)
            .unwrap();
        assert_eq!(t.eax, 2_500_000);
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
