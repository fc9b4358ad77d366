//! The boot log check: every warning-like line a Linux guest prints under
//! cryo must be on the list of lines that are expected, each with its
//! reason. A new warning (a VMM bug, or a host that differs) fails the
//! `boot-log` scenario with the line in the report.
//!
//! The same list, with the same reasons, is in `docs/linux-guest.md`.

/// Words that make a boot line worth a look: compared in lower case, each
/// at the start of a word ("warn" finds "warning", "invalid" does not find
/// "invalidation" because that one must end a word too).
const SUSPICIOUS: &[&str] = &[
    "warn",
    "error",
    "fail",
    "bug",
    "invalid$",
    "unable",
    "not available",
    "fatal",
    "mismatch",
    "unknown",
    "unstable",
    "unhandled",
    "cannot",
    "can't",
    "broken",
    "timed out",
    "not found",
    "not present",
    "no ps/2",
    "firmware",
];

/// A boot line that is expected under cryo, and why.
pub struct Expected {
    /// Text the line contains.
    pub contains: &'static str,
    /// Why a correct VMM still causes it.
    pub why: &'static str,
    /// Expected only nested under QEMU's TCG emulator.
    pub nested_only: bool,
}

/// The lines that are expected, on every host kind the tier runs on.
pub const EXPECTED: &[Expected] = &[
    Expected {
        contains: "DMI not present or invalid",
        why: "cryo provides no SMBIOS/DMI tables (like Firecracker); nothing a test guest runs needs them",
        nested_only: false,
    },
    Expected {
        contains: "PCI: Using host bridge windows from ACPI; if necessary, use \"pci=nocrs\" and report a bug",
        why: "printed by every x86 kernel that runs with ACPI; cryo has no PCI host bridge, so no window is used",
        nested_only: false,
    },
    Expected {
        contains: "PCI: Fatal: No config space access function found",
        why: "cryo has no PCI bus (its devices are legacy ports); the kernel probes port 0xcf8, finds nothing and carries on. `pci=off` silences it",
        nested_only: false,
    },
    Expected {
        contains: "Performance Events: PMU not available due to virtualization, using software events only",
        why: "the host KVM exposes no PMU to its guests (PVM; kvm-amd nested under TCG), so perf falls back to software events",
        nested_only: false,
    },
    Expected {
        contains: "i8042: PNP: No PS/2 controller found",
        why: "cryo's i8042 carries only the reset line and is not described to the guest; there is no keyboard",
        nested_only: false,
    },
    Expected {
        contains: "tsc: Marking TSC unstable due to TSCs unsynchronized",
        why: "nested under QEMU's TCG emulator the host's own TSC is unstable (its KVM says \"SMP vm created on host with unstable TSC\"), so the vCPUs' TSCs drift apart; the guest then uses kvm-clock, which is its clocksource anyway",
        nested_only: true,
    },
    Expected {
        contains: "Unstable clock detected, switching default tracing clock to \"global\"",
        why: "follows from the TSC line above (tracing clock only)",
        nested_only: true,
    },
    Expected {
        contains: "Unknown kernel command line parameters \"workload_",
        why: "the workload's settings ride on the command line to reach /init as environment variables, as the kernel says it does",
        nested_only: false,
    },
];

/// Whether `word` (see [`SUSPICIOUS`]) stands in `lower` at a word start.
fn has_word(lower: &str, word: &str) -> bool {
    let (word, whole) = match word.strip_suffix('$') {
        Some(w) => (w, true),
        None => (word, false),
    };
    let is_letter = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    lower.match_indices(word).any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        let after = lower[at + word.len()..].chars().next();
        !(is_letter(before) || whole && is_letter(after))
    })
}

/// Whether a boot line looks like a warning or an error.
pub fn is_suspicious(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    SUSPICIOUS.iter().any(|w| has_word(&lower, w))
}

/// The reason a suspicious line is expected, if it is (`nested`: the guest
/// ran nested under QEMU TCG).
pub fn expected(line: &str, nested: bool) -> Option<&'static Expected> {
    EXPECTED
        .iter()
        .find(|e| line.contains(e.contains) && (nested || !e.nested_only))
}

/// The suspicious lines of `boot` that are not expected.
pub fn unexpected(boot: &[String], nested: bool) -> Vec<String> {
    boot.iter()
        .filter(|l| is_suspicious(l) && expected(l, nested).is_none())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_lines_pass_and_new_ones_do_not() {
        let boot: Vec<String> = [
            "[    0.000000] DMI not present or invalid.",
            "[    2.9] rtc_cmos: probe of rtc_cmos failed with error -22",
            "[    1.2] x86/cpu: User Mode Instruction Prevention (UMIP) activated",
            "[    1.3] Performance Events: PMU not available due to virtualization, using software events only.",
            "[    2.9] iommu: DMA domain TLB invalidation policy: lazy mode",
            "[    1.2] tsc: Marking TSC unstable due to TSCs unsynchronized",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            unexpected(&boot, true),
            vec!["[    2.9] rtc_cmos: probe of rtc_cmos failed with error -22".to_string()]
        );
        // On hardware KVM an unstable TSC would be cryo's doing.
        assert_eq!(unexpected(&boot, false).len(), 2);
    }
}
