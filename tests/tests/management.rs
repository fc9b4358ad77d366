//! Management: managed save, the control API under several clients, and
//! crash safety (SIGKILL at many points, a full disk, read-only and missing
//! directories, a client that disconnects mid-save).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_tests::{cryo, run_cryo, socket_path, test_kernel, wait_for_socket, workdir, Guest};

const T: Duration = Duration::from_secs(120);
const CMDLINE: &str = "console=ttyS0 cryo.mem=24 cryo.hb_ms=100";

/// `cryo run --name NAME --state-dir DIR` of the test kernel (2 vCPUs, 128 MiB).
fn run_named(dir: &Path, name: &str, mem: &str) -> Guest {
    Guest::spawn([
        "run",
        "--kernel",
        test_kernel().to_str().unwrap(),
        "--vcpus",
        "2",
        "--mem-mib",
        mem,
        "--cmdline",
        CMDLINE,
        "--name",
        name,
        "--state-dir",
        dir.to_str().unwrap(),
    ])
}

fn api_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("api.sock")
}

fn image_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("managed.img")
}

#[test]
fn managed_save_round_trip() {
    let dir = workdir("mgmt-basic");
    let (api, image) = (api_of(&dir, "vm1"), image_of(&dir, "vm1"));
    let mut g = run_named(&dir, "vm1", "128");
    assert!(wait_for_socket(&api, T), "{}", g.transcript());
    g.follow(2, 3, 1, T);
    // A second VM with the same name is refused while the first runs.
    let (status, _, err) = run_cryo(
        &[
            "run",
            "--kernel",
            test_kernel().to_str().unwrap(),
            "--name",
            "vm1",
            "--state-dir",
            dir.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("already running"), "{err}");

    let (status, out, err) = cryo(&["managed-save", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}{err}");
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
    assert!(image.exists());
    let before = g.follow_output(2);

    // A run with another configuration is refused, and the image is kept.
    let mut bad = run_named(&dir, "vm1", "256");
    assert_eq!(
        bad.wait_exit(T).and_then(|s| s.code()),
        Some(2),
        "{}",
        bad.transcript()
    );
    let err = bad.stderr().join("\n");
    assert!(
        err.contains("--mem-mib 256 (the image has 128)") && err.contains("managed-save-remove"),
        "{err}"
    );
    assert!(image.exists());

    // The same configuration restores instead of booting, then drops the image.
    let mut r = run_named(&dir, "vm1", "128");
    let after = r.follow(2, 3, 1, T);
    cryo_tests::check_continues(&before, &after, 2);
    assert!(r
        .stderr()
        .iter()
        .any(|l| l.contains("restored from its managed save image")));
    assert!(!image.exists(), "the image outlived the restore");
    let (_, out, _) = cryo(&["status", "--api", api.to_str().unwrap()]);
    assert!(out.contains("\"vm1\""), "{out}");

    // Save again, then discard it: the next run boots afresh.
    let (status, _, err) = cryo(&["managed-save", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    assert!(r.wait_exit(T).is_some());
    let (status, _, err) = cryo(&[
        "managed-save-remove",
        "vm1",
        "--state-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(status, Some(0), "{err}");
    assert!(!image.exists());
    let (status, _, err) = cryo(&[
        "managed-save-remove",
        "vm1",
        "--state-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(status, Some(2), "{err}");
    let mut fresh = run_named(&dir, "vm1", "128");
    let p = fresh.follow(2, 2, 1, T);
    assert!(p.booted, "no fresh boot after the image was removed");
}

#[test]
fn managed_save_of_an_unnamed_vm_is_refused() {
    let api = socket_path("mgmt-unnamed");
    let (mut g, _) = cryo_tests::boot_with_api(1, 32, "cryo.mem=4", &api);
    let (status, _, err) = cryo(&["managed-save", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("--name"), "{err}");
    g.follow(1, 2, 1, T);
}

#[test]
fn sigkill_at_many_points_never_loses_or_corrupts_the_managed_image() {
    let dir = workdir("mgmt-kill");
    let name = "k";
    let (api, image) = (api_of(&dir, name), image_of(&dir, name));
    let mut points = 0;
    let mut restored_checks = 0;
    for k in 0..30u64 {
        let had_image = image.exists();
        let mut g = run_named(&dir, name, "128");
        if had_image && k % 3 == 1 {
            // Kill during the restore from the managed image.
            std::thread::sleep(Duration::from_millis(k * 3));
            g.kill();
            let _ = g.wait_exit(T);
            points += 1;
            let ran = g
                .stderr()
                .iter()
                .any(|l| l.contains("restored from its managed save image"));
            if !ran {
                assert!(
                    image.exists(),
                    "point {k}: the managed image was lost by a killed restore"
                );
            }
        } else {
            assert!(wait_for_socket(&api, T), "{}", g.transcript());
            let p = g.follow(2, 2, 1, T);
            if had_image {
                // It restored, and continued rather than booted.
                assert!(
                    !p.booted,
                    "point {k}: a managed image restored as a fresh boot"
                );
                restored_checks += 1;
            }
            if k % 4 == 0 {
                // A complete managed save now and then, so that later
                // rounds restore (and kill restores).
                let (status, _, err) = cryo(&["managed-save", "--api", api.to_str().unwrap()]);
                assert_eq!(status, Some(0), "{err}");
                assert!(g.wait_exit(T).is_some());
                continue;
            }
            // Kill the VM at some point of a managed save.
            let saver = std::process::Command::new(cryo_tests::cryo_bin())
                .args(["managed-save", "--api", api.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis((k * 7) % 120));
            g.kill();
            let _ = g.wait_exit(T);
            let _ = saver.wait_with_output();
            points += 1;
        }
        // Whatever is under the managed name is a complete, valid image.
        if image.exists() {
            let (status, _, err) = cryo(&["verify", image.to_str().unwrap()]);
            assert_eq!(status, Some(0), "point {k}: {err}");
        }
    }
    assert!(points >= 20, "only {points} kill points");
    // The next run cleans up what killed saves left behind.
    let mut g = run_named(&dir, name, "128");
    assert!(wait_for_socket(&api, T));
    g.follow(2, 1, 1, T);
    let left: Vec<String> = dir
        .join(name)
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert!(
        restored_checks >= 2,
        "the images were restored only {restored_checks} times"
    );
}

#[test]
fn full_disk_gives_a_clear_error_and_the_vm_runs_on() {
    let Some(fs) = cryo_tests::Mount::new("mgmt-full", "tmpfs", Some("size=24m")) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let api = socket_path("mgmt-full");
    // 2 x 24 MiB of data: more than the 24 MiB filesystem holds.
    let (mut g, _) = cryo_tests::boot_with_api(2, 128, "cryo.mem=24 cryo.hb_ms=100", &api);
    for format in ["fixed-ram", "stream"] {
        let target = fs.0.join("vm.img");
        let (status, _, err) = cryo(&[
            "save",
            "--api",
            api.to_str().unwrap(),
            "--to",
            target.to_str().unwrap(),
            "--format",
            format,
        ]);
        assert_eq!(status, Some(1), "{format}: {err}");
        assert!(err.contains("No space left on device"), "{format}: {err}");
        assert!(
            !fs.0.read_dir().unwrap().any(|_| true),
            "{format}: files left on the full disk"
        );
        let (_, out, _) = cryo(&["status", "--api", api.to_str().unwrap()]);
        assert!(out.contains("\"running\""), "{out}");
        g.follow(2, 2, 1, T);
    }
}

#[test]
fn read_only_and_missing_target_directories() {
    let api = socket_path("mgmt-ro");
    let (mut g, _) = cryo_tests::boot_with_api(1, 32, "cryo.mem=4 cryo.hb_ms=100", &api);
    if let Some(fs) = cryo_tests::Mount::new("mgmt-ro", "tmpfs", Some("size=16m")) {
        let ok = std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&fs.0)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let (status, _, err) = cryo(&[
                "save",
                "--api",
                api.to_str().unwrap(),
                "--to",
                fs.0.join("vm.img").to_str().unwrap(),
            ]);
            assert_eq!(status, Some(2), "{err}");
            assert!(err.contains("Read-only file system"), "{err}");
            g.follow(1, 2, 1, T);
        }
    } else {
        eprintln!("read-only case skipped: cannot mount a tmpfs here (needs root)");
    }
    let (status, _, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        "/nonexistent-cryo-dir/vm.img",
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
    g.follow(1, 2, 1, T);
}

#[test]
fn a_client_that_disconnects_mid_save_does_not_stop_the_save() {
    use std::io::Write;
    let dir = workdir("mgmt-disc");
    let api = socket_path("mgmt-disc");
    let file = dir.join("vm.img");
    let (mut g, _) = cryo_tests::boot_with_api(2, 256, "cryo.mem=96 cryo.hb_ms=100", &api);
    {
        let mut s = std::os::unix::net::UnixStream::connect(&api).unwrap();
        writeln!(
            s,
            r#"{{"cmd":"save","path":"{}","progress":true}}"#,
            file.display()
        )
        .unwrap();
        // Gone at once.
    }
    // The save completes and, as any save without keep_running, ends the VM.
    assert_eq!(
        g.wait_exit(T).and_then(|s| s.code()),
        Some(0),
        "{}",
        g.transcript()
    );
    let (status, _, err) = cryo(&["verify", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
}

#[test]
fn several_clients_progress_and_busy() {
    use std::io::{BufRead, BufReader, Write};
    let dir = workdir("mgmt-clients");
    let api = socket_path("mgmt-clients");
    let (mut g, _) = cryo_tests::boot_with_api(2, 1024, "cryo.mem=384 cryo.hb_ms=100", &api);
    // Client A: a slow snapshot (one buffered walker) with progress events.
    let mut a = std::os::unix::net::UnixStream::connect(&api).unwrap();
    writeln!(
        a,
        r#"{{"cmd":"snapshot","id":"a","path":"{}","channels":1,"direct_io":"off","progress":true}}"#,
        dir.join("snap.img").display()
    )
    .unwrap();
    // Client B, meanwhile: progress is visible, a second save is refused, status works.
    let ask = |line: String| -> serde_json::Value {
        let mut b = std::os::unix::net::UnixStream::connect(&api).unwrap();
        writeln!(b, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(b).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    };
    let mut saw_progress = false;
    for _ in 0..2000 {
        let q = ask(r#"{"cmd":"query-progress"}"#.into());
        if q["result"]["active"] == true {
            assert_eq!(q["result"]["operation"], "snapshot", "{q}");
            saw_progress = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(saw_progress, "the snapshot never showed as active");
    let s = ask(format!(
        r#"{{"cmd":"save","path":"{}"}}"#,
        dir.join("other.img").display()
    ));
    assert_eq!(s["error"]["kind"], "busy", "{s}");
    let st = ask(r#"{"cmd":"status"}"#.into());
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["result"]["busy"], true, "{st}");
    // Client A gets progress events, then its reply.
    let mut events = 0;
    let mut reply = serde_json::Value::Null;
    for line in BufReader::new(a).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "progress" {
            assert_eq!(v["id"], "a");
            assert!(v["bytes_total"].as_u64().unwrap() > 0, "{v}");
            events += 1;
        } else {
            reply = v;
            break;
        }
    }
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["id"], "a");
    assert!(events >= 1, "no progress events");
    g.follow(2, 2, 1, T);
}

#[test]
fn logging_is_quiet_by_default_and_goes_to_a_file_when_asked() {
    let dir = workdir("mgmt-log");
    let log = dir.join("cryo.log");
    let api = socket_path("mgmt-log");
    let mut g = Guest::spawn([
        "--log-level",
        "info",
        "--log-file",
        log.to_str().unwrap(),
        "run",
        "--kernel",
        test_kernel().to_str().unwrap(),
        "--mem-mib",
        "32",
        "--cmdline",
        "console=ttyS0 cryo.mem=4",
        "--api",
        api.to_str().unwrap(),
    ]);
    assert!(wait_for_socket(&api, T));
    g.follow(1, 1, 1, T);
    let (status, _, _) = cryo(&["quit", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0));
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
    assert!(g.stderr().is_empty(), "stderr: {:?}", g.stderr());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains(" INFO ") && l.contains("microvm::vm")),
        "{text}"
    );

    // Quiet by default: nothing on stderr for a run that ends normally.
    let api2 = socket_path("mgmt-log2");
    let mut q = Guest::spawn([
        "run",
        "--kernel",
        test_kernel().to_str().unwrap(),
        "--mem-mib",
        "32",
        "--cmdline",
        "console=ttyS0 cryo.mem=4",
        "--api",
        api2.to_str().unwrap(),
    ]);
    assert!(wait_for_socket(&api2, T));
    q.follow(1, 1, 1, T);
    cryo(&["quit", "--api", api2.to_str().unwrap()]);
    assert_eq!(q.wait_exit(T).and_then(|s| s.code()), Some(0));
    assert!(q.stderr().is_empty(), "stderr: {:?}", q.stderr());
}
