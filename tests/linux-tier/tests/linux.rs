//! The Linux tier as tests: one test per scenario (see
//! `cryo_linux_tier::scenarios`). The tier runs once, on first use, for all
//! of them: directly on hardware KVM, nested under QEMU TCG on PVM hosts.

use std::io::Write;
use std::sync::OnceLock;

use cryo_linux_tier::guest::tail;
use cryo_linux_tier::scenarios::names;
use cryo_linux_tier::{run_tier, Mode, TierRun};

fn tier() -> &'static Result<TierRun, String> {
    static TIER: OnceLock<Result<TierRun, String>> = OnceLock::new();
    TIER.get_or_init(|| {
        let run = run_tier().map_err(|e| e.to_string())?;
        let mode = match run.mode {
            Mode::Direct => "directly on hardware KVM",
            Mode::Nested => "nested: QEMU TCG with kvm-amd, on a PVM host",
        };
        // Straight to stderr, past the test harness's capture: the mode,
        // the time, the figures and any nested retry belong in every log.
        let mut summary = vec![format!(
            "linux tier: ran {mode} in {:.0} s",
            run.wall.as_secs_f64()
        )];
        summary.extend(
            run.report
                .figures
                .iter()
                .map(|(name, value)| format!("linux tier: {name} = {value}")),
        );
        summary.extend(run.retries.iter().map(|n| format!("linux tier: {n}")));
        let _ = writeln!(std::io::stderr(), "{}", summary.join("\n"));
        Ok(run)
    })
}

/// Lines of the tier's output an assertion shows when a scenario reported
/// nothing.
const TRANSCRIPT_TAIL: usize = 30;

/// Fails the test with `message` alone: the tier's own log lines explain a
/// failure, and a backtrace of this file would only push them out of a CI
/// log's tail.
fn fail(message: String) -> ! {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map_or("the Linux tier check failed", String::as_str);
            eprintln!("{message}");
        }))
    });
    std::panic::panic_any(message)
}

fn check(scenario: &str) {
    let run = match tier() {
        Ok(run) => run,
        Err(e) => fail(format!("the Linux tier did not run: {e}")),
    };
    let earlier = run
        .nested_failures
        .get(scenario)
        .map(|runs| format!("\nfailed in:\n{}", runs.join("\n")))
        .unwrap_or_default();
    let Some(outcome) = run.report.results.get(scenario) else {
        let tail = tail(&run.transcript, TRANSCRIPT_TAIL);
        fail(format!(
            "the Linux tier reported nothing for {scenario} (driver finished: {}){earlier}\nlast lines:\n{}",
            run.report.done,
            tail.join("\n")
        ));
    };
    if let Some(why) = run.report.failure(scenario) {
        fail(format!("{why}{earlier}"));
    }
    println!("{scenario}: {}", outcome.detail);
}

#[test]
fn linux_disk_keeps_every_acknowledged_write_across_a_save() {
    check(names::DISK_FSYNC_SAVE);
}

#[test]
fn linux_disk_changed_or_missing_is_refused_at_restore() {
    check(names::DISK_CHANGED_REFUSED);
}

#[test]
fn linux_tcp_stream_survives_save_and_restore_on_a_tap() {
    check(names::NET_TCP_SAVE_RESTORE);
}

#[test]
fn linux_ping_answers_across_a_live_snapshot() {
    check(names::NET_PING_LIVE_SNAPSHOT);
}

#[test]
fn linux_disk_snapshot_restores_the_disk_as_it_was_at_the_snapshot() {
    check(names::DISK_SNAPSHOT_LIVE);
}

#[test]
fn linux_boots_with_its_root_filesystem_on_virtio_blk_and_a_tap() {
    check(names::ROOTFS_BOOT);
}

#[test]
fn linux_root_on_virtio_blk_survives_every_save_mode() {
    check(names::ROOTFS_EVERY_SAVE);
}

#[test]
fn linux_boots_to_user_space_with_one_vcpu() {
    check(names::BOOT_1VCPU);
}

#[test]
fn linux_boots_to_user_space_with_two_vcpus() {
    check(names::BOOT_2VCPUS);
}

#[test]
fn linux_boots_from_a_bzimage() {
    check(names::BOOT_BZIMAGE);
}

#[test]
fn linux_boot_log_has_only_expected_warnings() {
    check(names::BOOT_LOG);
}

#[test]
fn linux_shell_answers_on_the_console() {
    check(names::CONSOLE_SHELL);
}

#[test]
fn linux_sees_a_pause_and_carries_on() {
    check(names::PAUSE_RESUME);
}

#[test]
fn linux_survives_managed_save() {
    check(names::MANAGED_SAVE);
}

#[test]
fn linux_survives_stream_save() {
    check(names::SAVE_STREAM);
}

#[test]
fn linux_survives_fixed_ram_eager_restore() {
    check(names::SAVE_FIXED_EAGER);
}

#[test]
fn linux_survives_fixed_ram_lazy_restore() {
    check(names::SAVE_FIXED_LAZY);
}

#[test]
fn linux_survives_multifd_save() {
    check(names::SAVE_MULTIFD);
}

#[test]
fn linux_survives_unix_socket_migration() {
    check(names::MIGRATE_UNIX);
}

#[test]
fn linux_survives_live_snapshot() {
    check(names::LIVE_SNAPSHOT);
}

#[test]
fn linux_clocks_and_timers_hold_across_restores() {
    check(names::TIMEKEEPING);
}
