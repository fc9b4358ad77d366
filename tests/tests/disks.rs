//! virtio-blk disks across save and restore, on real KVM with the test
//! kernel (which never touches the disk: these tests check what the VMM
//! records and checks; the Linux tier drives the device from a real driver).
//! A save records each disk's identity; a restore refuses a disk that is
//! missing or changed, unless `--disk-changed-ok`.

mod common;

use std::path::{Path, PathBuf};

use common::{boot_with, live_migration_refused, refused, restores_and_continues, save_and_end};
use cryo_tests::{cryo, socket_path, test_kernel, workdir, Guest, Progress};

fn boot_with_disks(api: &Path, disks: &[String]) -> (Guest, Progress) {
    let args: Vec<String> = disks
        .iter()
        .flat_map(|d| ["--disk".to_string(), d.clone()])
        .collect();
    boot_with(api, &args)
}

fn make_disk(dir: &Path, name: &str, mib: usize) -> PathBuf {
    let p = dir.join(name);
    let bytes: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, bytes).unwrap();
    p
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
    live_migration_refused(&mut g, &api, &dir, "not supported yet");
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
        err.contains("live save of a VM with disks or network devices is not supported yet"),
        "{err}"
    );
    assert!(!image.exists());
    // Refused before anything started: the guest carries on.
    let more = g.follow(1, 2, 1, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
}
