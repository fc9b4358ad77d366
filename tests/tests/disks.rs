//! virtio-blk disks across save and restore, on real KVM with the test
//! kernel (which never touches the disk: these tests check what the VMM
//! records and checks; the Linux tier drives the device from a real driver).
//! A save records each disk's identity; a restore refuses a disk that is
//! missing or changed, unless `--disk-changed-ok`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_tests::{
    check_continues, cryo, restore_vm, save_vm, socket_path, test_kernel, wait_for_socket, workdir,
    Guest, Progress,
};

const T: Duration = Duration::from_secs(90);

fn boot_with_disks(api: &Path, disks: &[String]) -> (Guest, Progress) {
    let _ = std::fs::remove_file(api);
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        test_kernel().to_str().unwrap_or_default(),
        "--mem-mib",
        "64",
        "--cmdline",
        "console=ttyS0 cryo.mem=8 cryo.hb_ms=200",
        "--api",
        api.to_str().unwrap_or_default(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    let mut g = Guest::spawn(args);
    assert!(wait_for_socket(api, T), "no API socket\n{}", g.transcript());
    let p = g.follow(1, 3, 2, T);
    (g, p)
}

fn make_disk(dir: &Path, name: &str, mib: usize) -> PathBuf {
    let p = dir.join(name);
    let bytes: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Saves the VM (which then ends with status 0); returns its progress.
fn save_and_end(g: &mut Guest, api: &Path, file: &Path, extra: &[&str]) -> Progress {
    save_vm(api, file, extra);
    let status = g.wait_exit(T).and_then(|s| s.code());
    assert_eq!(status, Some(0), "{}", g.transcript());
    g.follow_output(1)
}

/// Restores `file` and expects a bad-input refusal mentioning `needle`.
fn refused(file: &Path, extra: &[&str], needle: &str) {
    let (status, _, err) = cryo(
        &[&["restore", "--from", file.to_str().unwrap()], extra]
            .concat()
            .to_vec(),
    );
    assert_eq!(status, Some(2), "restore should refuse: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

fn restores_and_continues(file: &Path, extra: &[&str], before: &Progress, tag: &str) {
    let api = socket_path(tag);
    let mut r = restore_vm(file, Some(&api), extra);
    let after = r.follow(1, 2, 1, T);
    check_continues(before, &after, 1);
    r.kill();
}

#[test]
fn disk_identity_is_checked_at_restore() {
    let dir = workdir("disk-identity");
    let disk = make_disk(&dir, "disk.raw", 4);
    let ro = make_disk(&dir, "ro.raw", 1);
    let api = socket_path("disk-identity");
    let file = dir.join("vm.cryo");
    let (mut g, _) = boot_with_disks(
        &api,
        &[disk.display().to_string(), format!("{},ro", ro.display())],
    );
    let before = save_and_end(&mut g, &api, &file, &[]);

    // The image holds one virtio-blk section per disk.
    let (status, out, err) = cryo(&["inspect", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(out.matches("\"name\": \"virtio-blk\"").count(), 2, "{out}");

    restores_and_continues(&file, &[], &before, "disk-identity-r0");

    // Same size, other content: refused, then accepted on request.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&disk, &bytes).unwrap();
    refused(&file, &[], "changed since the save");
    refused(&file, &[], "--disk-changed-ok");
    restores_and_continues(&file, &["--disk-changed-ok"], &before, "disk-identity-r1");

    // Another size.
    bytes.extend_from_slice(&[0; 512]);
    std::fs::write(&disk, &bytes).unwrap();
    refused(&file, &[], "size was 4194304 bytes, is 4194816");

    // Missing: refused even with --disk-changed-ok.
    std::fs::remove_file(&ro).unwrap();
    refused(&file, &["--disk-changed-ok"], "ro.raw");
}

#[test]
fn disk_sections_in_stream_saves() {
    let dir = workdir("disk-stream");
    let disk = make_disk(&dir, "disk.raw", 1);
    let api = socket_path("disk-stream");
    let file = dir.join("vm.stream");
    let (mut g, _) = boot_with_disks(&api, &[format!("{},direct", disk.display())]);
    let before = save_and_end(&mut g, &api, &file, &["--format", "stream"]);
    restores_and_continues(&file, &[], &before, "disk-stream-r0");
}

#[test]
fn bad_disk_options_are_bad_input() {
    let (status, _, err) = cryo(&[
        "run",
        "--kernel",
        test_kernel().to_str().unwrap_or_default(),
        "--disk",
        "/nonexistent/cryo-disk.raw",
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("cryo-disk.raw"), "{err}");
    let (status, _, err) = cryo(&["run", "--kernel", "x", "--disk", "d.raw,bogus"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("unknown disk option"), "{err}");
}

#[test]
fn live_migration_and_live_save_of_a_vm_with_disks_are_refused_and_it_runs_on() {
    let dir = workdir("disk-live-migrate");
    let disk = make_disk(&dir, "d.raw", 2);
    let api = socket_path("disk-live-migrate");
    let (mut g, _) = boot_with_disks(&api, &[disk.display().to_string()]);
    let target = format!("unix:{}", dir.join("nobody.sock").display());
    let (status, _, err) = cryo(&["migrate", "--api", api.to_str().unwrap(), "--to", &target]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("not supported yet"), "{err}");
    // A live save is refused the same way, and leaves no file.
    let image = dir.join("live.cryo");
    let image_arg = image.to_str().unwrap();
    let (status, _, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        image_arg,
        "--live",
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(
        err.contains("live save of a VM with disks is not supported yet"),
        "{err}"
    );
    assert!(!image.exists());
    // Refused before anything started: the guest carries on.
    let more = g.follow(1, 2, 1, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
}
