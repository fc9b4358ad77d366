//! Live migration (`cryo migrate` to `cryo restore --listen`) with the test
//! kernel as the oracle: the guest runs during the transfer, and on the
//! destination its heartbeats continue with no mismatch and no reboot.
//! Cancel, a dead destination and the time limit leave the source running.

use std::process::Child;
use std::time::Duration;

use cryo_tests::migration::{finished, listen_at, listener, source_runs_on, start_migrate, T};
use cryo_tests::{boot_with_api, check_continues, cryo, socket_path, Guest};

fn live_migration(name: &str, cmdline: &str, extra: &[&str]) -> serde_json::Value {
    let (dest, endpoint) = listener(name);
    live_migration_to(dest, &endpoint, name, cmdline, extra).0
}

/// [`live_migration`] to a given destination; also returns it (ended).
fn live_migration_to(
    mut dest: Guest,
    endpoint: &str,
    name: &str,
    cmdline: &str,
    extra: &[&str],
) -> (serde_json::Value, Guest) {
    let api = socket_path(name);
    let (mut src, _) = boot_with_api(2, 64, &format!("cryo.mem=8 cryo.hb_ms=200 {cmdline}"), &api);
    let mut args = vec!["migrate", "--api", api.to_str().unwrap(), "--to", endpoint];
    args.extend_from_slice(extra);
    let (status, out, err) = cryo(&args);
    assert_eq!(status, Some(0), "{out}\n{err}\n{}", dest.transcript());
    let result: serde_json::Value = serde_json::from_str(&out).expect("JSON result");
    assert!(result["rounds"].as_u64().unwrap_or(0) >= 2, "{result}");
    assert!(result["pages_sent"].as_u64().unwrap_or(0) > 0, "{result}");
    // The source ends only after the destination confirmed.
    assert_eq!(src.wait_exit(T).and_then(|s| s.code()), Some(0));
    let before = src.follow_output(2);
    let after = dest.follow(2, 3, 2, T);
    check_continues(&before, &after, 2);
    dest.kill();
    (result, dest)
}

/// A destination that faulted its memory in ahead (`restore --listen
/// --prealloc-mib`) receives a VM of that size into it, and one of another
/// size into fresh memory, with a warning; the guest runs on either way.
#[test]
fn a_destination_with_memory_faulted_in_ahead_receives_into_it() {
    for (name, mib, warned) in [
        ("lm-prealloc", "64", false),
        ("lm-prealloc-other", "96", true),
    ] {
        let socket = socket_path(&format!("{name}-l"));
        let _ = std::fs::remove_file(&socket);
        let endpoint = format!("unix:{}", socket.display());
        let dest = listen_at(None, &endpoint, &["--prealloc-mib", mib]);
        let (_, dest) = live_migration_to(dest, &endpoint, name, "cryo.rate=100", &[]);
        let log = dest.stderr().join("\n");
        assert!(
            log.contains(&format!("{mib} MiB of guest memory faulted in ahead")),
            "{log}"
        );
        assert_eq!(log.contains("receiving into fresh memory"), warned, "{log}");
    }
    // Sizes it cannot have are bad input, before it listens.
    let socket = socket_path("lm-prealloc-bad-l");
    let endpoint = format!("unix:{}", socket.display());
    for (mib, why) in [("1", "at least 4 MiB"), ("100000000", "memory available")] {
        let (status, _, err) = cryo(&["restore", "--listen", &endpoint, "--prealloc-mib", mib]);
        assert_eq!(status, Some(2), "{err}");
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn live_migration_of_a_nearly_idle_guest() {
    live_migration("lm-idle", "cryo.rate=10", &["--channels", "2"]);
}

#[test]
fn live_migration_over_tcp() {
    // The senders at the vCPUs' priority (`--priority transfer`).
    live_migration(
        "tcp-lm",
        "cryo.rate=1000",
        &["--compress", "zstd", "--priority", "transfer"],
    );
}

#[test]
fn live_migration_of_a_writing_guest() {
    // The guest rewrites 4000 pages a second per vCPU; the downtime limit is
    // generous so that a debug build on a busy host converges too.
    live_migration(
        "lm-writing",
        "cryo.rate=4000",
        &[
            "--channels",
            "3",
            "--max-downtime-ms",
            "500",
            "--compress",
            "lz4",
        ],
    );
}

#[test]
fn a_guest_writing_faster_than_the_link_converges_by_auto_converge() {
    // Unlimited rewrites dirty the whole 16 MiB working set far faster than
    // a 20 MB/s link drains it: only throttling the vCPUs lets it converge.
    let result = live_migration(
        "lm-converge",
        "cryo.rate=0",
        &["--max-bandwidth", "20", "--timeout-s", "120"],
    );
    assert!(
        result["throttle_percent"].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
}

/// A migration slowed down to 4 MB/s, so that it is still under way when
/// the test interferes; returns the source, its API socket, the destination
/// and the `cryo migrate` process.
fn slow_migration(name: &str, extra: &[&str]) -> (Guest, std::path::PathBuf, Guest, Child) {
    let api = socket_path(name);
    let (dest, endpoint) = listener(name);
    let (src, _) = boot_with_api(2, 64, "cryo.mem=8 cryo.hb_ms=200", &api);
    let mut args = vec!["--max-bandwidth", "4"];
    args.extend_from_slice(extra);
    let migrate = start_migrate(&api, &endpoint, &args);
    std::thread::sleep(Duration::from_millis(800));
    (src, api, dest, migrate)
}

#[test]
fn cancel_mid_way_leaves_the_source_running() {
    let (mut src, api, mut dest, migrate) = slow_migration("lm-cancel", &[]);
    let (status, out, err) = cryo(&["query-progress", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    assert!(
        out.contains("\"migrate\"") && out.contains("\"first pass\""),
        "{out}"
    );
    let (status, out, err) = cryo(&["cancel", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let (code, text) = finished(migrate);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("cancelled"), "{text}");
    source_runs_on(&mut src, &api, 2);
    let gone = dest.wait_exit(T).expect("the destination gives up");
    assert!(!gone.success(), "{}", dest.transcript());
}

#[test]
fn a_dead_destination_leaves_the_source_running() {
    let (mut src, api, mut dest, migrate) = slow_migration("lm-kill", &[]);
    dest.kill();
    let (code, text) = finished(migrate);
    assert_ne!(code, Some(0), "{text}");
    source_runs_on(&mut src, &api, 2);
}

#[test]
fn the_time_limit_leaves_the_source_running() {
    let (mut src, api, mut dest, migrate) = slow_migration("lm-timeout", &["--timeout-s", "1"]);
    let (code, text) = finished(migrate);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("did not finish within 1 s"), "{text}");
    source_runs_on(&mut src, &api, 2);
    let gone = dest.wait_exit(T).expect("the destination gives up");
    assert!(!gone.success(), "{}", dest.transcript());
}
