//! The cryo test kernel under real KVM: every vCPU reports heartbeats and
//! completes full verification sweeps, with no MISMATCH, through both entries.

use std::collections::BTreeMap;
use std::time::Duration;

use cryo_tests::{num, Guest};

/// Boots the test kernel and waits until each vCPU has printed `sweeps` SWEEP
/// lines and `beats` heartbeats; fails on MISMATCH, PANIC or TSC-BACKWARDS.
fn boot_and_verify(vcpus: u32, boot: &str) {
    let mut guest = Guest::test_kernel(
        vcpus,
        128,
        "console=ttyS0 cryo.mem=8 cryo.hb_ms=200",
        &["--boot", boot],
    );
    let first = guest
        .wait_for(Duration::from_secs(30), |l| {
            l.starts_with("cryo-test-kernel")
        })
        .unwrap_or_else(|| panic!("no banner\n{}", guest.transcript()));
    assert!(first.contains(&format!("entry={boot}")), "{first}");

    let mut sweeps: BTreeMap<u64, u64> = BTreeMap::new();
    let mut beats: BTreeMap<u64, u64> = BTreeMap::new();
    let mut bad = None;
    let done = guest.wait_for(Duration::from_secs(60), |l| {
        if l.starts_with("MISMATCH")
            || l.starts_with("PANIC")
            || l.starts_with("TSC-BACKWARDS")
            || l.starts_with("ERROR")
        {
            bad = Some(l.to_string());
            return true;
        }
        if let Some(cpu) = num(l, "cpu") {
            if l.starts_with("SWEEP") {
                *sweeps.entry(cpu).or_default() += 1;
            } else if l.starts_with("HB") {
                let seq = num(l, "seq").unwrap_or(0);
                let last = beats.entry(cpu).or_default();
                assert_eq!(
                    seq,
                    *last + 1,
                    "heartbeat sequence of cpu {cpu} jumped: {l}"
                );
                *last = seq;
            }
        }
        (0..u64::from(vcpus)).all(|c| {
            sweeps.get(&c).copied().unwrap_or(0) >= 2 && beats.get(&c).copied().unwrap_or(0) >= 3
        })
    });
    assert!(
        bad.is_none(),
        "guest reported {:?}\n{}",
        bad,
        guest.transcript()
    );
    assert!(
        done.is_some(),
        "not every vCPU swept and beat: sweeps {sweeps:?} beats {beats:?}\n{}",
        guest.transcript()
    );
    // The VM is still running: the test kernel never exits by itself.
    assert!(
        guest.wait_exit(Duration::from_millis(10)).is_none(),
        "{}",
        guest.transcript()
    );
}

#[test]
fn one_vcpu_linux_entry() {
    boot_and_verify(1, "linux");
}

#[test]
fn two_vcpus_linux_entry() {
    boot_and_verify(2, "linux");
}

#[test]
fn two_vcpus_pvh_entry() {
    boot_and_verify(2, "pvh");
}

#[test]
fn fill_mode_fills_and_idles() {
    let mut guest = Guest::test_kernel(2, 128, "console=ttyS0 cryo.mem=16 cryo.mode=fill", &[]);
    let mut filled = 0;
    let ok = guest.wait_for(Duration::from_secs(60), |l| {
        if l.starts_with("FILLED") {
            filled += 1;
        }
        filled == 2 || l.starts_with("MISMATCH") || l.starts_with("PANIC")
    });
    assert!(
        ok.is_some_and(|l| l.starts_with("FILLED")),
        "{}",
        guest.transcript()
    );
}
