//! Disk scenarios: a Linux guest with an ext4 filesystem on a virtio-blk
//! disk, written with fsync while it is saved; after the restore every
//! write the guest saw acknowledged is on the disk and `e2fsck` finds the
//! filesystem clean. Then the disk, changed by the restored guest, or
//! missing, is refused by a restore of the same image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_tests::run_cryo;

use crate::guest::{Failure, LinuxVm};
use crate::report;
use crate::scenarios::{cryo_ok, names, path_str, run_args, spawn_restore, strings, Setup, Tally};
use crate::scenarios::{BEAT_TIMEOUT, BOOT_TIMEOUT, EXIT_TIMEOUT};

/// Size of the guest's disk.
const DISK_BYTES: u64 = 96 << 20;
/// Acknowledged writes to see before the save (the echo of the typed
/// writer counts as one).
const ACKS_BEFORE_SAVE: usize = 9;
/// MiB each dd moves.
const DD_MIB: u64 = 32;
/// How long one dd may take.
const DD_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a restore that must be refused may take.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(60);

/// The background writer: each file is written with fsync, then announced
/// with its checksum (`ACK i md5`): an acknowledged write.
const WRITER: &str = "(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); \
dd if=/dev/urandom of=/mnt/w$i bs=4k count=4 conv=fsync 2>/dev/null && \
echo ACK $i $(md5sum /mnt/w$i | cut -c1-32); done) &";

/// Runs the disk scenarios.
pub fn disk_guest(setup: &Setup, tally: &mut Tally) {
    match fsync_save(setup) {
        Ok((detail, image, disk)) => {
            tally.pass(names::DISK_FSYNC_SAVE, &detail);
            tally.outcome(names::DISK_CHANGED_REFUSED, refusals(&image, &disk));
        }
        Err(f) => {
            tally.fail(names::DISK_FSYNC_SAVE, &f);
            tally.not_run(&[names::DISK_CHANGED_REFUSED], "the disk save failed");
        }
    }
    tally.outcome(names::DISK_SNAPSHOT_LIVE, live_disk_snapshot(setup));
}

/// `ACK i md5` / `HAVE i md5` lines of `lines`, by i.
fn checksums(lines: &[String], tag: &str) -> BTreeMap<u64, String> {
    let prefix = format!("{tag} ");
    lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            let mut words = rest.split_whitespace();
            let i = words.next()?.parse().ok()?;
            let sum = words.next()?;
            (sum.len() == 32).then(|| (i, sum.to_string()))
        })
        .collect()
}

/// Boots a one-vCPU guest with a disk `<tag>.raw` (sparse, or with
/// `filled` all data), makes ext4 of `fs_size` (mke2fs's size argument;
/// empty: the whole disk) on it and mounts it on /mnt. Returns the VM, its
/// API socket and the disk.
fn ext4_guest(
    setup: &Setup,
    tag: &str,
    fs_size: &str,
    filled: bool,
) -> Result<(LinuxVm, PathBuf, PathBuf), Failure> {
    let disk = setup.work.join(format!("{tag}.raw"));
    let made = match filled {
        true => std::fs::write(&disk, vec![0x5a; DISK_BYTES as usize]),
        false => std::fs::File::create(&disk).and_then(|f| f.set_len(DISK_BYTES)),
    };
    made.map_err(|e| Failure::plain(format!("cannot create {}: {e}", disk.display())))?;
    let api = setup.work.join(format!("{tag}-vm.sock"));
    let extra = strings(&["--api", &path_str(&api), "--disk", &path_str(&disk)]);
    let mut vm = LinuxVm::spawn(&run_args(setup, 1, &extra), api.clone());
    vm.wait_init(BOOT_TIMEOUT)?;
    vm.wait_shell(6, Duration::from_secs(10))?;
    // The workload's start keeps the guest busy; typing then can lose
    // input. Short commands, once it beats.
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    vm.shell(
        &format!("/opt/e2fsprogs/mke2fs -q -F -t ext4 /dev/vda {fs_size} && echo MKFS-$((4+4))"),
        "MKFS-8",
        BOOT_TIMEOUT,
    )
    .map_err(Failure::at(&vm, "mke2fs"))?;
    vm.shell(
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo MNT-$((4+5))",
        "MNT-9",
        BOOT_TIMEOUT,
    )
    .map_err(Failure::at(&vm, "mount"))?;
    Ok((vm, api, disk))
}

/// Starts the fsync writer and waits for [`ACKS_BEFORE_SAVE`] acknowledgements.
fn start_writer(vm: &mut LinuxVm) -> Result<(), Failure> {
    vm.type_line(WRITER)?;
    let mut acks = 0;
    vm.wait_line(BOOT_TIMEOUT, |l| {
        acks += usize::from(l.contains("ACK "));
        acks >= ACKS_BEFORE_SAVE
    })
    .map_err(Failure::at(vm, "fsync writes before the save"))?;
    Ok(())
}

/// In a restored guest: the writer carries on; then it is stopped, every
/// write in `acked` has its checksum, and `e2fsck -fn` finds the
/// filesystem clean.
fn check_restored(restored: &mut LinuxVm, acked: &BTreeMap<u64, String>) -> Result<(), Failure> {
    let last = *acked.keys().last().unwrap_or(&0);
    restored.heartbeats(2, BEAT_TIMEOUT)?;
    restored
        .wait_line(BEAT_TIMEOUT, |l| l.contains("ACK "))
        .map_err(Failure::at(restored, "fsync writes after the restore"))?;
    restored.shell(
        "kill $!; sleep 1; cd /; echo STOPPED-$((3+4))",
        "STOPPED-7",
        BEAT_TIMEOUT,
    )?;
    restored.shell(
        &format!(
            "for i in $(seq 1 {last}); do echo HAVE $i $(md5sum /mnt/w$i 2>&1 | cut -c1-32); done; echo HAVE-END-$((0+{last}))"
        ),
        &format!("HAVE-END-{last}"),
        BEAT_TIMEOUT,
    )?;
    let have = checksums(&restored.guest.output(), "HAVE");
    let lost: Vec<u64> = acked
        .iter()
        .filter(|(i, sum)| have.get(i) != Some(sum))
        .map(|(i, _)| *i)
        .collect();
    if !lost.is_empty() {
        return Err(Failure::of(
            restored,
            format!("acknowledged writes lost or changed after the restore: {lost:?}"),
        ));
    }
    restored.type_line(
        "umount /mnt && /opt/e2fsprogs/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1; echo FSCK-$((6*7))-RC-$?",
    )?;
    let fsck = restored
        .wait_line(BOOT_TIMEOUT, |l| l.contains("FSCK-42-RC-"))
        .map_err(Failure::at(restored, "e2fsck"))?;
    if !fsck.contains("FSCK-42-RC-0") {
        let _ = restored.type_line("cat /tmp/fsck.log");
        std::thread::sleep(Duration::from_secs(2));
        return Err(Failure::of(
            restored,
            format!("e2fsck found the filesystem unclean: {fsck}"),
        ));
    }
    Ok(())
}

/// Boots with a blank disk, makes ext4 on it, measures O_DIRECT dd, starts
/// the writer, saves, restores, and checks every acknowledged write and
/// the filesystem. Returns the detail, the image and the disk.
fn fsync_save(setup: &Setup) -> Result<(String, PathBuf, PathBuf), Failure> {
    let (mut vm, api, disk) = ext4_guest(setup, "disk", "", false)?;
    throughput(&mut vm).map_err(Failure::at(&vm, "dd"))?;
    start_writer(&mut vm)?;

    let image = setup.work.join("disk-vm.img");
    let started = Instant::now();
    cryo_ok(
        &strings(&["save", "--api", &path_str(&api), "--to", &path_str(&image)]),
        "cryo save",
    )?;
    report::figure("disk_save_ms", started.elapsed().as_millis(), "ms");
    let code = vm.wait_exit(EXIT_TIMEOUT)?;
    if code != 0 {
        return Err(Failure::of(&vm, format!("the saved VM exited {code}")));
    }
    let acked = checksums(&vm.guest.output(), "ACK");

    let api2 = setup.work.join("disk-vm2.sock");
    let mut restored = spawn_restore(&image, api2.clone());
    check_restored(&mut restored, &acked)?;
    cryo_ok(&strings(&["quit", "--api", &path_str(&api2)]), "cryo quit")?;
    restored.wait_exit(EXIT_TIMEOUT)?;
    Ok((
        format!(
            "{} writes acknowledged before the save, all on disk after the restore; e2fsck -fn clean",
            acked.len()
        ),
        image,
        disk,
    ))
}

/// The filesystem of `disk-snapshot-live` leaves the disk's last 32 MiB
/// alone; the guest rewrites this 4 KiB block there (its last MiB, which
/// the background copy reaches last: the disk is all data, no holes to
/// skip) all through the snapshot.
const TAIL_BLOCK: u64 = (DISK_BYTES - (512 << 10)) / 4096;

/// Rewrites [`TAIL_BLOCK`] with `SEQ n` (n = 1, 2, ...), each write direct
/// and flushed, then prints `TAILSEQ n`; its pid goes in `$T`.
fn tail_writer() -> String {
    format!(
        "(n=0; while true; do n=$((n+1)); printf 'SEQ %08d' $n | dd of=/dev/vda bs=4k seek={TAIL_BLOCK} conv=sync,notrunc,fsync oflag=direct 2>/dev/null && echo TAILSEQ $n; done) & T=$!"
    )
}

/// The number of the first `TAILSEQ n` line from `from` on.
fn tail_seq(line: &str) -> Option<u64> {
    let rest = &line[line.find("TAILSEQ ")? + 8..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The `SEQ n` in the tail block of `copy`.
fn copied_seq(copy: &Path) -> Result<u64, Failure> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 12];
    std::fs::File::open(copy)
        .and_then(|f| f.read_exact_at(&mut b, TAIL_BLOCK * 4096))
        .map_err(|e| Failure::plain(format!("reading the copy's tail block: {e}")))?;
    let text = String::from_utf8_lossy(&b);
    text.strip_prefix("SEQ ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| Failure::plain(format!("the copy's tail block holds {text:?}")))
}

/// A live snapshot with `--disk-snapshot` while the writer runs and the
/// guest rewrites a block the copy reaches last: the copy holds that
/// block as it was at the snapshot (copy-before-write), and the original
/// then writes a marker file; the snapshot restores onto the copy (no
/// --disk-changed-ok) with the block's writes following on from the copy's,
/// every write acknowledged before the snapshot, no marker, and a clean
/// filesystem.
fn live_disk_snapshot(setup: &Setup) -> Result<String, Failure> {
    let (mut vm, api, _disk) = ext4_guest(setup, "snapdisk", "64M", true)?;
    vm.type_line(&tail_writer())?;
    vm.wait_line(BEAT_TIMEOUT, |l| tail_seq(l) == Some(2))
        .map_err(Failure::at(&vm, "rewriting the tail block"))?;
    start_writer(&mut vm)?;
    let acked = checksums(&vm.guest.output(), "ACK");
    let image = setup.work.join("snapdisk-vm.img");
    let copy = setup.work.join("snapdisk-copy.raw");
    let out = cryo_ok(
        &strings(&[
            "--json",
            "snapshot",
            "--api",
            &path_str(&api),
            "--to",
            &path_str(&image),
            "--disk-snapshot",
            &path_str(&copy),
        ]),
        "cryo snapshot --disk-snapshot",
    )?;
    let stats: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| Failure::plain(format!("snapshot output is not JSON ({e}): {out}")))?;
    let disk = &stats["disks"][0];
    let before_write = disk["chunks_before_write"].as_u64().unwrap_or(0);
    report::figure(
        "disk_snapshot_chunks_before_write_nested",
        before_write,
        "chunks",
    );
    let paused = stats["paused_ms"].as_f64().unwrap_or(0.0);
    report::figure("disk_snapshot_paused_ms_nested", paused, "ms");
    let copy_ms = disk["copy_ms"].as_f64().unwrap_or(0.0);
    report::figure("disk_snapshot_copy_ms_nested", copy_ms, "ms");
    let written_by_then = vm.guest.output().iter().filter_map(|l| tail_seq(l)).max();
    let in_copy = copied_seq(&copy)?;
    // Written after the snapshot: in the original, never in the snapshot.
    vm.shell(
        "echo late > /mnt/after-snapshot && sync && echo LATE-$((2*4))",
        "LATE-8",
        BEAT_TIMEOUT,
    )?;
    cryo_ok(&strings(&["quit", "--api", &path_str(&api)]), "cryo quit")?;
    vm.wait_exit(EXIT_TIMEOUT)?;

    let api2 = setup.work.join("snapdisk-vm2.sock");
    let mut restored = spawn_restore(&image, api2.clone());
    // The restored guest's next tail write follows the one in the copy.
    let next = restored
        .wait_line(BEAT_TIMEOUT, |l| tail_seq(l).is_some())
        .map_err(Failure::at(&restored, "tail writes after the restore"))?;
    let next = tail_seq(&next).unwrap_or(0);
    if in_copy + 2 < next || in_copy > next {
        return Err(Failure::of(
            &restored,
            format!("the copy's tail block is write {in_copy}, but the restored guest goes on with write {next} (the original had reached {written_by_then:?} when the snapshot ended)"),
        ));
    }
    restored.heartbeats(2, BEAT_TIMEOUT)?;
    restored.shell(
        "kill $T; echo UNTOUCHED-$((5*5))",
        "UNTOUCHED-25",
        BEAT_TIMEOUT,
    )?;
    restored
        .type_line("test -e /mnt/after-snapshot && echo MARKER-$((1+2)) || echo MARKER-$((2+2))")?;
    let marker = restored
        .wait_line(BEAT_TIMEOUT, |l| {
            l.contains("MARKER-3") || l.contains("MARKER-4")
        })
        .map_err(Failure::at(
            &restored,
            "the file written after the snapshot",
        ))?;
    if marker.contains("MARKER-3") {
        return Err(Failure::of(
            &restored,
            "a file written after the snapshot is in the snapshot's disk",
        ));
    }
    check_restored(&mut restored, &acked)?;
    cryo_ok(&strings(&["quit", "--api", &path_str(&api2)]), "cryo quit")?;
    restored.wait_exit(EXIT_TIMEOUT)?;
    // Whether a guest write reached the block before the copy did depends
    // on timing (the copy is fast); the unit tests check that path every
    // time. Say which happened.
    let path = match before_write {
        0 => "copy-before-write not exercised this run: the copy reached the block first",
        _ => "copy-before-write exercised",
    };
    Ok(format!(
        "{} writes acknowledged before the snapshot all in the restored copy, the file written after it absent, e2fsck -fn clean; tail block: write {in_copy} in the copy, the restored guest goes on with {next}, the original reached {written_by_then:?} by the snapshot's end; {} chunks copied before guest writes ({path}), copy {:.0} ms ({})",
        acked.len(),
        before_write,
        copy_ms,
        disk["method"].as_str().unwrap_or("?"),
    ))
}

/// Guest `dd` of [`DD_MIB`] MiB onto a file of the ext4 filesystem
/// (O_DIRECT write and read, and a buffered write with fsync), timed with
/// the guest's uptime; reports the rates in MiB/s (nested: the guest runs
/// under cryo inside QEMU TCG, on a disk file in the nested machine's
/// tmpfs). A dd that fails is reported, not fatal.
fn throughput(vm: &mut LinuxVm) -> Result<(), Failure> {
    let count = DD_MIB * 16;
    for (what, dd) in [
        (
            "direct_write",
            format!("dd if=/dev/zero of=/mnt/bench bs=64k count={count} oflag=direct"),
        ),
        (
            "direct_read",
            "dd if=/mnt/bench of=/dev/null bs=64k iflag=direct".to_string(),
        ),
        (
            "fsync_write",
            format!("dd if=/dev/zero of=/mnt/bench2 bs=64k count={count} conv=fsync"),
        ),
    ] {
        vm.type_line(&format!(
            "s=$(cut -d' ' -f1 /proc/uptime); {dd} 2>/tmp/dd.err; r=$?; e=$(cut -d' ' -f1 /proc/uptime); echo DDW-$((1+1))-{what} rc=$r start=$s end=$e"
        ))?;
        let tag = format!("DDW-2-{what} ");
        let line = vm.wait_line(DD_TIMEOUT, |l| l.contains(&tag))?;
        let secs = |key| cryo_tests::field(&line, key).and_then(|v| v.parse::<f64>().ok());
        let value = match (cryo_tests::field(&line, "rc"), secs("start"), secs("end")) {
            (Some("0"), Some(s), Some(e)) if e > s => format!("{:.1}", DD_MIB as f64 / (e - s)),
            _ => format!("failed:{}", line.trim().replace(' ', "_")),
        };
        report::figure(&format!("disk_dd_{what}_nested"), value, "MiB/s");
    }
    vm.shell(
        "rm -f /mnt/bench /mnt/bench2 && echo RM-$((5+5))",
        "RM-10",
        BEAT_TIMEOUT,
    )
}

/// The disk changed since the save (the restored guest wrote to it), then
/// missing: both restores of the image are refused with a clear error.
fn refusals(image: &Path, disk: &Path) -> Result<String, Failure> {
    let restore = ["restore", "--from", &path_str(image)];
    let (code, _, err) = run_cryo(&restore, REFUSAL_TIMEOUT);
    if code != Some(2) || !err.contains("changed since the save") {
        return Err(Failure::plain(format!(
            "a restore onto the changed disk gave {code:?}: {}",
            err.trim()
        )));
    }
    let moved = disk.with_extension("moved");
    std::fs::rename(disk, &moved)
        .map_err(|e| Failure::plain(format!("cannot move the disk away: {e}")))?;
    let (code2, _, err2) = run_cryo(
        &[&restore[..], &["--disk-changed-ok"]].concat(),
        REFUSAL_TIMEOUT,
    );
    let _ = std::fs::remove_file(&moved);
    let _ = std::fs::remove_file(image);
    if code2 != Some(2) || !err2.contains("disk.raw") {
        return Err(Failure::plain(format!(
            "a restore with the disk missing gave {code2:?}: {}",
            err2.trim()
        )));
    }
    Ok(format!(
        "changed disk refused ({}); missing disk refused even with --disk-changed-ok ({})",
        err.trim(),
        err2.trim()
    ))
}
