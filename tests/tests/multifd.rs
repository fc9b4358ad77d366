//! Multifd channels: saves and restores through 1, 2 and 4 channels, with and
//! without O_DIRECT, to files and over sockets; peers that disconnect; a
//! filesystem without O_DIRECT.

use std::time::Duration;

use cryo_tests::{
    boot_with_api, check_continues, cryo, restore_vm, save_vm, socket_path, workdir, Guest,
};

const T: Duration = Duration::from_secs(90);

fn file_round_trip(channels: u32, direct_io: &str) {
    let name = format!("mfd-file-{channels}-{direct_io}");
    let dir = workdir(&name);
    let api = socket_path(&name);
    let file = dir.join("vm.img");
    let (mut g, _) = boot_with_api(2, 64, "cryo.mem=8 cryo.hb_ms=200", &api);
    let ch = channels.to_string();
    save_vm(&api, &file, &["--channels", &ch, "--direct-io", direct_io]);
    assert!(g.wait_exit(T).is_some());
    let before = g.follow_output(2);
    let mut r = restore_vm(&file, None, &["--channels", &ch, "--direct-io", direct_io]);
    let after = r.follow(2, 3, 2, T);
    check_continues(&before, &after, 2);
}

#[test]
fn file_channels_1_buffered() {
    file_round_trip(1, "off");
}

#[test]
fn file_channels_2_direct() {
    file_round_trip(2, "on");
}

#[test]
fn file_channels_4_direct() {
    file_round_trip(4, "on");
}

#[test]
fn file_channels_4_buffered() {
    file_round_trip(4, "off");
}

fn socket_round_trip(channels: u32, endpoint: &str, compress: &str) {
    let name = format!("mfd-sock-{channels}-{compress}");
    let api = socket_path(&name);
    let mut dest = Guest::spawn(["restore", "--listen", endpoint]);
    assert!(
        dest.wait_for_stderr(T, |l| l.contains("waiting for a migration")),
        "{}",
        dest.transcript()
    );
    let (mut g, _) = boot_with_api(2, 64, "cryo.mem=8 cryo.hb_ms=200", &api);
    let ch = channels.to_string();
    let (status, out, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        endpoint,
        "--channels",
        &ch,
        "--compress",
        compress,
    ]);
    assert_eq!(status, Some(0), "{out}\n{err}\n{}", dest.transcript());
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
    let before = g.follow_output(2);
    let after = dest.follow(2, 3, 2, T);
    check_continues(&before, &after, 2);
}

#[test]
fn unix_socket_1_channel() {
    let p = socket_path("mfd-listen-1");
    let _ = std::fs::remove_file(&p);
    socket_round_trip(1, &format!("unix:{}", p.display()), "none");
}

#[test]
fn unix_socket_4_channels_lz4() {
    let p = socket_path("mfd-listen-4");
    let _ = std::fs::remove_file(&p);
    socket_round_trip(4, &format!("unix:{}", p.display()), "lz4");
}

#[test]
fn tcp_2_channels_zstd() {
    // A port unlikely to collide: derived from the process id.
    let port = 20000 + (std::process::id() % 20000);
    socket_round_trip(2, &format!("tcp:127.0.0.1:{port}"), "zstd");
}

/// A guest with `mib` MiB of incompressible data and an API socket.
fn filled_guest(name: &str, mib: u64) -> (Guest, std::path::PathBuf) {
    cryo_tests::filled_guest(name, 2, mib + 64, mib / 2)
}

/// A filled source guest, a `cryo restore --listen` waiting for it, and a
/// `cryo save` to it (one zstd channel, so that the transfer takes a while)
/// under way for 400 ms.
fn migration_under_way(name: &str) -> (Guest, std::path::PathBuf, Guest, std::process::Child) {
    let listen = socket_path(&format!("{name}-l"));
    let _ = std::fs::remove_file(&listen);
    let endpoint = format!("unix:{}", listen.display());
    let (src, api) = filled_guest(&format!("{name}-src"), 512);
    let dest = Guest::spawn(["restore", "--listen", &endpoint]);
    assert!(dest.wait_for_stderr(T, |l| l.contains("waiting for a migration")));
    let saver = std::process::Command::new(cryo_tests::cryo_bin())
        .args([
            "save",
            "--api",
            api.to_str().unwrap(),
            "--to",
            &endpoint,
            "--channels",
            "1",
            "--compress",
            "zstd",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    (src, api, dest, saver)
}

#[test]
fn receiver_dies_mid_transfer_and_the_source_runs_on() {
    let (mut g, api, mut dest, saver) = migration_under_way("mfd-dies-r");
    dest.kill();
    let out = saver.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the save should fail: {err}");
    assert!(
        err.contains("cryo: error:") && err.lines().count() == 1,
        "{err}"
    );
    // The source VM is still there and running.
    let (status, out, _) = cryo(&["status", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0));
    assert!(out.contains("\"running\""), "{out}");
    assert!(g.wait_exit(Duration::from_millis(100)).is_none());
    // And it can still be saved to a file.
    let dir = workdir("mfd-dies");
    save_vm(&api, &dir.join("after.img"), &[]);
}

#[test]
fn sender_dies_mid_transfer_and_the_destination_never_runs() {
    let (mut g, _api, mut dest, saver) = migration_under_way("mfd-dies-s");
    g.kill();
    let _ = saver.wait_with_output();
    let status = dest.wait_exit(T);
    let code = status.and_then(|s| s.code());
    assert!(
        code.is_some_and(|c| c != 0),
        "destination exit {code:?}\n{}",
        dest.transcript()
    );
    assert!(
        dest.output().is_empty(),
        "a half-loaded VM ran: {}",
        dest.transcript()
    );
    let err = dest.stderr().join("\n");
    assert!(err.contains("cryo: error:"), "{err}");
}

#[test]
fn direct_io_where_the_filesystem_refuses_it() {
    // tmpfs supports O_DIRECT since Linux 6.6; ramfs does not.
    let Some(fs) = cryo_tests::Mount::new("mfd-ramfs", "ramfs", None) else {
        eprintln!("skipped: cannot mount a ramfs here (needs root)");
        return;
    };
    let api = socket_path("mfd-ramfs");
    let (mut g, _) = boot_with_api(1, 32, "cryo.mem=4 cryo.hb_ms=200", &api);
    let target = fs.0.join("vm.img");
    let (status, _, err) = cryo(&[
        "save",
        "--api",
        api.to_str().unwrap(),
        "--to",
        target.to_str().unwrap(),
        "--direct-io",
        "on",
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("O_DIRECT") && err.contains("ramfs"), "{err}");
    assert!(!target.exists());
    assert!(
        !fs.0.read_dir().unwrap().any(|_| true),
        "a temporary file was left behind"
    );
    g.follow(1, 2, 1, T);
    // auto falls back to buffered I/O there, with a warning.
    let out = save_vm(&api, &target, &["--direct-io", "auto", "--keep-running"]);
    assert!(out["ram_pages"].as_u64().unwrap() > 0);
    g.follow(1, 2, 1, T);
    let mut r = restore_vm(&target, None, &["--direct-io", "auto"]);
    r.follow(1, 2, 1, T);
}
