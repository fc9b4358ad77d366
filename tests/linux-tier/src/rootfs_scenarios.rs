//! The root-on-disk guest: a Linux guest whose root filesystem is ext4 on
//! a virtio-blk disk (booted through a small initramfs that mounts it and
//! `switch_root`s, as distributions boot) and whose network is virtio-net
//! on a host tap, taken through every save mode in turn: managed save,
//! stream, fixed-ram, multifd, a migration over a unix socket, a live
//! migration (`cryo migrate`), a live save (`save --live`), a live
//! snapshot with `--disk-snapshot`, and (on the guest restored from it) a
//! `save --keep-running` with `--disk-snapshot`.
//!
//! All the while a writer appends numbered records to `/var/rec.log` on
//! the root filesystem, each with fsync, and says `RACK n` once record n is
//! acknowledged; and a TCP stream of numbered lines flows to the driver.
//! After every restore: the heartbeats carry on, every acknowledged record
//! is read back from the disk (the guest's page cache dropped first), the
//! TCP stream goes on with nothing lost or repeated, and the guest pings
//! the host. Each image of a running VM restores onto its disk copy after
//! its source ran on and shut down. Every guest that ends (those sources,
//! and the last restored guest) remounts its root read-only and powers off;
//! the host's `e2fsck -fn` finds its root image clean, and the host's
//! `debugfs` reads every record it acknowledged from it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::artifacts::GUEST_TOOLS_DIR;
use crate::guest::{last_heartbeat, Failure, LinuxVm};
use crate::net_scenarios::{host, make_tap, Stream};
use crate::net_scenarios::{GUEST_IP, HOST_IP, RECOVERY_TIMEOUT, TAP};
use crate::report;
use crate::scenarios::{carries_on, cryo_ok, names, path_str, run_kernel_args, spawn_restore};
use crate::scenarios::{save_and_restore, strings, SaveStep, Setup, Tally};
use crate::scenarios::{BEAT_TIMEOUT, BOOT_TIMEOUT, EXIT_TIMEOUT};

/// The driver's port for the guest's TCP stream (the network scenarios
/// use 7777; the restores of images of a running VM open new streams, on
/// the ports their [`Fork`] names).
const PORT: u16 = 7778;
/// Numbers the TCP stream must carry on with after each restore.
const LINES_AFTER: u64 = 4;
/// The name the guest runs under (for the managed save).
const NAME: &str = "rootfs";

/// The writer: appends `REC n` (11 bytes) to /var/rec.log with fsync, then
/// says `RACK n`; its pid goes in `$W`.
const WRITER: &str = "(i=0; while true; do i=$((i+1)); printf 'REC %06d\\n' $i | \
dd of=/var/rec.log bs=11 oflag=append conv=notrunc,fsync 2>/dev/null && echo RACK $i; \
sleep 0.3; done) & W=$!";

/// Stops the writer, drops the page cache so that the log is read from
/// the disk, checks every record is `REC <line number>` (`RECCHECK
/// lines=N bad=B`), lets the writer go on, and pings the host.
fn disk_and_ping_check() -> String {
    format!(
        "kill -STOP $W; sync; echo 3 > /proc/sys/vm/drop_caches; \
awk '{{ if ($0 != sprintf(\"REC %06d\", NR)) b++ }} END {{ print \"RECCHECK lines=\" NR \" bad=\" b+0 }}' /var/rec.log; \
kill -CONT $W; ping -c 1 -W 10 {HOST_IP} >/dev/null && echo PONG-$((2+3))"
    )
}

/// The saves of the chain after the managed save, each restored in a new
/// process (on the disk and the tap the image records).
const STEPS: &[SaveStep] = &[
    SaveStep {
        verb: "save",
        scenario: "rootfs-save-stream",
        save: &["--format", "stream"],
        restore: &[],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: "rootfs-save-fixed-ram",
        save: &["--format", "fixed-ram"],
        restore: &[],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: "rootfs-save-multifd",
        save: &["--format", "fixed-ram", "--channels", "2"],
        restore: &["--channels", "2"],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: "rootfs-migrate-unix",
        save: &[],
        restore: &[],
        over_socket: true,
    },
    // Live: the writer's fsyncs go on during the pre-copy rounds, so the
    // disk's writes into guest memory (block data, used rings) must reach
    // the dirty log. TCG is slow: the pause may be longer than on hardware
    // and the migration must end well inside the driver's save timeout.
    SaveStep {
        verb: "migrate",
        scenario: "rootfs-migrate-live",
        save: &[
            "--channels",
            "2",
            "--max-downtime-ms",
            "300",
            "--timeout-s",
            "200",
        ],
        restore: &[],
        over_socket: true,
    },
    SaveStep {
        verb: "save",
        scenario: "rootfs-save-live",
        save: &[
            "--live",
            "--channels",
            "2",
            "--max-downtime-ms",
            "300",
            "--timeout-s",
            "200",
        ],
        restore: &["--channels", "2"],
        over_socket: false,
    },
];

/// What the driver follows of the guest, besides its cryo process.
struct RootGuest {
    stream: Stream,
    /// `cryo run` arguments that start it by name (and bring back its
    /// managed save).
    run: Vec<String>,
    /// Its root disk.
    disk: PathBuf,
}

/// Runs the root-on-disk scenarios.
pub(crate) fn rootfs_guest(setup: &Setup, tally: &mut Tally) {
    match boot(setup) {
        Ok((detail, vm, guest)) => {
            tally.pass(names::ROOTFS_BOOT, &detail);
            let every = every_save(setup, vm, guest, tally);
            tally.outcome(names::ROOTFS_EVERY_SAVE, every);
        }
        Err(f) => {
            tally.fail(names::ROOTFS_BOOT, &f);
            tally.not_run_after(&[names::ROOTFS_EVERY_SAVE], "the guest did not boot", &f);
        }
    }
    let _ = host(&["tunctl", "-d", TAP]);
    let _ = std::fs::remove_dir_all(setup.work.join("rootfs"));
}

/// The number of a `RACK n` line.
fn rack(line: &str) -> Option<u64> {
    let rest = &line[line.find("RACK ")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The highest record `lines` acknowledge.
fn acked(lines: &[String]) -> u64 {
    lines.iter().filter_map(|l| rack(l)).max().unwrap_or(0)
}

/// Types the TCP stream of numbered lines to `port`; its pid goes in `$N`.
fn start_stream(vm: &mut LinuxVm, port: u16) -> Result<(), Failure> {
    vm.type_line(&format!(
        "(i=0; while true; do i=$((i+1)); echo SEQ $i; sleep 0.2; done) | nc {HOST_IP} {port} & N=$!"
    ))
}

/// Copies the root image, makes the tap, boots the guest by name with its
/// root on the disk and eth0 on the tap, checks `/` is the disk's ext4,
/// and starts the writer and the TCP stream.
fn boot(setup: &Setup) -> Result<(String, LinuxVm, RootGuest), Failure> {
    let dir = setup.work.join("rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    let disk = dir.join("root.ext4");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::copy(&setup.rootfs, &disk))
        .map_err(|e| Failure::plain(format!("copying the root image: {e}")))?;
    make_tap()?;
    let stream = Stream::listen(PORT)?;
    let state = dir.join("state");
    let extra = strings(&[
        "--name",
        NAME,
        "--state-dir",
        &path_str(&state),
        "--disk",
        &path_str(&disk),
        "--net",
        &format!("tap={TAP}"),
    ]);
    let run = run_kernel_args(&setup.kernel, &setup.root_initrd, setup, 1, &extra);
    let mut vm = LinuxVm::spawn(&run, state.join(NAME).join("api.sock"));
    let started = Instant::now();
    let init = vm.wait_init(BOOT_TIMEOUT)?;
    report::figure("rootfs_boot_to_init", started.elapsed().as_millis(), "ms");
    vm.wait_shell(6, std::time::Duration::from_secs(10))?;
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    vm.shell(
        &format!("grep -q '^/dev/vda / ext4 rw' /proc/mounts && ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && echo ROOT-UP-$((40+2))"),
        "ROOT-UP-42",
        BOOT_TIMEOUT,
    )
    .map_err(Failure::at(&vm, "root on /dev/vda, eth0 up"))?;
    let mut guest = RootGuest { stream, run, disk };
    vm.type_line(WRITER)?;
    start_stream(&mut vm, PORT)?;
    vm.wait_line(BOOT_TIMEOUT, |l| rack(l).is_some_and(|n| n >= 3))
        .map_err(Failure::at(&vm, "records before the first save"))?;
    guest
        .stream
        .wait_for(LINES_AFTER, BOOT_TIMEOUT)
        .map_err(Failure::at(&vm, "TCP stream before the first save"))?;
    Ok((
        format!(
            "/ is /dev/vda ext4 rw (switch_root from the boot initramfs), eth0 on {TAP}; {} in {:.1} s; fsynced records and TCP flowing",
            init.trim(),
            started.elapsed().as_secs_f64()
        ),
        vm,
        guest,
    ))
}

/// After a restore: a record after `acked` (the writer goes on), the TCP
/// stream on by [`LINES_AFTER`] numbers, intact, then every record
/// acknowledged so far read back from the disk, and a ping to the host.
fn back(vm: &mut LinuxVm, guest: &mut RootGuest, acked: u64) -> Result<String, Failure> {
    vm.wait_line(BEAT_TIMEOUT, |l| rack(l).is_some_and(|n| n > acked))
        .map_err(Failure::at(vm, "records after the restore"))?;
    let started = Instant::now();
    stream_goes_on(&mut guest.stream).map_err(Failure::at(vm, "TCP stream after the restore"))?;
    let tcp_ms = started.elapsed().as_millis();
    let lines = disk_check(vm, acked)?;
    Ok(format!(
        "{lines} records on disk (>= {acked} acknowledged), TCP on to {} ({tcp_ms} ms), ping ok",
        guest.stream.seen.len()
    ))
}

/// Waits for [`LINES_AFTER`] numbers beyond those that have arrived so far
/// (so sent by the guest as it runs now, not before a save), and checks
/// the whole stream: every number once, in order.
fn stream_goes_on(stream: &mut Stream) -> Result<(), Failure> {
    stream.drain();
    let seen = stream.seen.len() as u64;
    stream.wait_for(seen + LINES_AFTER, RECOVERY_TIMEOUT)?;
    stream.check()
}

/// Runs [`disk_and_ping_check`]: every record well formed, and at least
/// as many as were acknowledged: `acked` before the save, and any this VM
/// acknowledged before the check stopped its writer. Returns the record
/// count.
fn disk_check(vm: &mut LinuxVm, acked: u64) -> Result<u64, Failure> {
    vm.shell(&disk_and_ping_check(), "PONG-5", BEAT_TIMEOUT)
        .map_err(Failure::at(vm, "records on disk, ping"))?;
    let out = vm.guest.output();
    let check = out.iter().enumerate().rev().find_map(|(i, l)| {
        let line = &l[l.find("RECCHECK lines=")?..];
        let lines = cryo_tests::num(line, "lines")?;
        let bad = cryo_tests::num(line, "bad")?;
        Some((lines, bad, self::acked(&out[..i]).max(acked)))
    });
    match check {
        Some((lines, 0, acked)) if lines >= acked => Ok(lines),
        other => Err(Failure::of(
            vm,
            format!("the record log read from disk: (lines, bad, acknowledged) {other:?}"),
        )),
    }
}

/// The whole chain; returns its detail, one entry per save mode.
fn every_save(
    setup: &Setup,
    vm: LinuxVm,
    mut guest: RootGuest,
    tally: &mut Tally,
) -> Result<String, Failure> {
    let (mut vm, managed) = managed_save(vm, &mut guest, tally).map_err(label("managed save"))?;
    let mut done = vec![managed];
    for (i, step) in STEPS.iter().enumerate() {
        // Records acknowledged before the save (more may come before it
        // stops the VM: disk_check also counts those the restored VM
        // prints, which follow on from them).
        let acked_so_far = acked(&vm.guest.output());
        let (mut next, detail) =
            save_and_restore(setup, vm, step, 100 + i, tally).map_err(label(step.scenario))?;
        let checks = back(&mut next, &mut guest, acked_so_far).map_err(label(step.scenario))?;
        done.push(format!("{}: {detail}; {checks}", step.scenario));
        vm = next;
    }
    done.push(forks(setup, vm, guest, tally).map_err(label("images of a running VM"))?);
    Ok(done.join(" | "))
}

fn label(step: &str) -> impl FnOnce(Failure) -> Failure + '_ {
    move |f| Failure {
        reason: format!("{step}: {}", f.reason),
        log: f.log,
    }
}

/// `cryo managed-save`, then `cryo run --name` again brings the guest back.
fn managed_save(
    mut vm: LinuxVm,
    guest: &mut RootGuest,
    tally: &mut Tally,
) -> Result<(LinuxVm, String), Failure> {
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    let api = path_str(&vm.api);
    let out = cryo_ok(
        &strings(&["--json", "managed-save", "--api", &api]),
        "cryo managed-save",
    )
    .map_err(Failure::with_vm(&vm))?;
    let paused = paused_ms(&out);
    report::figure("rootfs_managed_save_paused_ms", paused, "ms");
    let code = vm.wait_exit(EXIT_TIMEOUT)?;
    if code != 0 {
        return Err(Failure::of(&vm, format!("the saved VM exited {code}")));
    }
    let before = last_heartbeat(&vm.guest.output())
        .ok_or_else(|| Failure::of(&vm, "no heartbeat before the managed save"))?;
    let acked = acked(&vm.guest.output());
    let mut next = LinuxVm::spawn(&guest.run, vm.api.clone());
    let range = before.seq + 1..=before.seq + 2;
    let beats = carries_on(&mut next, "rootfs-managed-save", before, range, tally)?;
    let checks = back(&mut next, guest, acked)?;
    Ok((
        next,
        format!("managed save (paused {paused:.0} ms), `cryo run --name` again: {beats}; {checks}"),
    ))
}

/// `paused_ms` of a `--json` reply.
fn paused_ms(json: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["paused_ms"].as_f64())
        .unwrap_or(f64::NAN)
}

/// An image taken while the VM runs on, with a copy of its disk of the
/// same instant: `cryo snapshot` or `cryo save --keep-running`.
struct Fork {
    /// Its scenario step (names figures and clock records).
    step: &'static str,
    /// The cryo verb and options, before `--api`, `--to`, `--disk-snapshot`.
    verb: &'static [&'static str],
    /// Files in the work directory: the image and the disk copy.
    image: &'static str,
    copy: &'static str,
    /// Where the restored guest opens its new TCP stream.
    port: u16,
}

const LIVE_SNAPSHOT: Fork = Fork {
    step: "rootfs-live-snapshot",
    verb: &["snapshot"],
    image: "snap.img",
    copy: "root-snap.ext4",
    port: 7779,
};
const KEEP_RUNNING_SAVE: Fork = Fork {
    step: "rootfs-save-keep-running",
    verb: &["save", "--keep-running", "--format", "fixed-ram"],
    image: "kept.img",
    copy: "root-kept.ext4",
    port: 7780,
};

/// The live snapshot, then (on the guest restored from it) a save with
/// `--keep-running`, each with `--disk-snapshot`; the last restored guest
/// shuts down and its disk copy checks clean on the host.
fn forks(
    setup: &Setup,
    vm: LinuxVm,
    guest: RootGuest,
    tally: &mut Tally,
) -> Result<String, Failure> {
    let (vm, stream, first) = fork(setup, vm, guest.stream, &guest.disk, &LIVE_SNAPSHOT, tally)?;
    let copy = setup.work.join("rootfs").join(LIVE_SNAPSHOT.copy);
    let (mut vm, _, second) = fork(setup, vm, stream, &copy, &KEEP_RUNNING_SAVE, tally)?;
    shut_down(&mut vm, "the last restored guest")?;
    let copy = setup.work.join("rootfs").join(KEEP_RUNNING_SAVE.copy);
    let (fsck, records) = host_checks(&vm, &copy)?;
    Ok(format!(
        "{first} | {second}; shut down, e2fsck -fn on its copy clean ({fsck}), {records} records read from it, every acknowledged one"
    ))
}

/// Takes `fork`'s image of `vm` (on `disk`) with `--disk-snapshot` while
/// the writer and the stream run: the source goes on (stream intact), then
/// shuts down cleanly, and its disk checks clean on the host with every
/// acknowledged record; the image restores onto the copy with every
/// record acknowledged before it and opens a new TCP stream (the old
/// connection's peer has seen data from after the image). Returns the
/// restored guest, its stream and the detail.
fn fork(
    setup: &Setup,
    mut vm: LinuxVm,
    mut stream: Stream,
    disk: &Path,
    fork: &Fork,
    tally: &mut Tally,
) -> Result<(LinuxVm, Stream, String), Failure> {
    let dir = setup.work.join("rootfs");
    let (image, copy) = (dir.join(fork.image), dir.join(fork.copy));
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    let start = vm.last.ok_or_else(|| Failure::of(&vm, "no heartbeat"))?;
    let acked_before = acked(&vm.guest.output());
    let mut args = strings(&["--json"]);
    args.extend(strings(fork.verb));
    args.extend(strings(&[
        "--api",
        &path_str(&vm.api),
        "--to",
        &path_str(&image),
    ]));
    args.extend(strings(&["--disk-snapshot", &path_str(&copy)]));
    let out =
        cryo_ok(&args, &format!("cryo {}", fork.verb.join(" "))).map_err(Failure::with_vm(&vm))?;
    let paused = paused_ms(&out);
    report::figure(&format!("{}_paused_ms", fork.step), paused, "ms");
    // The source runs on through it, its stream intact.
    stream_goes_on(&mut stream)
        .map_err(Failure::at(&vm, "the source's TCP stream after the image"))?;
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    shut_down(&mut vm, "the source")?;
    // The image is of an instant before the source's last heartbeat (it
    // ran on for two more after the command): the restored guest goes on
    // from between `start` and there. (The console is read lazily: `start`
    // may be a little older than the command, never newer.)
    let went_on_to = last_heartbeat(&vm.guest.output()).map_or(start.seq, |h| h.seq);
    let (source_fsck, source_records) = host_checks(&vm, disk)?;

    let mut restored = spawn_restore(&image, dir.join(format!("{}.sock", fork.step)));
    let range = start.seq + 1..=went_on_to;
    let beats = carries_on(&mut restored, fork.step, start, range, tally)?;
    restored
        .wait_line(BEAT_TIMEOUT, |l| rack(l).is_some_and(|n| n > acked_before))
        .map_err(Failure::at(&restored, "records after the restore"))?;
    let lines = disk_check(&mut restored, acked_before)?;
    let mut fresh = Stream::listen(fork.port)?;
    restored.type_line("kill $N")?;
    start_stream(&mut restored, fork.port)?;
    fresh
        .wait_for(LINES_AFTER, RECOVERY_TIMEOUT)
        .and_then(|()| fresh.check())
        .map_err(Failure::at(&restored, "a new TCP stream after the restore"))?;
    let _ = std::fs::remove_file(&image);
    let detail = format!(
        "{} with --disk-snapshot (paused {paused:.0} ms): the source ran on to heartbeat {went_on_to} with its stream intact, shut down, e2fsck -fn clean ({source_fsck}), {source_records} records read from its disk, every acknowledged one; restored onto the copy: {beats}; {lines} records on disk (>= {acked_before} acknowledged before the image), a new TCP stream, ping ok",
        fork.verb.join(" ")
    );
    Ok((restored, fresh, detail))
}

/// Stops the writer, remounts `/` read-only (the journal checkpointed,
/// the filesystem marked clean) and powers off; cryo must exit 0.
fn shut_down(vm: &mut LinuxVm, who: &str) -> Result<(), Failure> {
    vm.shell(
        "kill $W; sleep 1; sync; mount -o remount,ro / && echo RO-$((3*3))",
        "RO-9",
        BOOT_TIMEOUT,
    )
    .map_err(Failure::at(vm, "remounting / read-only"))?;
    vm.type_line("poweroff -f")?;
    match vm.wait_exit(EXIT_TIMEOUT)? {
        0 => Ok(()),
        code => Err(Failure::of(
            vm,
            format!("{who}: poweroff ended cryo with {code}"),
        )),
    }
}

/// Runs the host's e2fsprogs `tool` (nested: the copy the nested machine
/// carries) with `args`; returns its stdout, or the failure with its
/// output.
fn host_tool(tool: &str, args: &[&std::ffi::OsStr]) -> Result<String, Failure> {
    let candidates = [
        PathBuf::from("/").join(GUEST_TOOLS_DIR).join(tool),
        PathBuf::from("/usr/sbin").join(tool),
        PathBuf::from("/sbin").join(tool),
    ];
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Err(Failure::plain(format!(
            "no {tool} in {candidates:?}: install e2fsprogs"
        )));
    };
    let out = std::process::Command::new(path)
        .args(args)
        .output()
        .map_err(|e| Failure::plain(format!("{}: {e}", path.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let log = stdout
            .lines()
            .chain(String::from_utf8_lossy(&out.stderr).lines())
            .map(str::to_string)
            .collect();
        return Err(Failure {
            reason: format!("{tool} {args:?} exited {}", out.status),
            log,
        });
    }
    Ok(stdout)
}

/// After `vm` has shut down: the host's `e2fsck -fn` finds `image` clean,
/// and the record log read from it (`debugfs`) holds every record `vm`
/// (and so every VM before it) acknowledged. Returns e2fsck's summary and
/// the record count.
fn host_checks(vm: &LinuxVm, image: &Path) -> Result<(String, u64), Failure> {
    let fsck = host_tool("e2fsck", &["-fn".as_ref(), image.as_os_str()])?;
    // The summary ("LABEL: n/m files ..., n/m blocks") ends its stdout.
    let summary = fsck.lines().last().unwrap_or("").trim().to_string();
    let cat = "cat /var/rec.log";
    let log = host_tool("debugfs", &["-R".as_ref(), cat.as_ref(), image.as_os_str()])?;
    let acked = acked(&vm.guest.output());
    let records: Vec<&str> = log.lines().collect();
    let bad = records
        .iter()
        .zip(1u64..)
        .find(|(r, k)| **r != format!("REC {k:06}"));
    if bad.is_some() || (records.len() as u64) < acked {
        return Err(Failure::plain(format!(
            "{}: the record log has {} records, first wrong {bad:?}, {acked} acknowledged",
            image.display(),
            records.len()
        )));
    }
    Ok((summary, records.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_records_are_read_from_rack_lines() {
        let lines: Vec<String> = ["RACK 3", "HB seq=4 RACK 5", "echo RACK $i", "RACK 4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(rack("RACK 12"), Some(12));
        assert_eq!(rack("... echo RACK $i; sleep"), None);
        assert_eq!(acked(&lines), 5);
        assert_eq!(acked(&[]), 0);
    }
}
