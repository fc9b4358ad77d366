//! Helpers shared by the device tests (`disks.rs`, `net.rs`): boot the
//! test kernel with devices, save it, restore it or see the restore refused.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use cryo_tests::migration::listener;
use cryo_tests::{
    check_continues, cryo, restore_vm, save_vm, socket_path, test_kernel, wait_for_socket, Guest,
    Progress,
};

/// How long a test guest may take for each step.
pub const T: Duration = Duration::from_secs(90);

/// Boots the test kernel with an API socket and the device options `extra`
/// (`--disk ...`, `--net ...`); returns it once its workload runs.
pub fn boot_with(api: &Path, extra: &[String]) -> (Guest, Progress) {
    boot_with_cmdline(api, "", extra)
}

/// [`boot_with`], with `cmdline` added to the test kernel's command line.
pub fn boot_with_cmdline(api: &Path, cmdline: &str, extra: &[String]) -> (Guest, Progress) {
    let _ = std::fs::remove_file(api);
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        test_kernel().to_str().unwrap_or_default(),
        "--mem-mib",
        "64",
        "--cmdline",
        &format!("console=ttyS0 cryo.mem=8 cryo.hb_ms=200 {cmdline}"),
        "--api",
        api.to_str().unwrap_or_default(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let mut g = Guest::spawn(args);
    assert!(wait_for_socket(api, T), "no API socket\n{}", g.transcript());
    let p = g.follow(1, 3, 2, T);
    (g, p)
}

/// Saves the VM (which then ends with status 0); returns its progress.
pub fn save_and_end(g: &mut Guest, api: &Path, file: &Path, extra: &[&str]) -> Progress {
    save_vm(api, file, extra);
    let status = g.wait_exit(T).and_then(|s| s.code());
    assert_eq!(status, Some(0), "{}", g.transcript());
    g.follow_output(1)
}

/// Restores `file` and expects a bad-input refusal mentioning `needle`.
pub fn refused(file: &Path, extra: &[&str], needle: &str) {
    let (status, _, err) = cryo(
        &[&["restore", "--from", file.to_str().unwrap()], extra]
            .concat()
            .to_vec(),
    );
    assert_eq!(status, Some(2), "restore should refuse: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// Restores `file` and checks the workload carries on from `before`.
pub fn restores_and_continues(file: &Path, extra: &[&str], before: &Progress, tag: &str) {
    let api = socket_path(tag);
    let mut r = restore_vm(file, Some(&api), extra);
    let after = r.follow(1, 2, 1, T);
    check_continues(before, &after, 1);
    r.kill();
}

/// Restores `file`, an image taken while the VM ran on after `before`
/// (a live snapshot, a save with `--keep-running`): the guest does not
/// boot again and goes on past `before` (how far depends on the instant
/// the image was taken).
pub fn restores_after(file: &Path, before: &Progress, tag: &str) {
    let api = socket_path(tag);
    let mut r = restore_vm(file, Some(&api), &[]);
    let after = r.follow(1, 2, 1, T);
    assert!(!after.booted, "the restored guest booted again");
    assert!(
        after.first_beat[&0].0 > before.last_beat[&0].0,
        "{}",
        r.transcript()
    );
    r.kill();
}

/// Migrates the running VM behind `api` live (`cryo migrate` options
/// `extra`) to a fresh `cryo restore --listen` on this host; returns the
/// destination, running, and the source's progress up to its end.
pub fn migrate_live(g: &mut Guest, api: &Path, tag: &str, extra: &[&str]) -> (Guest, Progress) {
    let (dest, endpoint) = listener(tag);
    let mut args = vec!["migrate", "--api", api.to_str().unwrap(), "--to", &endpoint];
    args.extend_from_slice(extra);
    let (status, out, err) = cryo(&args);
    assert_eq!(status, Some(0), "{out}\n{err}\n{}", dest.transcript());
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
    (dest, g.follow_output(1))
}
