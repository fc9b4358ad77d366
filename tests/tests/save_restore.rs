//! Save a running test-kernel VM to a stream file and restore it in a new
//! process: the guest continues where it was (heartbeat numbers, memory
//! contents, TSC never backwards), any number of times.

use std::path::Path;
use std::time::Duration;

use cryo_tests::{
    boot_with_api, check_continues, cryo, restore_vm, save_vm, socket_path, wait_for_socket,
    workdir, Guest, Progress,
};

const T: Duration = Duration::from_secs(90);

/// Boots a small test-kernel VM with an API socket.
fn boot(vcpus: u32, api: &Path) -> (Guest, Progress) {
    boot_with_api(vcpus, 64, "cryo.mem=8 cryo.hb_ms=200", api)
}

fn restore(file: &Path, api: Option<&Path>) -> Guest {
    restore_vm(file, api, &[])
}

/// Saves in the stream format (the fixed-ram default has its own tests).
fn save(api: &Path, to: &Path, keep_running: bool) {
    let mut extra = vec!["--format", "stream"];
    if keep_running {
        extra.push("--keep-running");
    }
    let out = save_vm(api, to, &extra);
    assert!(out["ram_pages"].as_u64().is_some(), "{out}");
}

fn save_and_restore(vcpus: u32) {
    let dir = workdir(&format!("basic{vcpus}"));
    let api = socket_path(&format!("basic{vcpus}"));
    let file = dir.join("vm.cryo");
    let (mut g, _) = boot(vcpus, &api);
    save(&api, &file, false);
    // Without --keep-running the VM process ends once the file is complete.
    let status = g.wait_exit(T);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", g.transcript());
    let before = g.follow_output(vcpus);
    assert!(file.exists());
    assert!(!dir.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // Restore twice from the same file: both continue from the same point.
    for round in 0..2 {
        let api2 = socket_path(&format!("basic{vcpus}-r{round}"));
        let mut r = restore(&file, Some(&api2));
        let after = r.follow(vcpus, 3, 2, T);
        check_continues(&before, &after, vcpus);
        // The restored VM is controllable.
        assert!(wait_for_socket(&api2, T));
        let (status, out, err) = cryo(&["status", "--api", api2.to_str().unwrap()]);
        assert_eq!(status, Some(0), "{err}");
        assert!(out.contains("\"running\""), "{out}");
        assert!(out.contains(&format!("\"vcpus\": {vcpus}")), "{out}");
        r.kill();
    }
    assert!(file.exists(), "restoring consumed the file");
}

#[test]
fn save_and_restore_one_vcpu() {
    save_and_restore(1);
}

#[test]
fn save_and_restore_two_vcpus() {
    save_and_restore(2);
}

#[test]
fn save_a_restored_vm_again() {
    let dir = workdir("again");
    let api = socket_path("again");
    let first = dir.join("first.cryo");
    let second = dir.join("second.cryo");
    let (mut g, _) = boot(2, &api);
    save(&api, &first, false);
    assert!(g.wait_exit(T).is_some());

    let api2 = socket_path("again-r1");
    let mut r1 = restore(&first, Some(&api2));
    assert!(wait_for_socket(&api2, T));
    r1.follow(2, 3, 2, T);
    save(&api2, &second, false);
    assert!(r1.wait_exit(T).is_some());
    let before = r1.follow_output(2);

    let mut r2 = restore(&second, None);
    let after = r2.follow(2, 3, 2, T);
    check_continues(&before, &after, 2);
}

#[test]
fn keep_running_leaves_the_vm_running() {
    let dir = workdir("keep");
    let api = socket_path("keep");
    let file = dir.join("vm.cryo");
    let (mut g, _) = boot(2, &api);
    save(&api, &file, true);
    // The original goes on: more heartbeats and sweeps, no mismatch.
    g.follow(2, 5, 3, T);
    let (status, out, _) = cryo(&["status", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0));
    assert!(out.contains("\"running\""), "{out}");
    // And the file restores.
    let mut r = restore(&file, None);
    r.follow(2, 3, 2, T);
    // quit ends the original cleanly.
    let (status, _, err) = cryo(&["quit", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
}

#[test]
fn pause_and_resume_over_the_api() {
    let api = socket_path("pause");
    let (mut g, _) = boot(1, &api);
    let a = api.to_str().unwrap();
    let (status, out, _) = cryo(&["pause", "--api", a]);
    assert_eq!(status, Some(0));
    assert!(out.contains("paused"));
    let (_, out, _) = cryo(&["status", "--api", a]);
    assert!(out.contains("\"paused\""), "{out}");
    // Paused: no new console lines for a while.
    std::thread::sleep(Duration::from_millis(300));
    let n = g.output().len();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(g.output().len(), n, "the guest ran while paused");
    let (status, _, _) = cryo(&["resume", "--api", a]);
    assert_eq!(status, Some(0));
    g.follow(1, 3, 1, T);
}

fn raw_request(api: &Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
}

#[test]
fn api_rejects_bad_requests_and_the_vm_runs_on() {
    use std::os::unix::fs::PermissionsExt;
    let api = socket_path("badapi");
    let (mut g, _) = boot(1, &api);
    let mode = std::fs::metadata(&api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");
    for (line, kind) in [
        ("{not json", "bad-request"),
        ("[1,2,3]", "bad-request"),
        (r#"{"cmd":"reboot-the-moon"}"#, "bad-request"),
        (r#"{"cmd":"save","path":42}"#, "bad-request"),
        (r#"{"cmd":"save"}"#, "bad-request"),
        (r#"{"cmd":"status","extra":true}"#, "bad-request"),
        (
            r#"{"cmd":"save","path":"/nonexistent-dir/x.cryo"}"#,
            "bad-request",
        ),
    ] {
        let reply = raw_request(&api, line);
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        assert_eq!(reply["error"]["kind"], kind, "{line}: {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // The id is echoed.
    let reply = raw_request(&api, r#"{"cmd":"status","id":17}"#);
    assert_eq!(reply["id"], 17);
    assert_eq!(reply["result"]["state"], "running");
    // The failed save left the VM running and left no file behind.
    assert!(!Path::new("/nonexistent-dir").exists());
    g.follow(1, 3, 1, T);
}

#[test]
fn failed_save_leaves_the_vm_running() {
    let dir = workdir("failsave");
    let api = socket_path("failsave");
    let (mut g, _) = boot(2, &api);
    // A target in a directory that does not exist: bad input, status 2.
    let target = dir.join("missing").join("vm.cryo");
    let (status, _, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        target.to_str().unwrap(),
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("No such file"), "{err}");
    g.follow(2, 3, 2, T);
    let (_, out, _) = cryo(&["status", "--api", api.to_str().unwrap()]);
    assert!(out.contains("\"running\""), "{out}");
    // A save over an existing good file that fails keeps the old file intact.
    let good = dir.join("good.cryo");
    save(&api, &good, true);
    let before = std::fs::read(&good).unwrap();
    std::fs::create_dir(dir.join("blocker.cryo")).unwrap();
    let (status, _, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        dir.join("blocker.cryo").to_str().unwrap(),
    ]);
    assert_ne!(status, Some(0), "{err}");
    assert_eq!(std::fs::read(&good).unwrap(), before);
    assert!(!dir.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));
    g.follow(2, 3, 2, T);
}
