//! virtio-net devices across save and restore, on real KVM with the test
//! kernel and real host taps (the test kernel has no network driver: these
//! tests check what the VMM records, reattaches and refuses; the Linux tier
//! moves frames through a real driver). Taps need root: without it each
//! test prints `SKIP` with the reason.

mod common;

use std::path::Path;

use common::{boot_with, migrate_live, refused, restores_and_continues, save_and_end, T};
use cryo_tests::{check_continues, cryo, snapshot_vm, socket_path, test_kernel, workdir};
use microvm::devices::virtio::tap::Tap;

/// A persistent tap for one test, removed when dropped.
struct TestTap(String);

impl TestTap {
    fn new(tag: &str) -> Self {
        let name = format!("cryo{}{tag}", std::process::id() % 100_000);
        let tap = Tap::open(&name).expect("create a tap");
        tap.set_persistent(true).expect("make the tap persistent");
        TestTap(name)
    }

    fn arg(&self) -> String {
        format!("tap={}", self.0)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        if let Ok(t) = Tap::open(&self.0) {
            let _ = t.set_persistent(false);
        }
    }
}

fn can_use_taps(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = Path::new("/dev/net/tun").exists();
    if !(root && tun) {
        eprintln!("SKIP {test}: needs root and /dev/net/tun (root {root}, /dev/net/tun {tun})");
    }
    root && tun
}

fn sections(file: &Path, name: &str) -> usize {
    let (status, out, err) = cryo(&["inspect", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    out.matches(&format!("\"name\": \"{name}\"")).count()
}

#[test]
fn net_devices_are_saved_and_reattached_to_their_taps() {
    if !can_use_taps("net_devices_are_saved_and_reattached_to_their_taps") {
        return;
    }
    let dir = workdir("net-reattach");
    let (a, b) = (TestTap::new("a"), TestTap::new("b"));
    let disk = dir.join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let api = socket_path("net-reattach");
    let file = dir.join("vm.cryo");
    let extra = [
        "--disk".to_string(),
        disk.display().to_string(),
        "--net".to_string(),
        format!("{},mac=02:00:00:00:00:07", a.arg()),
    ];
    let (mut g, _) = boot_with(&api, &extra);
    let before = save_and_end(&mut g, &api, &file, &[]);
    assert_eq!(sections(&file, "virtio-blk"), 1);
    assert_eq!(sections(&file, "virtio-net"), 1);

    // Back on the recorded tap, then on another one.
    restores_and_continues(&file, &[], &before, "net-reattach-r0");
    restores_and_continues(&file, &["--net", &b.arg()], &before, "net-reattach-r1");
    let mac = format!("{},mac=02:00:00:00:00:07", b.arg());
    restores_and_continues(&file, &["--net", &mac], &before, "net-reattach-r2");

    // One --net per saved device, and the guest's MAC.
    refused(
        &file,
        &["--net", &a.arg(), "--net", &b.arg()],
        "1 network devices but 2 --net",
    );
    let other = format!("{},mac=02:00:00:00:00:08", b.arg());
    refused(&file, &["--net", &other], "02:00:00:00:00:07");
    refused(&file, &["--net", "tap=no/such"], "bad tap name");
}

#[test]
fn net_sections_in_stream_saves() {
    if !can_use_taps("net_sections_in_stream_saves") {
        return;
    }
    let dir = workdir("net-stream");
    let a = TestTap::new("s");
    let api = socket_path("net-stream");
    let file = dir.join("vm.stream");
    let (mut g, _) = boot_with(&api, &["--net".into(), a.arg()]);
    let before = save_and_end(&mut g, &api, &file, &["--format", "stream"]);
    restores_and_continues(&file, &[], &before, "net-stream-r0");
}

#[test]
fn bad_net_options_are_bad_input() {
    let kernel = test_kernel().to_str().unwrap_or_default().to_string();
    for (arg, needle) in [
        ("bogus", "unknown net option"),
        ("mac=02:00:00:00:00:01", "needs tap=NAME"),
        ("tap=t,mac=01:00:00:00:00:01", "bad MAC"),
        ("tap=name-longer-than-15", "bad tap name"),
    ] {
        let (status, _, err) = cryo(&["run", "--kernel", &kernel, "--net", arg]);
        assert_eq!(status, Some(2), "{arg}: {err}");
        assert!(err.contains(needle), "{arg}: expected '{needle}' in {err}");
    }
}

#[test]
fn live_migration_of_a_vm_with_a_net_device_runs_on_at_the_destination() {
    if !can_use_taps("live_migration_of_a_vm_with_a_net_device_runs_on_at_the_destination") {
        return;
    }
    let a = TestTap::new("m");
    let api = socket_path("net-live-migrate");
    let (mut g, _) = boot_with(&api, &["--net".into(), a.arg()]);
    // The destination takes the same tap once the source let go of it.
    let (mut dest, before) = migrate_live(&mut g, &api, "net-live-migrate", &[]);
    let after = dest.follow(1, 2, 1, T);
    check_continues(&before, &after, 1);
    dest.kill();
}

/// A destination that cannot have the tap the VM needs refuses the
/// migration before its ACK, naming why: another process holds the tap it
/// is given, or it is given another MAC than the guest's. The source, which
/// never got an ACK, runs on; the tap it holds under its recorded name is
/// no refusal (on one host the source holds it until the migration ends:
/// the first test above).
#[test]
fn a_destination_that_cannot_have_the_tap_refuses_before_its_ack_and_the_source_runs_on() {
    use cryo_tests::migration::{
        finished, gave_up_cleanly, listen_at, source_runs_on, start_migrate,
    };
    if !can_use_taps(
        "a_destination_that_cannot_have_the_tap_refuses_before_its_ack_and_the_source_runs_on",
    ) {
        return;
    }
    let (a, b) = (TestTap::new("r"), TestTap::new("h"));
    // Held here: busy for the destination.
    let held = Tap::open(&b.0).expect("hold the second tap");
    let api = socket_path("net-refuse");
    let mac = format!("{},mac=02:00:00:00:00:07", a.arg());
    let (mut src, _) = boot_with(&api, &["--net".into(), mac]);
    let other_mac = format!("{},mac=02:00:00:00:00:09", a.arg());
    for (tag, net, why) in [
        ("net-refuse-busy", b.arg(), "in use by another process"),
        ("net-refuse-mac", other_mac, "02:00:00:00:00:09"),
    ] {
        let socket = socket_path(tag);
        let _ = std::fs::remove_file(&socket);
        let endpoint = format!("unix:{}", socket.display());
        let mut dest = listen_at(None, &endpoint, &["--net", &net]);
        let (code, out) = finished(start_migrate(&api, &endpoint, &[]));
        assert_ne!(code, Some(0), "{tag}: {out}");
        assert!(out.contains("refused the device state"), "{tag}: {out}");
        // The source is told why.
        assert!(out.contains(why), "{tag}: {out}");
        let why_dest = gave_up_cleanly(&mut dest);
        assert!(why_dest.contains(why), "{tag}: {why_dest}");
        assert_eq!(dest.wait_exit(T).and_then(|s| s.code()), Some(2), "{tag}");
        source_runs_on(&mut src, &api, 1);
    }
    drop(held);
    let (status, out, err) = cryo(&["quit", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let _ = src.wait_exit(T);
}

#[test]
fn a_vm_with_a_net_device_takes_a_live_snapshot_and_runs_on() {
    if !can_use_taps("a_vm_with_a_net_device_takes_a_live_snapshot_and_runs_on") {
        return;
    }
    let dir = workdir("net-snapshot");
    let a = TestTap::new("l");
    let api = socket_path("net-snapshot");
    let file = dir.join("snap.cryo");
    let (mut g, _) = boot_with(&api, &["--net".into(), a.arg()]);
    snapshot_vm(&api, &file);
    let more = g.follow(1, 2, 1, T);
    assert!(more.beats.values().all(|b| *b > 0), "{}", g.transcript());
    g.kill();
    assert_eq!(sections(&file, "virtio-net"), 1);
}
