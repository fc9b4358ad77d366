//! Segment descriptors for the boot GDT, and their KVM form.

use kvm_bindings::kvm_segment;

/// Flags of a 64-bit code segment (present, ring 0, execute/read, L=1).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a 32-bit flat code segment (present, ring 0, execute/read, D=1, 4 KiB granularity).
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flags of a flat data segment (present, ring 0, read/write, D=1, 4 KiB granularity).
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a 64-bit busy TSS.
pub const TSS_FLAGS: u16 = 0x808b;

/// Encodes a segment descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0xffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register for descriptor `entry` loaded through GDT slot `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_decodes() {
        let seg = segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 2);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.s, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        // Byte granularity (G clear): the limit is taken as is.
        let e = gdt_entry(TSS_FLAGS & !0x8000, 0x1234_5678, 0x67);
        let seg = segment_from_gdt(e, 4);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.s, 0);
    }
}
