//! Hardening: cryo used as a careless or hostile user would. Closed pipes,
//! options that do not fit their target, targets and sockets that are not
//! what they seem, FIFOs, signals and requests in the middle of a save,
//! and lazy or paused restores.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryo_tests::{
    boot_with_api, check_continues, cryo, cryo_bin, filled_guest, restore_vm, run_command,
    run_cryo, save_vm, socket_path, wait_for_socket, workdir, Guest,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const SMALL: &str = "cryo.mem=8 cryo.hb_ms=100";

/// One request on a fresh connection to the API; returns the first non-event line.
fn ask(api: &Path, request: &str) -> Value {
    let mut s = UnixStream::connect(api).unwrap();
    writeln!(s, "{request}").unwrap();
    reply_of(s)
}

fn reply_of(s: UnixStream) -> Value {
    for line in BufReader::new(s).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v.get("event").is_none() {
            return v;
        }
    }
    Value::Null
}

/// Waits until the VM reports `operation` in `phase` (so that it is under
/// way, past its start), polling query-progress.
fn wait_for_phase(api: &Path, operation: &str, phase: &str) {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let q = ask(api, r#"{"cmd":"query-progress"}"#);
        if q["result"]["operation"] == operation && q["result"]["phase"] == phase {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the {operation} never reached {phase}");
}

/// Files in `dir` (names).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `cryo ARGS` with its stdout a pipe nobody reads (already closed).
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(cryo_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_verb_exits_quietly_on_a_closed_pipe() {
    let dir = workdir("hard-epipe");
    let api = socket_path("hard-epipe");
    let image = dir.join("vm.img");
    let (mut g, _) = boot_with_api(1, 32, SMALL, &api);
    let a = api.to_str().unwrap();
    let i = image.to_str().unwrap();
    for args in [
        vec!["status", "--api", a],
        vec!["save", "--api", a, "--to", i, "--keep-running"],
        vec!["inspect", i],
        vec!["verify", i],
        vec!["--json", "inspect", i],
        vec!["--help"],
    ] {
        let (status, err) = with_closed_stdout(&args);
        assert!(!err.contains("panicked"), "cryo {args:?}: {err}");
        assert_ne!(status, Some(101), "cryo {args:?}: {err}");
    }
    assert!(image.exists());
    cryo(&["quit", "--api", a]);
    g.wait_exit(T);
}

#[test]
fn restore_without_arguments_names_both_sources() {
    let (status, _, err) = run_cryo(&["restore"], T);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("--from") && err.contains("--listen"), "{err}");
}

#[test]
fn bare_direct_io_means_on_and_the_help_says_so() {
    for verb in ["save", "snapshot", "restore", "managed-save"] {
        let (status, out, err) = run_cryo(&[verb, "--help"], T);
        assert_eq!(status, Some(0), "{err}");
        let text = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            text.contains("a bare --direct-io means on"),
            "{verb} --help: {out}"
        );
    }
}

#[test]
fn docs_point_only_to_files_users_have() {
    let root = cryo_tests::workspace_root();
    let mut files = vec![root.join("README.md")];
    for dir in [
        "docs",
        "vmm/src",
        "crates",
        "resources/test-kernel",
        "tests/src",
    ] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p
                    .extension()
                    .is_some_and(|x| x == "md" || x == "rs" || x == "c" || x == "S")
                {
                    files.push(p);
                }
            }
        }
    }
    let banned = ["DESIGN.md", "MACHINE.md", "../shared", "mini-vmm"];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for b in banned {
            assert!(!text.contains(b), "{} mentions {b}", f.display());
        }
    }
}

#[test]
fn save_options_and_targets_that_do_not_fit_are_refused() {
    let dir = workdir("hard-targets");
    let api = socket_path("hard-targets");
    let (mut g, _) = boot_with_api(1, 32, SMALL, &api);
    let a = api.to_str().unwrap();
    let file = dir.join("vm.img");
    let f = file.to_str().unwrap();
    let peer = format!("unix:{}", dir.join("peer.sock").display());
    // Options that would be ignored are refused (exit 2) before anything happens.
    for (extra, what) in [
        (vec!["--to", f, "--compress", "zstd"], "compression"),
        (vec!["--to", &peer, "--format", "stream"], "format"),
        (vec!["--to", &peer, "--direct-io", "off"], "O_DIRECT"),
    ] {
        let mut args = vec!["save", "--api", a];
        args.extend(extra);
        let (status, _, err) = cryo(&args);
        assert_eq!(status, Some(2), "{args:?}: {err}");
        assert!(err.contains(what), "{args:?}: {err}");
    }
    // The VM's own API socket (or any non-regular file) is never replaced.
    for args in [
        vec!["save", "--api", a, "--to", a, "--keep-running"],
        vec!["snapshot", "--api", a, "--to", a],
    ] {
        let (status, _, err) = cryo(&args);
        assert_eq!(status, Some(2), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
        assert!(std::fs::symlink_metadata(&api)
            .unwrap()
            .file_type()
            .is_socket());
        assert_eq!(ask(&api, r#"{"cmd":"status"}"#)["ok"], true);
    }
    // A missing directory is the request's fault for a save and a snapshot alike.
    let missing = dir.join("missing/vm.img");
    for request in [
        format!(
            r#"{{"cmd":"save","path":"{}","keep_running":true}}"#,
            missing.display()
        ),
        format!(r#"{{"cmd":"snapshot","path":"{}"}}"#, missing.display()),
    ] {
        let r = ask(&api, &request);
        assert_eq!(r["error"]["kind"], "bad-request", "{request}: {r}");
    }
    // Live-only options on a stopped save, and an unknown priority, are refused.
    for request in [
        format!(
            r#"{{"cmd":"save","path":"{}","keep_running":true,"priority":"transfer"}}"#,
            file.display()
        ),
        format!(r#"{{"cmd":"migrate","to":"{peer}","priority":"sideways"}}"#),
    ] {
        let r = ask(&api, &request);
        assert_eq!(r["ok"], false, "{request}: {r}");
        assert!(!file.exists(), "{request}");
    }
    // A file at the old, predictable temp name is not this save's: the save
    // neither fails on it nor removes it. A dead process's leftover is removed.
    let squatter = dir.join(format!(".vm.img.tmp-{}", g.pid()));
    std::fs::write(&squatter, b"not cryo's").unwrap();
    let leftover = dir.join(".vm.img.tmp-99999999-0000000000000000");
    std::fs::write(&leftover, b"dead save").unwrap();
    save_vm(&api, &file, &["--keep-running"]);
    assert_eq!(std::fs::read(&squatter).unwrap(), b"not cryo's");
    assert!(!leftover.exists(), "{:?}", entries(&dir));
    // Guest memory is readable by its owner only, whatever the umask.
    assert_eq!(mode(&file), 0o600);
    g.follow(1, 2, 1, T);
    cryo(&["quit", "--api", a]);
    g.wait_exit(T);
}

#[test]
fn restores_check_their_inputs_before_loading() {
    let dir = workdir("hard-inputs");
    let api = socket_path("hard-inputs");
    let (mut g, _) = boot_with_api(1, 32, SMALL, &api);
    let image = dir.join("vm.img");
    save_vm(&api, &image, &["--keep-running"]);

    // `run --api FILE` never replaces a file.
    let precious = dir.join("precious.img");
    std::fs::write(&precious, b"a saved image").unwrap();
    let (status, _, err) = run_cryo(
        &[
            "run",
            "--kernel",
            cryo_tests::test_kernel().to_str().unwrap(),
            "--api",
            precious.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(status, Some(2), "{err}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"a saved image");

    // An API socket another VM serves is refused before the image is read.
    let (status, _, err) = run_cryo(
        &[
            "restore",
            "--from",
            image.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(status, Some(2), "{err}");
    assert!(!err.contains("restored"), "{err}");
    assert_eq!(ask(&api, r#"{"cmd":"status"}"#)["ok"], true);

    // A FIFO is refused without blocking in open.
    let fifo = dir.join("fifo.img");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let f = fifo.to_str().unwrap();
    for args in [
        vec!["verify", f],
        vec!["inspect", f],
        vec!["restore", "--from", f],
    ] {
        let (status, _, err) = run_cryo(&args, Duration::from_secs(30));
        assert_eq!(status, Some(2), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }

    // A stale socket file at a --listen path is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let api2 = socket_path("hard-inputs2");
    let _ = std::fs::remove_file(&api2);
    let mut r = Guest::spawn([
        "restore",
        "--listen",
        &format!("unix:{}", stale.display()),
        "--api",
        api2.to_str().unwrap(),
    ]);
    assert!(
        r.wait_for_stderr(T, |l| l.contains("waiting for a migration")),
        "{}",
        r.transcript()
    );
    let target = format!("unix:{}", stale.display());
    let (status, _, err) = cryo(&["save", "--api", api.to_str().unwrap(), "--to", &target]);
    assert_eq!(status, Some(0), "{err}");
    g.wait_exit(T);
    r.follow(1, 2, 1, T);
    cryo(&["quit", "--api", api2.to_str().unwrap()]);
    r.wait_exit(T);
}

#[test]
fn lazy_restore_warns_and_paused_restore_waits_for_resume() {
    let dir = workdir("hard-restore");
    let api = socket_path("hard-restore");
    let (mut g, _) = boot_with_api(1, 32, SMALL, &api);
    let image = dir.join("vm.img");
    save_vm(&api, &image, &[]);
    g.wait_exit(T);
    let before = g.follow_output(1);

    let lazy_api = socket_path("hard-restore-lazy");
    let mut lazy = restore_vm(&image, Some(&lazy_api), &["--lazy"]);
    assert!(
        lazy.wait_for_stderr(T, |l| l.contains("WARNING") && l.contains("not verified")),
        "{}",
        lazy.transcript()
    );
    lazy.follow(1, 1, 0, T);
    cryo(&["quit", "--api", lazy_api.to_str().unwrap()]);
    lazy.wait_exit(T);

    let paused_api = socket_path("hard-restore-paused");
    let mut paused = restore_vm(&image, Some(&paused_api), &["--paused"]);
    assert!(wait_for_socket(&paused_api, T), "{}", paused.transcript());
    let st = ask(&paused_api, r#"{"cmd":"status"}"#);
    assert_eq!(st["result"]["state"], "paused", "{st}");
    // Paused means the guest does not run: nothing on its console.
    assert!(
        paused.wait_for(Duration::from_secs(1), |_| true).is_none(),
        "{}",
        paused.transcript()
    );
    let (status, out, err) = cryo(&["resume", "--api", paused_api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}{err}");
    let after = paused.follow(1, 2, 0, T);
    check_continues(&before, &after, 1);
    cryo(&["quit", "--api", paused_api.to_str().unwrap()]);
    paused.wait_exit(T);
}

/// Starts a slow save (one buffered channel) in `format` on its own connection.
fn start_save(api: &Path, to: &Path, format: &str) -> UnixStream {
    let mut s = UnixStream::connect(api).unwrap();
    let direct_io = if format == "fixed-ram" {
        r#","direct_io":"off""#
    } else {
        ""
    };
    writeln!(
        s,
        r#"{{"cmd":"save","path":"{}","format":"{format}","channels":1{direct_io},"keep_running":true}}"#,
        to.display()
    )
    .unwrap();
    s
}

#[test]
fn a_save_in_progress_refuses_pause_and_resume_and_can_be_cancelled_or_ended() {
    let dir = workdir("hard-busy");
    let (mut g, api) = filled_guest("hard-busy", 2, 1024, 192);
    let file = dir.join("vm.img");

    for format in ["fixed-ram", "stream"] {
        let client = start_save(&api, &file, format);
        wait_for_phase(&api, "save", "writing");
        for cmd in ["resume", "pause"] {
            let r = ask(&api, &format!(r#"{{"cmd":"{cmd}"}}"#));
            assert_eq!(
                r["error"]["kind"], "busy",
                "{format}: {cmd} during a save: {r}"
            );
        }
        let r = ask(&api, r#"{"cmd":"cancel"}"#);
        assert_eq!(r["ok"], true, "{format}: {r}");
        let reply = reply_of(client);
        assert_eq!(reply["error"]["kind"], "cancelled", "{format}: {reply}");
        assert!(entries(&dir).is_empty(), "{format}: {:?}", entries(&dir));
        let st = ask(&api, r#"{"cmd":"status"}"#);
        assert_eq!(st["result"]["state"], "running", "{format}: {st}");
    }

    // quit during a save: the save stops, removes its file and answers.
    let client = start_save(&api, &file, "fixed-ram");
    wait_for_phase(&api, "save", "writing");
    assert_eq!(ask(&api, r#"{"cmd":"quit"}"#)["ok"], true);
    let reply = reply_of(client);
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(g.wait_exit(T).is_some());
    assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
}

#[test]
fn sigterm_during_a_snapshot_cleans_up_and_answers_the_client() {
    let dir = workdir("hard-term");
    let (mut g, api) = filled_guest("hard-term", 2, 1024, 192);
    let file = dir.join("snap.img");
    let mut client = UnixStream::connect(&api).unwrap();
    writeln!(
        client,
        r#"{{"cmd":"snapshot","path":"{}","channels":1,"direct_io":"off"}}"#,
        file.display()
    )
    .unwrap();
    wait_for_phase(&api, "snapshot", "copying");
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGTERM) }, 0);
    let reply = reply_of(client);
    assert_eq!(reply["error"]["kind"], "cancelled", "{reply}");
    assert!(g.wait_exit(T).is_some());
    assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
}

#[test]
fn live_snapshot_of_shared_memory() {
    let dir = workdir("hard-shm");
    let shm = PathBuf::from(format!("/dev/shm/cryo-{}-hard-shm", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let on_disk = dir.join("mem");
    for (mem_file, live_capable) in [(&shm, true), (&on_disk, false)] {
        let api = socket_path("hard-shm");
        let _ = std::fs::remove_file(&api);
        let mut g = Guest::spawn([
            "run",
            "--kernel",
            cryo_tests::test_kernel().to_str().unwrap(),
            "--mem-mib",
            "32",
            "--cmdline",
            &format!("console=ttyS0 {SMALL}"),
            "--mem-file",
            mem_file.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
        ]);
        assert!(wait_for_socket(&api, T), "{}", g.transcript());
        g.follow(1, 2, 1, T);
        let snap = dir.join("snap.img");
        let (status, _, err) = cryo(&[
            "snapshot",
            "--api",
            api.to_str().unwrap(),
            "--to",
            snap.to_str().unwrap(),
        ]);
        if live_capable {
            assert_eq!(status, Some(0), "{err}");
            let (status, _, err) = cryo(&["verify", snap.to_str().unwrap()]);
            assert_eq!(status, Some(0), "{err}");
        } else {
            assert_eq!(status, Some(2), "{err}");
            assert!(
                err.contains("/dev/shm") && err.contains("--keep-running"),
                "{err}"
            );
        }
        g.follow(1, 2, 1, T);
        cryo(&["quit", "--api", api.to_str().unwrap()]);
        g.wait_exit(T);
        // A memory file cryo created holds guest memory: owner-only.
        assert_eq!(mode(mem_file), 0o600);
    }
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn files_cryo_creates_are_private_under_any_umask() {
    let dir = workdir("hard-umask");
    let state = dir.join("state");
    let serial = dir.join("serial.log");
    let log = dir.join("cryo.log");
    let mem = dir.join("mem");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(cryo_bin())
        .args(["--log-level", "info", "--log-file"])
        .arg(&log)
        .args(["run", "--kernel"])
        .arg(cryo_tests::test_kernel())
        .args(["--mem-mib", "32", "--cmdline"])
        .arg(format!("console=ttyS0 {SMALL}"))
        .args(["--name", "vm1", "--state-dir"])
        .arg(&state)
        .arg("--serial-out")
        .arg(&serial)
        .arg("--mem-file")
        .arg(&mem);
    let mut g = Guest::from_command(cmd);
    let api = state.join("vm1/api.sock");
    assert!(wait_for_socket(&api, T), "{}", g.transcript());
    // Saved by name, as `virsh managedsave NAME`.
    let (status, out, err) = cryo(&[
        "managed-save",
        "vm1",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(status, Some(0), "{out}{err}");
    assert!(g.wait_exit(T).is_some());
    for (path, want) in [
        (state.clone(), 0o700),
        (state.join("vm1"), 0o700),
        (state.join("vm1/config.json"), 0o600),
        (state.join("vm1/managed.img"), 0o600),
        (serial.clone(), 0o600),
        (log.clone(), 0o600),
        (mem.clone(), 0o600),
    ] {
        assert_eq!(mode(&path), want, "{}", path.display());
    }
    // The socket path is still accepted in place of the name.
    let (status, _, err) = run_command(
        {
            let mut c = Command::new(cryo_bin());
            c.args(["managed-save", "--api", "/nonexistent/api.sock"]);
            c
        },
        T,
    );
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("/nonexistent/api.sock"), "{err}");
}
