//! Live snapshots of a VM whose vCPUs write hard all the while: the image is
//! the VM at the moment of the pause, the original runs on, snapshots can be
//! repeated and cancelled, and memory that cannot be write-protected is
//! refused clearly.

use std::path::Path;
use std::time::Duration;

use cryo_tests::{
    boot_with_api, boot_with_api_filling, cryo, restore_vm, snapshot_vm as snapshot, socket_path,
    wait_for_socket, workdir, Progress,
};

const T: Duration = Duration::from_secs(120);
/// Every vCPU rewrites pages as fast as it can; heartbeats every 100 ms.
const HARD: &str = "cryo.mem=96 cryo.rate=0 cryo.hb_ms=100";

/// Heartbeat period of [`HARD`] guests, in milliseconds.
const HB_MS: f64 = 100.0;

/// How many heartbeats may fall between the last one seen before a snapshot
/// was asked for and its pause: `base` for the request's own latency, plus
/// the heartbeats of the write protection the snapshot applied while the
/// vCPUs ran (its `pre_arm_ms`, which grows with RAM and with the host's
/// load), so that a slow host does not fail a correct snapshot.
fn pause_slack(stats: &serde_json::Value, base: u64) -> u64 {
    let pre_arm_ms = stats["pre_arm_ms"].as_f64().unwrap_or(0.0);
    base + (pre_arm_ms / HB_MS).ceil() as u64
}

/// The restored guest starts from the heartbeats of the pause moment: after
/// the last one printed before the snapshot was asked for, and at most
/// `slack` heartbeats later (see [`pause_slack`]).
fn check_point_in_time_within(
    before: &Progress,
    during_last: &Progress,
    restored: &Progress,
    slack: u64,
) {
    assert!(!restored.booted);
    for (cpu, (seq_before, _)) in &before.last_beat {
        let (first, _) = restored.first_beat[cpu];
        let (later, _) = during_last.last_beat[cpu];
        assert!(
            first > *seq_before && first <= seq_before + slack,
            "cpu {cpu}: heartbeat {seq_before} before the snapshot, restored guest starts at {first}, more than {slack} later (the original's first beats after the snapshot reached {later})"
        );
    }
}

/// Restores `file` once per entry of `how` (extra `restore` arguments) and
/// checks each restored guest: it starts from the pause moment and verifies
/// every page twice against its own record;
/// `slack` as in [`check_point_in_time_within`].
fn check_restores(
    file: &Path,
    how: &[&[&str]],
    (before, during): (&Progress, &Progress),
    slack: u64,
) {
    for extra in how {
        let mut r = restore_vm(file, None, extra);
        let restored = r.follow(2, 3, 2, T);
        check_point_in_time_within(before, during, &restored, slack);
    }
}

/// Field `k` of a snapshot's statistics, a number.
fn stat(stats: &serde_json::Value, k: &str) -> u64 {
    stats[k]
        .as_u64()
        .unwrap_or_else(|| panic!("no {k} in {stats}"))
}

#[test]
fn snapshot_of_a_busy_vm_is_the_pause_moment() {
    let dir = workdir("live-basic");
    let api = socket_path("live-basic");
    let file = dir.join("snap.img");
    let (mut g, _) = boot_with_api(2, 256, HARD, &api);
    g.drain();
    let before = g.follow(2, 1, 0, T);
    let stats = snapshot(&api, &file);
    assert!(stats["paused_ms"].as_f64().unwrap() < 1000.0, "{stats}");
    assert!(
        stat(&stats, "pages_by_faults") > 0,
        "no vCPU write hit the protection: {stats}"
    );
    // The original runs on without mismatch.
    let during = g.follow(2, 5, 2, T);
    assert!(
        during.last_beat[&0].0 > before.last_beat[&0].0 + 3,
        "{during:?}"
    );
    check_restores(
        &file,
        &[&[], &["--lazy"]],
        (&before, &during),
        pause_slack(&stats, 3),
    );
}

/// A guest rewriting random pages flat out over 256 MiB: its writes during
/// the snapshot land mostly in blocks the walkers have not reached yet. For
/// each, the fault thread copies only the written 4 KiB page (its content
/// at the pause) and un-protects only that page; the block's walker later
/// takes the copy for that page and the still-protected memory for the
/// rest. Blocks assembled that way must hold, page by page, the pause: the
/// restored guest checks every page against its own record of its
/// generation, so a page from after the pause, or one lost to a
/// neighbour's copy, is a MISMATCH. (Eager restore only: the image is what
/// is tested, and a lazy restore of this much hot memory is slow on a
/// loaded host.)
#[test]
fn pages_written_during_the_snapshot_are_copied_one_by_one_at_the_pause() {
    let dir = workdir("live-pages");
    let api = socket_path("live-pages");
    let file = dir.join("snap.img");
    let (mut g, _) = boot_with_api(2, 512, "cryo.mem=128 cryo.rate=0 cryo.hb_ms=100", &api);
    g.drain();
    let before = g.follow(2, 1, 0, T);
    let stats = snapshot(&api, &file);
    let n = |k: &str| stat(&stats, k);
    assert!(
        n("pages_by_faults") > 0,
        "no page copied for a write: {stats}"
    );
    assert!(
        n("blocks_with_fault_pages") > 0,
        "no block assembled from page copies and memory: {stats}"
    );
    assert!(
        n("pages_by_faults") >= n("blocks_with_fault_pages"),
        "{stats}"
    );
    let during = g.follow(2, 3, 1, T);
    check_restores(&file, &[&[]], (&before, &during), pause_slack(&stats, 3));
}

/// Protection is applied while the vCPUs write hard (1 GiB takes a while to
/// protect), so many writes land between the start of arming and the pause:
/// the image must still be the pause moment. The restored guest checks every
/// page against its own record of what it wrote (MISMATCH otherwise).
#[test]
fn writes_while_protection_is_applied_end_at_the_pause() {
    let dir = workdir("live-prearm");
    let api = socket_path("live-prearm");
    let (mut g, _) = boot_with_api(2, 1024, "cryo.mem=384 cryo.rate=0 cryo.hb_ms=100", &api);
    // The guest's speed varies with the host's load: take snapshots until
    // one had guest writes land between arming and the pause.
    let mut tries = 0;
    let (before, stats, file) = loop {
        g.drain();
        let before = g.follow(2, 1, 0, T);
        let file = dir.join(format!("snap{tries}.img"));
        let stats = snapshot(&api, &file);
        if stat(&stats, "pre_arm_faults") > 0 {
            break (before, stats, file);
        }
        tries += 1;
        assert!(
            tries < 5,
            "in 5 snapshots no guest write hit the window between arming and the pause: {stats}"
        );
    };
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    assert!(
        n("blocks_reprotected_running") + n("blocks_reprotected_paused") > 0,
        "{stats}"
    );
    let during = g.follow(2, 3, 1, T);
    check_restores(&file, &[&[]], (&before, &during), pause_slack(&stats, 3));
}

const MIB: u64 = 1 << 20;

/// Bytes of guest RAM present (not holes) in the fixed-ram image at `file`,
/// which must verify (every chunk's CRC, holes read as zeros).
fn present_bytes(file: &Path) -> u64 {
    let img = fixed_ram::Image::open(file).unwrap();
    img.verify().unwrap();
    let regions = img.layout().regions().len();
    (0..regions).map(|r| img.present_pages(r)).sum::<u64>() * 4096
}

/// A 2 GiB guest whose vCPUs write only 96 MiB: the walkers record the
/// never-touched blocks as holes without reading them; the image holds what
/// the guest touched (the rest reads as zeros), and restores, eagerly and
/// lazily, to the pause moment with every page the guest wrote intact (it
/// checks each against its own record).
#[test]
fn mostly_untouched_memory_is_skipped_and_restores() {
    let dir = workdir("live-sparse");
    let api = socket_path("live-sparse");
    let file = dir.join("snap.img");
    let (mut g, _) = boot_with_api(2, 2048, "cryo.mem=48 cryo.rate=0 cryo.hb_ms=100", &api);
    g.drain();
    let before = g.follow(2, 1, 0, T);
    let stats = snapshot(&api, &file);
    let n = |k: &str| stat(&stats, k);
    // Every block is copied once, by a walker or by a fault.
    let blocks = n("blocks_by_walkers") + n("blocks_by_faults");
    assert!(n("blocks_unpopulated") >= blocks * 3 / 4, "{stats}");
    assert!(n("blocks_unpopulated") <= n("blocks_by_walkers"), "{stats}");
    assert!(
        n("pages_by_faults") > 0,
        "no vCPU write hit the protection: {stats}"
    );
    let during = g.follow(2, 3, 1, T);
    let present = present_bytes(&file);
    assert!(
        (96 * MIB..192 * MIB).contains(&present),
        "{present} bytes present in the image: {stats}"
    );
    // Protecting 2 GiB before the pause takes a few heartbeats.
    check_restores(
        &file,
        &[&[], &["--lazy"]],
        (&before, &during),
        pause_slack(&stats, 10),
    );
}

/// A snapshot taken while the guest fills its memory for the first time:
/// the pages it first writes during the snapshot were never populated at
/// the pause, so the image must hold them as zeros (their content then) and
/// not what the guest wrote into them afterwards. The restored guest goes
/// on filling from the pause and then checks every page against its record.
#[test]
fn pages_first_written_during_the_snapshot_keep_their_pause_content() {
    let dir = workdir("live-filling");
    let api = socket_path("live-filling");
    let file = dir.join("snap.img");
    let (mut g, _) =
        boot_with_api_filling(2, 2048, "cryo.mem=512 cryo.rate=0 cryo.hb_ms=100", &api);
    g.drain();
    let before = g.follow(2, 1, 0, T);
    let stats = snapshot(&api, &file);
    let n = |k: &str| stat(&stats, k);
    assert!(n("blocks_unpopulated") > 0, "{stats}");
    assert!(
        n("pages_by_faults") > 0,
        "no first write hit the protection: {stats}"
    );
    // The original finishes its fill (1 GiB) and verifies it.
    let during = g.follow(2, 3, 1, T);
    let present = present_bytes(&file);
    assert!(
        present < 1024 * MIB,
        "the image holds {present} bytes: pages filled after the pause leaked in ({stats})"
    );
    eprintln!("{present} bytes present at the pause; {stats}");
    check_restores(&file, &[&[]], (&before, &during), pause_slack(&stats, 10));
}

#[test]
fn repeated_snapshots_of_one_running_vm() {
    let dir = workdir("live-repeat");
    let api = socket_path("live-repeat");
    let (mut g, _) = boot_with_api(2, 256, HARD, &api);
    let mut files = Vec::new();
    for i in 0..3 {
        g.drain();
        let before = g.follow(2, 1, 0, T);
        let file = dir.join(format!("snap{i}.img"));
        let stats = snapshot(&api, &file);
        let during = g.follow(2, 2, 1, T);
        let (status, _, err) = cryo(&["verify", file.to_str().unwrap()]);
        assert_eq!(status, Some(0), "{err}");
        files.push((file, before, during, pause_slack(&stats, 3)));
    }
    for (file, before, during, slack) in &files {
        let mut r = restore_vm(file, None, &[]);
        let restored = r.follow(2, 2, 1, T);
        check_point_in_time_within(before, during, &restored, *slack);
    }
}

#[test]
fn cancel_leaves_no_file_and_the_vm_running() {
    let dir = workdir("live-cancel");
    let api = socket_path("live-cancel");
    let file = dir.join("snap.img");
    // A bigger guest so that the snapshot is still running when cancelled.
    let (mut g, _) = boot_with_api(2, 1024, "cryo.mem=384 cryo.rate=0 cryo.hb_ms=100", &api);
    let snap = std::process::Command::new(cryo_tests::cryo_bin())
        .args([
            "snapshot",
            "--api",
            api.to_str().unwrap(),
            "--to",
            file.to_str().unwrap(),
            "--channels",
            "1",
            "--direct-io",
            "off",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    let mut cancelled = false;
    while std::time::Instant::now() < deadline {
        let (status, _, _) = cryo(&["cancel", "--api", api.to_str().unwrap()]);
        if status == Some(0) {
            cancelled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cancelled, "cancel never found the snapshot running");
    let out = snap.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(!file.exists());
    assert!(!dir.read_dir().unwrap().any(|_| true), "files left behind");
    // No protection is left: the guest runs on at full speed, without mismatch.
    g.follow(2, 5, 3, T);
    // And a later snapshot works.
    snapshot(&api, &file);
    g.follow(2, 2, 1, T);
}

#[test]
fn lazily_restored_vm_is_refused_clearly() {
    let dir = workdir("live-lazy");
    let api = socket_path("live-lazy");
    let saved = dir.join("saved.img");
    let (mut g, _) = boot_with_api(1, 64, "cryo.mem=8 cryo.hb_ms=100", &api);
    cryo_tests::save_vm(&api, &saved, &[]);
    assert!(g.wait_exit(T).is_some());
    let api2 = socket_path("live-lazy-r");
    let mut r = restore_vm(&saved, Some(&api2), &["--lazy"]);
    assert!(wait_for_socket(&api2, T));
    r.follow(1, 2, 1, T);
    let (status, _, err) = cryo(&[
        "snapshot",
        "--api",
        api2.to_str().unwrap(),
        "--to",
        dir.join("snap.img").to_str().unwrap(),
    ]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("cannot be write-protected"), "{err}");
    assert!(!dir.join("snap.img").exists());
    // The VM runs on.
    let p = r.follow(1, 3, 1, T);
    assert!(!p.booted);
}
