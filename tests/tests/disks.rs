//! virtio-blk disks across save and restore, on real KVM with the test
//! kernel. A save records each disk's identity; a restore refuses a disk
//! that is missing or changed, unless `--disk-changed-ok`. With `cryo.blk`
//! the test kernel reads its disk all the time (`cryo_tests::blk_reader`):
//! a live migration or live save then has to carry every page the device
//! wrote meanwhile (the Linux tier drives the device from a real driver).

mod common;

use std::path::{Path, PathBuf};

use common::{
    boot_with, boot_with_cmdline, migrate_live, refused, restores_after, restores_and_continues,
    save_and_end, T,
};
use cryo_tests::blk_reader::{follow_reader, last_report, write_reader_disk};
use cryo_tests::{
    check_continues, cryo, restore_vm, save_vm, socket_path, test_kernel, workdir, Guest, Progress,
};

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

/// A fresh work directory `tag` with a disk of `mib` MiB, and a VM booted
/// on it with the API socket named after `tag`.
fn one_disk_vm(tag: &str, mib: usize) -> (PathBuf, PathBuf, PathBuf, Guest) {
    let dir = workdir(tag);
    let disk = make_disk(&dir, "disk.raw", mib);
    let api = socket_path(tag);
    let (g, _) = boot_with_disks(&api, &[disk.display().to_string()]);
    (dir, disk, api, g)
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

/// Slots of the test kernel's disk reader (1 MiB of guest memory the
/// device keeps writing) and blocks of its disk (4 MiB).
const READER_SLOTS: u64 = 256;
const READER_BLOCKS: u64 = 1024;

/// A VM whose guest reads its disk all the time (the test kernel's disk
/// reader, `cryo.blk`), so that the device writes guest memory during a
/// live copy; returned once the reader has done two passes.
fn reader_vm(tag: &str) -> (PathBuf, PathBuf, Guest) {
    let dir = workdir(tag);
    let disk = dir.join("reader.raw");
    write_reader_disk(&disk, READER_BLOCKS);
    let api = socket_path(tag);
    let disk_arg = vec!["--disk".to_string(), disk.display().to_string()];
    let (mut g, _) = boot_with_cmdline(&api, &format!("cryo.blk={READER_SLOTS}"), &disk_arg);
    follow_reader(&mut g, 2 * READER_SLOTS, 0, T);
    (dir, api, g)
}

/// The copy of a reader VM runs on from where the source ended: its
/// heartbeats continue, and its reader does a whole pass more while
/// re-verifying every slot many times, with no mismatch. A device write
/// the copy missed would leave a slot holding another pass's block.
fn reader_continues(src: &Guest, before: &Progress, copy: &mut Guest) {
    let blk = last_report(src).expect("the source's reader reported");
    let after = copy.follow(1, 2, 1, T);
    check_continues(before, &after, 1);
    let r = follow_reader(
        copy,
        blk.reads + READER_SLOTS,
        blk.verified + 4 * READER_SLOTS,
        T,
    );
    eprintln!("reader before the copy: {blk:?}, after: {r:?}");
}

#[test]
fn live_migration_of_a_vm_reading_its_disk_carries_every_page_the_device_wrote() {
    let (dir, api, mut src) = reader_vm("disk-lm");
    let (mut dest, before) = migrate_live(&mut src, &api, "disk-lm", &["--max-downtime-ms", "500"]);
    reader_continues(&src, &before, &mut dest);
    dest.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn live_save_of_a_vm_reading_its_disk_restores_every_page_the_device_wrote() {
    let (dir, api, mut src) = reader_vm("disk-ls");
    let image = dir.join("live.cryo");
    let result = save_vm(&api, &image, &["--live", "--max-downtime-ms", "500"]);
    assert!(result["rounds"].as_u64().unwrap_or(0) >= 2, "{result}");
    assert_eq!(src.wait_exit(T).and_then(|s| s.code()), Some(0));
    let before = src.follow_output(1);
    let mut restored = restore_vm(&image, None, &[]);
    reader_continues(&src, &before, &mut restored);
    restored.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cryo snapshot --disk-snapshot ...`: status, stdout (JSON), stderr.
fn snapshot_with_disks(
    api: &Path,
    image: &Path,
    copies: &[&Path],
) -> (Option<i32>, String, String) {
    let mut args = vec![
        "snapshot".to_string(),
        "--api".into(),
        api.display().to_string(),
        "--to".into(),
        image.display().to_string(),
    ];
    for c in copies {
        args.push("--disk-snapshot".into());
        args.push(c.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cryo(&args)
}

/// The disk copies of a snapshot hold each disk as it was at the pause,
/// the image names the copies (restored without --disk-changed-ok, even
/// after the original disk changed), and the copies are private files.
#[test]
fn disk_snapshot_copies_each_disk_and_the_image_restores_from_the_copies() {
    use std::os::unix::fs::PermissionsExt;
    let dir = workdir("disk-snap");
    let disk = make_disk(&dir, "disk.raw", 5);
    // A sparse disk: data at both ends, a hole between.
    let sparse = dir.join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 0).unwrap();
        f.write_all_at(&[9u8; 4096], (64 << 20) - 4096).unwrap();
    }
    let api = socket_path("disk-snap");
    let (mut g, _) = boot_with_disks(
        &api,
        &[
            disk.display().to_string(),
            format!("{},ro", sparse.display()),
        ],
    );
    let image = dir.join("snap.cryo");
    let (c0, c1) = (dir.join("copy0.raw"), dir.join("copy1.raw"));
    let before = g.follow(1, 1, 0, T);
    let (status, out, err) = snapshot_with_disks(&api, &image, &[&c0, &c1]);
    assert_eq!(status, Some(0), "snapshot failed: {out}\n{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disks = stats["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{out}");
    eprintln!("disk copies: {out}");
    assert_eq!(std::fs::read(&c0).unwrap(), std::fs::read(&disk).unwrap());
    assert_eq!(std::fs::read(&c1).unwrap(), std::fs::read(&sparse).unwrap());
    for c in [&c0, &c1] {
        let mode = std::fs::metadata(c).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", c.display());
    }
    // The sparse disk's hole stays a hole in its copy (on this filesystem,
    // unless FICLONE shared the extents, which keeps the holes anyway).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&c1).unwrap().blocks() * 512;
    assert!(
        allocated < 8 << 20,
        "copy of a sparse disk allocates {allocated} bytes"
    );
    // No temporary files left beside the copies.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    // The original runs on; the image names the copies.
    let more = g.follow(1, 2, 0, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
    // The image's device state names the copies (postcard keeps strings as
    // they are), not the original disks.
    let bytes_of_image = std::fs::read(&image).unwrap();
    let names = |n: &str| bytes_of_image.windows(n.len()).any(|w| w == n.as_bytes());
    assert!(names("copy0.raw") && names("copy1.raw"));
    assert!(!names("disk.raw") && !names("sparse.raw"));
    // The original disks change and go: the snapshot does not need them.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[0] ^= 0xff;
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&sparse).unwrap();
    restores_after(&image, &before, "disk-snap-r");
    // A copy that changed after the snapshot is refused like any disk.
    std::fs::write(&c0, &bytes).unwrap();
    refused(&image, &[], "copy0.raw");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cryo save --keep-running --disk-snapshot COPY`: the copy is the disk at
/// the save (made in the pause), the VM runs on, and the image restores
/// from the copy without --disk-changed-ok after the original is gone.
/// Without --keep-running (a stopped save: the disk stays as saved) or to
/// a peer, the option is refused and the VM runs on.
#[test]
fn save_keep_running_with_disk_snapshot_restores_from_the_copy() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, disk, api, mut g) = one_disk_vm("disk-save-copy", 3);
    let (image, copy) = (dir.join("vm.cryo"), dir.join("copy.raw"));
    let a = api.display().to_string();
    let (i, c) = (image.display().to_string(), copy.display().to_string());
    let refusals: [(&[&str], &str); 2] = [
        (&["--to", &i, "--disk-snapshot", &c], "--keep-running"),
        (
            &[
                "--to",
                "unix:/nonexistent/peer",
                "--keep-running",
                "--disk-snapshot",
                &c,
            ],
            "not to a peer",
        ),
    ];
    for (args, needle) in refusals {
        let (status, out, err) = cryo(&[&["save", "--api", &a][..], args].concat());
        assert_eq!(status, Some(2), "{needle}: {out}\n{err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    }
    assert!(!image.exists() && !copy.exists());
    let before = g.follow(1, 1, 0, T);
    let save = ["save", "--api", &a, "--to", &i, "--keep-running"];
    let (status, out, err) = cryo(&[&save[..], &["--disk-snapshot", &c]].concat());
    assert_eq!(status, Some(0), "save failed: {out}\n{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["disks"].as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap());
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let more = g.follow(1, 2, 0, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
    std::fs::remove_file(&disk).unwrap();
    restores_after(&image, &before, "disk-save-copy-r");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disk_snapshot_bad_requests_are_refused_and_the_vm_runs_on() {
    let (dir, disk, api, mut g) = one_disk_vm("disk-snap-bad", 1);
    let image = dir.join("snap.cryo");
    let cases: [(&[&Path], &str); 4] = [
        (
            &[&dir.join("a.raw"), &dir.join("b.raw")],
            "given 2 times, but the VM has 1 disks",
        ),
        (&[&disk], "a copy cannot replace its own disk"),
        (&[&image], "named twice"),
        (&[&dir.join("missing-dir/a.raw")], "missing-dir"),
    ];
    for (copies, needle) in cases {
        let (status, out, err) = snapshot_with_disks(&api, &image, copies);
        assert_eq!(status, Some(2), "{needle}: {out}\n{err}");
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    }
    assert!(!image.exists());
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        std::fs::read(make_disk(&dir, "ref.raw", 1)).unwrap()
    );
    let more = g.follow(1, 2, 1, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A disk copy that runs out of space fails the snapshot with a clear
/// error; nothing is left behind, the VM runs on, and a later snapshot works.
#[test]
fn disk_snapshot_on_a_full_filesystem_fails_cleanly_and_the_vm_runs_on() {
    let Some(fs) = cryo_tests::Mount::new("disk-snap-full", "tmpfs", Some("size=4m")) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = workdir("disk-snap-full-src");
    let disk = make_disk(&dir, "disk.raw", 16);
    let api = socket_path("disk-snap-full");
    let (mut g, _) = boot_with_disks(&api, &[disk.display().to_string()]);
    let image = dir.join("snap.cryo");
    let copy = fs.0.join("copy.raw");
    let (status, out, err) = snapshot_with_disks(&api, &image, &[&copy]);
    assert_eq!(status, Some(1), "{out}\n{err}");
    assert!(
        err.contains("disk snapshot") && err.contains("copy.raw"),
        "{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!image.exists() && !copy.exists());
    let left: Vec<_> = std::fs::read_dir(&fs.0).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    let more = g.follow(1, 2, 1, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    // Copy mode ended: a new snapshot to a place with room works.
    let (status, out, err) = snapshot_with_disks(&api, &image, &[&dir.join("copy.raw")]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    g.kill();
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loop-mounted XFS with reflink, unmounted and removed on drop.
struct XfsReflink {
    dir: PathBuf,
    image: PathBuf,
}

impl XfsReflink {
    fn new(name: &str) -> Result<Self, String> {
        let dir = workdir(name);
        let image = dir.with_extension("xfs");
        let run = |cmd: &mut std::process::Command| match cmd.output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Err(e.to_string()),
        };
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(300 << 20))
            .map_err(|e| e.to_string())?;
        let mounted = run(std::process::Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image))
        .and_then(|()| {
            run(std::process::Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&image)
                .arg(&dir))
        });
        let fs = XfsReflink { dir, image };
        mounted.map(|()| fs)
    }
}

impl Drop for XfsReflink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// On a filesystem with reflinks the copy is a FICLONE inside the pause.
#[test]
fn disk_snapshot_uses_ficlone_where_the_filesystem_shares_extents() {
    let fs = match XfsReflink::new("disk-snap-xfs") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "skipped: disk_snapshot_uses_ficlone_where_the_filesystem_shares_extents: \
                 no XFS with reflink here (needs root, loop devices and mkfs.xfs): {why}"
            );
            return;
        }
    };
    let disk = make_disk(&fs.dir, "disk.raw", 8);
    let api = socket_path("disk-snap-xfs");
    let (mut g, _) = boot_with_disks(&api, &[disk.display().to_string()]);
    let image = fs.dir.join("snap.cryo");
    let copy = fs.dir.join("copy.raw");
    let (status, out, err) = snapshot_with_disks(&api, &image, &[&copy]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["disks"][0]["method"], "reflink", "{out}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap());
    g.kill();
    let r_api = socket_path("disk-snap-xfs-r");
    let mut r = restore_vm(&image, Some(&r_api), &[]);
    let after = r.follow(1, 2, 1, T);
    assert!(!after.booted, "{}", r.transcript());
    r.kill();
}

/// A destination host without the VM's disk (here: a `cryo restore
/// --listen` in its own mount namespace, with an empty tmpfs over the
/// disk's directory) refuses the migration before its ACK: it fails naming
/// the disk, and the source, which never got an ACK, runs on. Live
/// migration and a stopped save to the socket alike.
#[test]
fn a_destination_without_the_disk_refuses_before_its_ack_and_the_source_runs_on() {
    use cryo_tests::cryo_bin;
    use cryo_tests::migration::{finished, source_runs_on, start_migrate};
    let (dir, disk, api, mut src) = one_disk_vm("disk-gone", 4);
    for live in [true, false] {
        let socket = socket_path(if live {
            "disk-gone-lm"
        } else {
            "disk-gone-save"
        });
        let _ = std::fs::remove_file(&socket);
        let endpoint = format!("unix:{}", socket.display());
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs none "$1" && exec "$2" restore --listen "$3""#)
            .args([
                "sh",
                dir.to_str().unwrap(),
                cryo_bin().to_str().unwrap(),
                &endpoint,
            ]);
        let mut dest = Guest::from_command(cmd);
        assert!(
            dest.wait_for_stderr(T, |l| l.contains("waiting for a migration")),
            "{}",
            dest.transcript()
        );
        let (code, out) = if live {
            finished(start_migrate(&api, &endpoint, &[]))
        } else {
            let (code, out, err) =
                cryo(&["save", "--api", api.to_str().unwrap(), "--to", &endpoint]);
            (code, format!("{out}\n{err}"))
        };
        assert_ne!(code, Some(0), "{out}");
        // Refused as a restore from a file refuses the disk: bad input
        // (exit 2), naming it, without ever running the guest.
        let status = dest.wait_exit(T);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{}",
            dest.transcript()
        );
        assert!(dest.output().is_empty(), "{}", dest.transcript());
        let why = dest.stderr().join("\n");
        assert!(why.contains(&disk.display().to_string()), "{why}");
        assert!(out.contains("refused the device state"), "{out}");
        source_runs_on(&mut src, &api, 1);
    }
    let (status, out, err) = cryo(&["quit", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let _ = src.wait_exit(T);
    let _ = std::fs::remove_dir_all(&dir);
}
