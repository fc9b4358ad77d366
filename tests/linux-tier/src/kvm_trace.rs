//! Where a stalled guest is: a moment of the host kernel's KVM trace
//! events, counted.
//!
//! A guest that stops printing while its vCPU thread stays runnable is
//! busy somewhere: spinning in its kernel, taking an interrupt storm, or
//! looping on a device register. The `kvm_exit` events give the reason and
//! the guest's RIP of each exit, `kvm_inj_virq` the vectors injected and
//! `kvm_pio` the port accesses, `kvm_page_fault` the guest-physical address
//! of each nested page fault, `kvm_mmio` the MMIO accesses KVM emulated
//! and `kvm_userspace_exit` those that reached the VMM; counted over a
//! second they say which it is (a fault loop on one address that never
//! reaches the VMM, for one, shows as `kvm_exit` and `kvm_page_fault`
//! lines with no `kvm_userspace_exit`).
//! An ELF vmlinux boots without KASLR (that is the bzImage decompressor's
//! work), so a RIP maps straight to the guest kernel's `System.map`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Where tracefs is mounted (the nested machine's `/init` mounts the first).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The events recorded.
const EVENTS: [&str; 6] = [
    "kvm_exit",
    "kvm_inj_virq",
    "kvm_pio",
    "kvm_page_fault",
    "kvm_mmio",
    "kvm_userspace_exit",
];
/// How long they are recorded.
const WINDOW: Duration = Duration::from_secs(1);
/// Distinct (event, detail) lines shown, most frequent first.
const SHOWN: usize = 16;

/// How long the driver waits for the trace: a failure's log must not hang
/// on a host kernel that is itself in trouble.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A second of KVM trace events on this host, counted by kind and guest
/// RIP (or port, or vector), as log lines; one line saying why when the
/// host has no tracefs with KVM events or it did not answer in time.
pub fn kvm_events() -> Vec<String> {
    let Some(dir) = TRACEFS
        .iter()
        .map(Path::new)
        .find(|d| d.join("events/kvm/kvm_exit").exists())
    else {
        return vec!["--- kvm trace: no tracefs with kvm events on this host ---".into()];
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines = match record(dir) {
            Ok(text) => summarize(&text),
            Err(e) => vec![format!("--- kvm trace: {}: {e} ---", dir.display())],
        };
        let _ = tx.send(lines);
    });
    rx.recv_timeout(ANSWER_WITHIN).unwrap_or_else(|_| {
        vec![format!(
            "--- kvm trace: {} did not answer within {ANSWER_WITHIN:?} ---",
            dir.display()
        )]
    })
}

/// Records [`EVENTS`] for [`WINDOW`] and returns the trace text.
fn record(dir: &Path) -> std::io::Result<String> {
    let enable = |on: &str| -> std::io::Result<()> {
        // An event this host kernel lacks is left out.
        for event in EVENTS {
            let file = dir.join(format!("events/kvm/{event}/enable"));
            if file.exists() {
                std::fs::write(file, on)?;
            }
        }
        Ok(())
    };
    std::fs::write(dir.join("trace"), "")?;
    enable("1")?;
    std::thread::sleep(WINDOW);
    let stopped = enable("0");
    let text = std::fs::read_to_string(dir.join("trace"));
    stopped?;
    text
}

/// The key a trace line is counted under: the event and what matters of
/// it (exit reason and RIP, injected vector, port and direction), without
/// timestamps, CPUs or values.
fn key(line: &str) -> Option<String> {
    let (task, rest) = line.trim_start().split_once(' ')?;
    let (event, detail) = EVENTS.iter().find_map(|e| {
        let at = rest.find(&format!("{e}: "))?;
        Some((*e, &rest[at + e.len() + 2..]))
    })?;
    let words: Vec<&str> = detail.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .copied()
            .unwrap_or("?")
    };
    let what = match event {
        "kvm_exit" => format!("reason {} rip {}", after("reason"), after("rip")),
        // "pio_write at 0x3f8 size 1 count 1 val 0x41": the value varies.
        "kvm_pio" => words.iter().take(3).copied().collect::<Vec<_>>().join(" "),
        // "mmio write len 4 gpa 0xd0000050 val 0x1": the value varies.
        "kvm_mmio" => words.iter().take(6).copied().collect::<Vec<_>>().join(" "),
        _ => detail.trim().to_string(),
    };
    Some(format!("{task} {event} {what}"))
}

/// Counts the trace's lines by [`key`], most frequent first.
fn summarize(text: &str) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    for k in text.lines().filter(|l| !l.starts_with('#')).filter_map(key) {
        *counts.entry(k).or_default() += 1;
        total += 1;
    }
    let mut ranked: Vec<(String, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut lines = vec![format!(
        "--- kvm trace: {total} events in {WINDOW:?}, {} kinds, the {SHOWN} most frequent ---",
        ranked.len()
    )];
    lines.extend(
        ranked
            .iter()
            .take(SHOWN)
            .map(|(k, n)| format!("    {n:>7} {k}")),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_by_reason_and_rip_port_or_vector() {
        let trace = "\
# tracer: nop
     vcpu0-812 [001] d.... 101.000001: kvm_exit: vcpu 0 reason npf rip 0xffffffff81a0b2c4 info1 0x0 info2 0x1 intr_info 0x0 error_code 0x0
     vcpu0-812 [001] d.... 101.000002: kvm_exit: vcpu 0 reason npf rip 0xffffffff81a0b2c4 info1 0x0 info2 0x2 intr_info 0x0 error_code 0x0
     vcpu0-812 [001] d.... 101.000003: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41
     vcpu0-812 [001] d.... 101.000004: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x42
     vcpu0-812 [001] d.... 101.000005: kvm_inj_virq: IRQ 0xec reinjected
     vcpu0-812 [001] d.... 101.000006: kvm_mmio: mmio write len 4 gpa 0xd0000050 val 0x1
     vcpu0-812 [001] d.... 101.000007: kvm_userspace_exit: reason KVM_EXIT_MMIO (6)
";
        let lines = summarize(trace);
        assert!(lines[0].contains("7 events"), "{lines:?}");
        assert_eq!(
            lines[1].trim(),
            "2 vcpu0-812 kvm_exit reason npf rip 0xffffffff81a0b2c4"
        );
        assert_eq!(lines[2].trim(), "2 vcpu0-812 kvm_pio pio_write at 0x3f8");
        assert_eq!(
            lines[3].trim(),
            "1 vcpu0-812 kvm_inj_virq IRQ 0xec reinjected"
        );
        assert_eq!(
            lines[4].trim(),
            "1 vcpu0-812 kvm_mmio mmio write len 4 gpa 0xd0000050"
        );
        assert_eq!(
            lines[5].trim(),
            "1 vcpu0-812 kvm_userspace_exit reason KVM_EXIT_MMIO (6)"
        );
    }
}
