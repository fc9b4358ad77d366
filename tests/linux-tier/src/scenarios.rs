//! The scenarios: what the driver does with cryo and a Linux guest, and
//! what it checks. Each one ends in a RESULT line (see [`crate::report`]).
//!
//! Two guests carry them, so that the slow part (a boot) happens twice only:
//!
//! 1. A one-vCPU guest started by name (`cryo run --name`): boot to user
//!    space, the interactive shell through cryo's stdin, then a managed
//!    save and the `cryo run --name` that brings it back, the shell again,
//!    and a guest-initiated reboot that ends cryo with status 0.
//! 2. A two-vCPU guest: boot and its boot log, then a chain in which each
//!    step saves the running guest one way and restores it in a new cryo
//!    process: stream, fixed-ram eager, fixed-ram lazy, multifd, a stopped
//!    migration over a unix socket, and a live snapshot that is restored
//!    after the source has gone on running and been stopped.
//!
//! A third guest, with an ext4 filesystem on a virtio-blk disk, carries the
//! disk scenarios (`crate::disk_scenarios`), a fourth, with virtio-net
//! on a host tap, the network scenarios (`crate::net_scenarios`), and a
//! fifth, whose root filesystem is on virtio-blk and whose network is on a
//! tap, goes through every save mode (`crate::rootfs_scenarios`).
//!
//! After every restore the workload must carry on: the next heartbeat
//! number, no `MISMATCH`, no new `INIT` (no reboot), timers that keep
//! firing, and clocks that never go back and move together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryo_tests::run_cryo;

use crate::boot_log;
use crate::guest::{
    last_heartbeat, tail, Failure, Heartbeat, LinuxVm, CMDLINE, MEM_MIB, NESTED_CMDLINE_EXTRA,
    STDERR_TAIL,
};
use crate::report;

/// Scenario names, as the RESULT lines and the harness's tests use them.
pub mod names {
    /// Boot with one vCPU to the workload.
    pub const BOOT_1VCPU: &str = "boot-1vcpu";
    /// Boot with two vCPUs to the workload.
    pub const BOOT_2VCPUS: &str = "boot-2vcpus";
    /// Boot the compressed bzImage (not the ELF vmlinux) to the workload.
    pub const BOOT_BZIMAGE: &str = "boot-bzimage";
    /// No unexpected warning in the boot log.
    pub const BOOT_LOG: &str = "boot-log";
    /// A busybox shell driven through cryo's stdin.
    pub const CONSOLE_SHELL: &str = "console-shell";
    /// Managed save and the run that restores it.
    pub const MANAGED_SAVE: &str = "managed-save";
    /// Stream format save and restore.
    pub const SAVE_STREAM: &str = "save-stream";
    /// Fixed-ram save, eager restore.
    pub const SAVE_FIXED_EAGER: &str = "save-fixed-ram-eager";
    /// Fixed-ram save, lazy restore.
    pub const SAVE_FIXED_LAZY: &str = "save-fixed-ram-lazy";
    /// Fixed-ram save and restore through two multifd channels.
    pub const SAVE_MULTIFD: &str = "save-multifd";
    /// Stopped migration over a unix socket.
    pub const MIGRATE_UNIX: &str = "migrate-unix";
    /// Live snapshot while the workload writes, then its restore.
    pub const LIVE_SNAPSHOT: &str = "live-snapshot";
    /// Clocks and timers across every restore.
    pub const TIMEKEEPING: &str = "timekeeping";
    /// `cryo pause`, a wait, `cryo resume`: the guest sees the gap.
    pub const PAUSE_RESUME: &str = "pause-resume";
    /// ext4 on virtio-blk written with fsync while saved: every
    /// acknowledged write there after the restore, e2fsck clean.
    pub const DISK_FSYNC_SAVE: &str = "disk-fsync-save";
    /// A changed or missing disk refused at restore.
    pub const DISK_CHANGED_REFUSED: &str = "disk-changed-refused";
    /// A TCP stream over virtio-net and a tap, intact across a stopped
    /// save and a restore reattached to the same tap.
    pub const NET_TCP_SAVE_RESTORE: &str = "net-tcp-save-restore";
    /// Ping both ways across a live snapshot.
    pub const NET_PING_LIVE_SNAPSHOT: &str = "net-ping-live-snapshot";
    /// A live snapshot with `--disk-snapshot` while ext4 is written: the
    /// restore uses the copy, as it was at the snapshot.
    pub const DISK_SNAPSHOT_LIVE: &str = "disk-snapshot-live";
    /// A guest whose root filesystem is ext4 on virtio-blk boots, with its
    /// network on a tap.
    pub const ROOTFS_BOOT: &str = "rootfs-boot";
    /// That guest through every save mode in turn, its disk and network
    /// checked after each restore, and its root filesystem clean at the end.
    pub const ROOTFS_EVERY_SAVE: &str = "rootfs-every-save";
}

/// The one-vCPU guest started by name, and the bzImage boot
/// (`CRYO_LINUX_TIER_ONLY=boot`).
const BOOT: &[&str] = &[
    names::BOOT_1VCPU,
    names::CONSOLE_SHELL,
    names::MANAGED_SAVE,
    names::BOOT_BZIMAGE,
];
/// The two-vCPU guest and its chain of saves, and the clocks across every
/// restore of the run (`CRYO_LINUX_TIER_ONLY=chain`).
const CHAIN: &[&str] = &[
    names::BOOT_2VCPUS,
    names::BOOT_LOG,
    names::PAUSE_RESUME,
    names::SAVE_STREAM,
    names::SAVE_FIXED_EAGER,
    names::SAVE_FIXED_LAZY,
    names::SAVE_MULTIFD,
    names::MIGRATE_UNIX,
    names::LIVE_SNAPSHOT,
    names::TIMEKEEPING,
];
/// The disk scenarios (`CRYO_LINUX_TIER_ONLY=disk`).
const DISK: &[&str] = &[
    names::DISK_FSYNC_SAVE,
    names::DISK_CHANGED_REFUSED,
    names::DISK_SNAPSHOT_LIVE,
];
/// The network scenarios (`CRYO_LINUX_TIER_ONLY=net`).
const NET: &[&str] = &[names::NET_TCP_SAVE_RESTORE, names::NET_PING_LIVE_SNAPSHOT];
/// The root-on-disk scenarios (`CRYO_LINUX_TIER_ONLY=rootfs`).
const ROOTFS: &[&str] = &[names::ROOTFS_BOOT, names::ROOTFS_EVERY_SAVE];

/// A set of scenarios that one part of the driver runs, alone if need be.
pub(crate) struct ScenarioSet {
    /// Its name for [`ONLY_VAR`].
    pub(crate) name: &'static str,
    /// Its scenarios.
    pub(crate) scenarios: &'static [&'static str],
    /// Runs them.
    run: fn(&Setup, &mut Tally),
}

/// Every set, in the order the driver runs them. A nested run that leaves
/// scenarios not passed is followed by one of their sets only.
pub(crate) const SETS: &[ScenarioSet] = &[
    ScenarioSet {
        name: "boot",
        scenarios: BOOT,
        run: boot_guests,
    },
    ScenarioSet {
        name: "chain",
        scenarios: CHAIN,
        run: chain_guest,
    },
    ScenarioSet {
        name: "disk",
        scenarios: DISK,
        run: crate::disk_scenarios::disk_guest,
    },
    ScenarioSet {
        name: "net",
        scenarios: NET,
        run: crate::net_scenarios::net_guest,
    },
    ScenarioSet {
        name: "rootfs",
        scenarios: ROOTFS,
        run: crate::rootfs_scenarios::rootfs_guest,
    },
];

/// The sets this run carries: those [`ONLY_VAR`] names, or all.
fn selected_sets() -> Vec<&'static ScenarioSet> {
    let only = std::env::var(ONLY_VAR).unwrap_or_default();
    let named: Vec<&ScenarioSet> = SETS
        .iter()
        .filter(|s| only.split(',').any(|w| w == s.name))
        .collect();
    if named.is_empty() {
        SETS.iter().collect()
    } else {
        named
    }
}

/// The scenarios this run carries: those of the sets [`ONLY_VAR`] names,
/// or all.
pub fn selected() -> Vec<&'static str> {
    selected_sets()
        .into_iter()
        .flat_map(|s| s.scenarios.iter().copied())
        .collect()
}

/// The names of the sets that hold any of `scenarios`, as [`ONLY_VAR`]
/// takes them.
pub fn sets_of(scenarios: &[&str]) -> String {
    let sets: Vec<&str> = SETS
        .iter()
        .filter(|s| s.scenarios.iter().any(|n| scenarios.contains(n)))
        .map(|s| s.name)
        .collect();
    sets.join(",")
}

/// A boot takes 3-20 s of wall time nested; one that takes longer has
/// stalled (see the nested-run notes in `lib.rs`).
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const BEAT_TIMEOUT: Duration = Duration::from_secs(60);
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeats each check waits for.
const BEATS: usize = 4;
/// How far the guest's monotonic clock may run ahead of the host's wall
/// clock across a restore (both are read by the driver, at line arrival).
const CLOCK_SLACK_MS: i128 = 2000;
/// Largest difference between the realtime and monotonic steps.
const CLOCK_SKEW_MS: i128 = 1000;

/// What the driver needs: the kernel, the guest's initramfs, a scratch
/// directory (tmpfs when nested).
#[derive(Clone)]
pub struct Setup {
    /// The Debian cloud kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// cryo's Linux guest initramfs.
    pub initrd: PathBuf,
    /// The root-on-disk guest's boot initramfs.
    pub root_initrd: PathBuf,
    /// The root-on-disk guest's root filesystem (ext4); copied before use.
    pub rootfs: PathBuf,
    /// Where images, sockets and state directories go.
    pub work: PathBuf,
    /// Whether the driver runs nested under QEMU's TCG emulator (some boot
    /// warnings are expected only there).
    pub nested: bool,
}

/// How the clocks moved across one restore.
struct ClockRecord {
    step: &'static str,
    mono_gap_ms: i128,
    real_gap_ms: i128,
    host_gap_ms: i128,
    problem: Option<String>,
}

/// The driver's running tally.
#[derive(Default)]
pub(crate) struct Tally {
    /// Scenarios that passed in some attempt of their set.
    passed: BTreeSet<String>,
    /// Scenarios that failed, with the reason of their latest failure.
    failed: BTreeMap<String, String>,
    clocks: Vec<ClockRecord>,
}

impl Tally {
    pub(crate) fn pass(&mut self, scenario: &str, detail: &str) {
        self.passed.insert(scenario.to_string());
        report::result(scenario, true, detail);
    }

    pub(crate) fn fail(&mut self, scenario: &str, failure: &Failure) {
        self.failed
            .insert(scenario.to_string(), failure.reason.clone());
        report::log(scenario, &failure.log);
        report::result(scenario, false, &failure.reason);
    }

    /// How many scenarios failed and did not pass in another attempt.
    fn still_failed(&self) -> usize {
        self.failed
            .keys()
            .filter(|s| !self.passed.contains(*s))
            .count()
    }

    pub(crate) fn outcome(&mut self, scenario: &str, result: Result<String, Failure>) -> bool {
        match result {
            Ok(detail) => {
                self.pass(scenario, &detail);
                true
            }
            Err(f) => {
                self.fail(scenario, &f);
                false
            }
        }
    }

    pub(crate) fn not_run(&mut self, scenarios: &[&str], because: &str) {
        for s in scenarios {
            self.fail(s, &Failure::plain(format!("not run: {because}")));
        }
    }

    /// Like [`Tally::not_run`], with the failure that stopped them: its
    /// reason and log go with each (a later nested run may pass the
    /// scenario that failed, and its log would then be lost from the
    /// report, while these still fail).
    pub(crate) fn not_run_after(&mut self, scenarios: &[&str], because: &str, cause: &Failure) {
        for s in scenarios {
            let failure = Failure {
                reason: format!("not run: {because}: {}", cause.reason),
                log: cause.log.clone(),
            };
            self.fail(s, &failure);
        }
    }
}

/// With this environment variable set to set names (`boot`, `chain`,
/// `disk`, `net`, `rootfs`, comma-separated), the driver runs those sets
/// only (a shortcut while working on them, and what a nested retry does;
/// the scenarios of the other sets then report nothing and their tests
/// fail).
pub const ONLY_VAR: &str = "CRYO_LINUX_TIER_ONLY";

/// How many times one driver run may run a set. A set some of whose
/// scenarios failed runs once more, with fresh guests in a fresh work
/// directory: under TCG a guest stalls now and then with no save involved
/// (see the nested-run notes in `lib.rs`), and running the set again costs
/// a few minutes where a new nested run costs all of its boot and sets.
/// A scenario passes if it passed in either attempt; a first failure stays
/// in the output (its FAIL and LOG lines, and a RETRY line with its
/// reason), so that a flake is seen even when the retry passed.
const SET_ATTEMPTS: usize = 2;

/// Scenarios that a set lists but the driver reports after every set
/// (from the records of the set attempts kept).
const AFTER_EVERY_SET: &[&str] = &[names::TIMEKEEPING];

/// Runs every selected scenario; returns how many failed.
pub fn run_all(setup: &Setup) -> usize {
    let mut tally = Tally::default();
    for set in selected_sets() {
        run_set(setup, set, &mut tally);
    }
    // After every set: the clocks across every restore of the run.
    if selected().contains(&names::TIMEKEEPING) {
        report_clocks(&mut tally);
    }
    tally.still_failed()
}

/// Runs `set` up to [`SET_ATTEMPTS`] times, until each of its scenarios
/// passed in some attempt.
fn run_set(setup: &Setup, set: &ScenarioSet, tally: &mut Tally) {
    let mut setup = setup.clone();
    for attempt in 1..=SET_ATTEMPTS {
        let clocks_before = tally.clocks.len();
        (set.run)(&setup, tally);
        let failed: Vec<&str> = set
            .scenarios
            .iter()
            .copied()
            .filter(|s| !AFTER_EVERY_SET.contains(s) && !tally.passed.contains(*s))
            .collect();
        if failed.is_empty() || attempt == SET_ATTEMPTS {
            return;
        }
        for scenario in &failed {
            let reason = tally.failed.get(*scenario).map_or("", String::as_str);
            report::retry(scenario, attempt, reason);
        }
        // The failed attempt's restores do not count for the clocks.
        tally.clocks.truncate(clocks_before);
        setup.work = setup
            .work
            .join(format!("{}-attempt{}", set.name, attempt + 1));
        if let Err(e) = std::fs::create_dir_all(&setup.work) {
            let failure = Failure::plain(format!("{}: {e}", setup.work.display()));
            tally.not_run_after(&failed, "no work directory for the retry", &failure);
            return;
        }
    }
}

/// The `boot` set: the one-vCPU guest started by name, and the bzImage.
fn boot_guests(setup: &Setup, tally: &mut Tally) {
    single_vcpu_guest(setup, tally);
    let bzimage = bzimage_boot(setup);
    tally.outcome(names::BOOT_BZIMAGE, bzimage);
}

/// The `chain` set: the two-vCPU guest's chain (`timekeeping`, reported
/// after every set, covers the restores of all that ran).
fn chain_guest(setup: &Setup, tally: &mut Tally) {
    two_vcpu_chain(setup, tally);
}

pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn path_str(p: &Path) -> String {
    p.display().to_string()
}

pub(crate) fn run_args(setup: &Setup, vcpus: u32, extra: &[String]) -> Vec<String> {
    run_kernel_args(&setup.kernel, &setup.initrd, setup, vcpus, extra)
}

/// `cryo run` of `kernel` with `initrd` and the tier's command line.
pub(crate) fn run_kernel_args(
    kernel: &Path,
    initrd: &Path,
    setup: &Setup,
    vcpus: u32,
    extra: &[String],
) -> Vec<String> {
    let mut args = strings(&["run", "--kernel"]);
    args.push(path_str(kernel));
    args.extend(strings(&["--initrd"]));
    args.push(path_str(initrd));
    args.extend(strings(&["--mem-mib", &MEM_MIB.to_string()]));
    let cmdline = if setup.nested {
        format!("{CMDLINE} {NESTED_CMDLINE_EXTRA}")
    } else {
        CMDLINE.to_string()
    };
    args.extend(strings(&[
        "--vcpus",
        &vcpus.to_string(),
        "--cmdline",
        &cmdline,
    ]));
    args.extend(extra.iter().cloned());
    args
}

/// Boots and checks the INIT line and the first heartbeats.
fn boot(vm: &mut LinuxVm, vcpus: u32, figure: &str) -> Result<String, Failure> {
    let started = Instant::now();
    let init = vm.wait_init(BOOT_TIMEOUT)?;
    report::figure(figure, started.elapsed().as_millis(), "ms");
    if let Some(uptime) = cryo_tests::field(&init, "uptime") {
        report::figure(&format!("{figure}_guest_uptime"), uptime, "s");
    }
    if cryo_tests::num(&init, "cpus") != Some(u64::from(vcpus)) {
        return Err(Failure::of(vm, format!("expected {vcpus} cpus: {init}")));
    }
    if cryo_tests::field(&init, "rtc") != Some("rtc_cmos") {
        return Err(Failure::of(vm, format!("the RTC did not probe: {init}")));
    }
    let beats = vm.heartbeats(BEATS, BEAT_TIMEOUT)?;
    Ok(format!(
        "{vcpus} cpus, rtc_cmos, heartbeats {}..{} in {:.1}s",
        beats[0].seq,
        beats[beats.len() - 1].seq,
        started.elapsed().as_secs_f64()
    ))
}

/// `cryo restore --from IMAGE --api API` in a new process.
pub(crate) fn spawn_restore(image: &Path, api: PathBuf) -> LinuxVm {
    let args = strings(&[
        "restore",
        "--from",
        &path_str(image),
        "--api",
        &path_str(&api),
    ]);
    LinuxVm::spawn(&args, api)
}

pub(crate) fn cryo_ok(args: &[String], what: &str) -> Result<String, Failure> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_cryo(&refs, SAVE_TIMEOUT);
    if code == Some(0) {
        Ok(out)
    } else {
        let err_lines: Vec<&str> = err.lines().collect();
        let out_lines: Vec<&str> = out.lines().collect();
        let last = |lines: &[&str]| lines.last().copied().unwrap_or_default().to_string();
        let mut log = vec![format!(
            "--- {what}: stdout, last of {} lines ---",
            out_lines.len()
        )];
        log.extend(tail(&out_lines, STDERR_TAIL).iter().map(|l| l.to_string()));
        log.push(format!(
            "--- {what}: stderr, last of {} lines ---",
            err_lines.len()
        ));
        log.extend(tail(&err_lines, STDERR_TAIL).iter().map(|l| l.to_string()));
        Err(Failure {
            reason: format!("{what} exited {code:?}: {}", last(&err_lines)),
            log,
        })
    }
}

/// `cryo snapshot --api API --to IMAGE`: a live snapshot of a running VM.
pub(crate) fn take_snapshot(api: &Path, image: &Path) -> Result<String, Failure> {
    cryo_ok(
        &strings(&[
            "snapshot",
            "--api",
            &path_str(api),
            "--to",
            &path_str(image),
        ]),
        "cryo snapshot",
    )
}

/// Waits for a restored guest's first heartbeat, checks that it carries on
/// from `before` (sequence within `seq_range`, clocks sane), then for more
/// heartbeats (timers keep firing).
pub(crate) fn carries_on(
    vm: &mut LinuxVm,
    step: &'static str,
    before: Heartbeat,
    seq_range: std::ops::RangeInclusive<u64>,
    tally: &mut Tally,
) -> Result<String, Failure> {
    let first = vm.heartbeats(1, BEAT_TIMEOUT)?[0];
    if !seq_range.contains(&first.seq) {
        return Err(Failure::of(
            vm,
            format!(
                "first heartbeat after restore is {}, expected {}..={} (last before: {})",
                first.seq,
                seq_range.start(),
                seq_range.end(),
                before.seq
            ),
        ));
    }
    tally.clocks.push(clock_record(step, before, first));
    let more = vm.heartbeats(BEATS - 1, BEAT_TIMEOUT)?;
    Ok(format!(
        "heartbeats {} -> {}..{}, workload clean",
        before.seq,
        first.seq,
        more[more.len() - 1].seq
    ))
}

fn clock_record(step: &'static str, before: Heartbeat, after: Heartbeat) -> ClockRecord {
    let mono_gap_ms = (after.mono_ns - before.mono_ns) / 1_000_000;
    let real_gap_ms = (after.real_ns - before.real_ns) / 1_000_000;
    let host_gap_ms = after.seen.duration_since(before.seen).as_millis() as i128;
    let problem = if after.mono_ns <= before.mono_ns {
        Some("monotonic time went back".to_string())
    } else if mono_gap_ms > host_gap_ms + CLOCK_SLACK_MS {
        Some(format!(
            "monotonic time moved {mono_gap_ms} ms while {host_gap_ms} ms passed on the host"
        ))
    } else if (real_gap_ms - mono_gap_ms).abs() > CLOCK_SKEW_MS {
        Some(format!(
            "realtime moved {real_gap_ms} ms but monotonic {mono_gap_ms} ms"
        ))
    } else {
        None
    };
    ClockRecord {
        step,
        mono_gap_ms,
        real_gap_ms,
        host_gap_ms,
        problem,
    }
}

fn report_clocks(tally: &mut Tally) {
    if tally.clocks.is_empty() {
        tally.not_run(
            &[names::TIMEKEEPING],
            "no restore got as far as a heartbeat",
        );
        return;
    }
    let summary: Vec<String> = tally
        .clocks
        .iter()
        .map(|c| {
            format!(
                "{}: mono +{} ms, real +{} ms, host +{} ms{}",
                c.step,
                c.mono_gap_ms,
                c.real_gap_ms,
                c.host_gap_ms,
                c.problem
                    .as_ref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let problems = tally.clocks.iter().filter(|c| c.problem.is_some()).count();
    let detail = format!("{} restores; {}", tally.clocks.len(), summary.join("; "));
    if problems == 0 {
        tally.pass(names::TIMEKEEPING, &detail);
    } else {
        tally.fail(names::TIMEKEEPING, &Failure::plain(detail));
    }
}

/// Bytes of the long line the console-shell scenario types.
const LONG_LINE: usize = 700;

/// The one-vCPU guest: boot, shell, managed save, run by name again.
fn single_vcpu_guest(setup: &Setup, tally: &mut Tally) {
    let state = setup.work.join("state");
    let name = "linux1";
    let api = state.join(name).join("api.sock");
    let by_name = strings(&["--name", name, "--state-dir", &path_str(&state)]);
    let mut vm = LinuxVm::spawn(&run_args(setup, 1, &by_name), api.clone());
    if !tally.outcome(names::BOOT_1VCPU, boot(&mut vm, 1, "boot_to_init_1vcpu")) {
        tally.not_run(
            &[names::CONSOLE_SHELL, names::MANAGED_SAVE],
            "the boot failed",
        );
        return;
    }
    // A line longer than the guest driver reads per interrupt (Linux's
    // 8250 takes 256 bytes at a time) must arrive whole: the shell counts
    // what it got and answers in a short line (a long answer line is not
    // needed, and the workload's chatter makes its own echo long).
    let long_line = format!("x={}; echo LEN-${{#x}}-$((20+22))", "x".repeat(LONG_LINE));
    let typed = vm
        .shell("echo SHELL-$((6*7))", "SHELL-42", BEAT_TIMEOUT)
        .and_then(|()| vm.shell(&long_line, &format!("LEN-{LONG_LINE}-42"), BEAT_TIMEOUT));
    if let Err(f) = typed {
        tally.fail(names::CONSOLE_SHELL, &f);
        tally.not_run_after(&[names::MANAGED_SAVE], "the shell did not answer", &f);
        return;
    }
    let result = managed_save_and_back(setup, vm, &by_name, api, tally);
    match result {
        Ok((detail, shell_after)) => {
            tally.pass(names::MANAGED_SAVE, &detail);
            tally.outcome(
                names::CONSOLE_SHELL,
                shell_after.map(|()| {
                    format!("typed commands answered (one of {} bytes, all of which reached the shell) before and after a managed save; `reboot -f` ended cryo with 0", long_line.len())
                }),
            );
        }
        Err(f) => {
            tally.fail(names::MANAGED_SAVE, &f);
            tally.not_run_after(&[names::CONSOLE_SHELL], "the managed save failed", &f);
        }
    }
}

/// Boots the bzImage (the kernel's own decompressor runs first), then
/// powers the guest off from its shell (ACPI S5).
fn bzimage_boot(setup: &Setup) -> Result<String, Failure> {
    let api = setup.work.join("bzimage.sock");
    let args = run_kernel_args(
        &setup.bzimage,
        &setup.initrd,
        setup,
        1,
        &strings(&["--api", &path_str(&api)]),
    );
    let mut vm = LinuxVm::spawn(&args, api);
    let detail = boot(&mut vm, 1, "boot_to_init_bzimage")?;
    vm.guest
        .send("poweroff -f\n")
        .map_err(|e| Failure::of(&vm, format!("cannot type poweroff: {e}")))?;
    match vm.wait_exit(EXIT_TIMEOUT)? {
        0 => Ok(format!("{detail}; `poweroff -f` ended cryo with 0")),
        code => Err(Failure::of(&vm, format!("poweroff ended cryo with {code}"))),
    }
}

/// Managed save of `vm`, then `cryo run --name` again. Returns the managed
/// save's detail and how the shell did after it.
fn managed_save_and_back(
    setup: &Setup,
    mut vm: LinuxVm,
    by_name: &[String],
    api: PathBuf,
    tally: &mut Tally,
) -> Result<(String, Result<(), Failure>), Failure> {
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    cryo_ok(
        &strings(&["managed-save", "--api", &path_str(&api)]),
        "cryo managed-save",
    )?;
    let code = vm.wait_exit(EXIT_TIMEOUT)?;
    if code != 0 {
        return Err(Failure::of(&vm, format!("the saved VM exited {code}")));
    }
    let before = last_heartbeat(&vm.guest.output())
        .ok_or_else(|| Failure::of(&vm, "no heartbeat before the managed save"))?;
    let mut back = LinuxVm::spawn(&run_args(setup, 1, by_name), api);
    let detail = carries_on(
        &mut back,
        names::MANAGED_SAVE,
        before,
        before.seq + 1..=before.seq + 2,
        tally,
    )?;
    let shell_after = back
        .shell("echo AFTER-$((7*8))", "AFTER-56", BEAT_TIMEOUT)
        .and_then(|()| {
            back.guest
                .send("reboot -f\n")
                .map_err(|e| Failure::plain(format!("cannot type reboot: {e}")))?;
            match back.wait_exit(EXIT_TIMEOUT)? {
                0 => Ok(()),
                code => Err(Failure::of(&back, format!("reboot ended cryo with {code}"))),
            }
        });
    Ok((
        format!(
            "`cryo run --name` restored it: {detail}; {}",
            clock_note(tally)
        ),
        shell_after,
    ))
}

fn clock_note(tally: &Tally) -> String {
    tally
        .clocks
        .last()
        .map(|c| format!("mono +{} ms over host +{} ms", c.mono_gap_ms, c.host_gap_ms))
        .unwrap_or_default()
}

/// One stopped save (file or socket) and its restore.
pub(crate) struct SaveStep {
    /// The scenario (or step) it belongs to: names its figures.
    pub(crate) scenario: &'static str,
    /// The cryo command that saves: `save` (the VM stops, or with `--live`
    /// pauses only for the last round) or `migrate` (live, to a peer).
    pub(crate) verb: &'static str,
    /// Its options.
    pub(crate) save: &'static [&'static str],
    /// `cryo restore` options.
    pub(crate) restore: &'static [&'static str],
    /// Saves to a unix socket that the restoring process listens on.
    pub(crate) over_socket: bool,
}

const SAVE_STEPS: &[SaveStep] = &[
    SaveStep {
        verb: "save",
        scenario: names::SAVE_STREAM,
        save: &["--format", "stream"],
        restore: &[],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: names::SAVE_FIXED_EAGER,
        save: &["--format", "fixed-ram"],
        restore: &[],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: names::SAVE_FIXED_LAZY,
        save: &["--format", "fixed-ram"],
        restore: &["--lazy"],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: names::SAVE_MULTIFD,
        save: &["--format", "fixed-ram", "--channels", "2"],
        restore: &["--channels", "2"],
        over_socket: false,
    },
    SaveStep {
        verb: "save",
        scenario: names::MIGRATE_UNIX,
        save: &[],
        restore: &[],
        over_socket: true,
    },
];

/// The two-vCPU guest and the chain of saves and restores.
fn two_vcpu_chain(setup: &Setup, tally: &mut Tally) {
    let chain: Vec<&str> = SAVE_STEPS
        .iter()
        .map(|s| s.scenario)
        .chain([names::LIVE_SNAPSHOT])
        .collect();
    let api = setup.work.join("vm0.sock");
    let mut vm = LinuxVm::spawn(
        &run_args(setup, 2, &strings(&["--api", &path_str(&api)])),
        api,
    );
    let booted = boot(&mut vm, 2, "boot_to_init_2vcpus");
    let boot_lines: Vec<String> = vm
        .guest
        .output()
        .into_iter()
        .take_while(|l| !crate::guest::is_init(l))
        .collect();
    let unexpected = boot_log::unexpected(&boot_lines, setup.nested);
    if unexpected.is_empty() {
        tally.pass(
            names::BOOT_LOG,
            &format!(
                "{} boot lines, every warning-like one expected",
                boot_lines.len()
            ),
        );
    } else {
        let f = Failure {
            reason: format!("{} unexpected boot line(s)", unexpected.len()),
            log: unexpected,
        };
        tally.fail(names::BOOT_LOG, &f);
    }
    if !tally.outcome(names::BOOT_2VCPUS, booted) {
        // The chain still runs, on a second guest, so that a boot lost to
        // the emulator does not hide how the save modes do.
        match fresh_chain_vm(setup, 0) {
            Ok(fresh) => vm = fresh,
            Err(f) => {
                let why = format!("the boot failed, twice (last: {})", f.reason);
                tally.not_run(&[names::PAUSE_RESUME], &why);
                tally.not_run(&chain, &why);
                return;
            }
        }
    }
    tally.outcome(names::PAUSE_RESUME, pause_resume(&mut vm));
    for (i, step) in SAVE_STEPS.iter().enumerate() {
        match save_and_restore(setup, vm, step, i + 1, tally) {
            Ok((next, detail)) => {
                tally.pass(step.scenario, &detail);
                vm = next;
            }
            Err(f) => {
                tally.fail(step.scenario, &f);
                // The rest of the chain goes on from a fresh guest, so that
                // one failure does not hide how the other modes do.
                match fresh_chain_vm(setup, i + 1) {
                    Ok(fresh) => vm = fresh,
                    Err(f) => {
                        tally.not_run(
                            &chain[i + 1..],
                            &format!(
                                "{} failed and a fresh guest did not boot: {}",
                                step.scenario, f.reason
                            ),
                        );
                        return;
                    }
                }
            }
        }
    }
    match live_snapshot(setup, vm, tally) {
        Ok(detail) => tally.pass(names::LIVE_SNAPSHOT, &detail),
        Err(f) => tally.fail(names::LIVE_SNAPSHOT, &f),
    }
}

/// Boots a new two-vCPU guest for the rest of the chain after step `index`
/// failed.
fn fresh_chain_vm(setup: &Setup, index: usize) -> Result<LinuxVm, Failure> {
    let api = setup.work.join(format!("vm{index}-fresh.sock"));
    let mut vm = LinuxVm::spawn(
        &run_args(setup, 2, &strings(&["--api", &path_str(&api)])),
        api,
    );
    vm.wait_init(BOOT_TIMEOUT)?;
    vm.heartbeats(BEATS, BEAT_TIMEOUT)?;
    Ok(vm)
}

/// How long [`pause_resume`] keeps the guest paused.
const PAUSE_FOR: Duration = Duration::from_secs(3);

/// Pauses the guest through the API, waits, resumes it: the workload must
/// report the pause (its clocks moved on together while it was stopped)
/// and carry on.
fn pause_resume(vm: &mut LinuxVm) -> Result<String, Failure> {
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    let api = path_str(&vm.api);
    cryo_ok(&strings(&["pause", "--api", &api]), "cryo pause")?;
    std::thread::sleep(PAUSE_FOR);
    cryo_ok(&strings(&["resume", "--api", &api]), "cryo resume")?;
    let mut pause_line = None;
    let beats = vm.heartbeats(3, BEAT_TIMEOUT)?;
    for line in vm.guest.output().iter().rev().take(40) {
        if line.contains("PAUSE seq=") {
            pause_line = Some(line.clone());
            break;
        }
    }
    let Some(line) = pause_line else {
        return Err(Failure::of(
            vm,
            "the workload reported no PAUSE after a 3 s pause",
        ));
    };
    let gap = cryo_tests::num(&line, "mono_gap_ms").unwrap_or(0);
    if gap < (PAUSE_FOR.as_millis() as u64) / 2 {
        return Err(Failure::of(
            vm,
            format!("a 3 s pause seen as {gap} ms: {line}"),
        ));
    }
    Ok(format!(
        "paused {} s: the guest saw {line:?}, heartbeats went on to {}",
        PAUSE_FOR.as_secs(),
        beats[beats.len() - 1].seq
    ))
}

/// Saves `vm` as `step` says, restores it in a new process and checks it
/// carries on. Returns the restored VM.
pub(crate) fn save_and_restore(
    setup: &Setup,
    mut vm: LinuxVm,
    step: &SaveStep,
    index: usize,
    tally: &mut Tally,
) -> Result<(LinuxVm, String), Failure> {
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    let image = setup.work.join(format!("step{index}.img"));
    let socket = setup.work.join(format!("step{index}.migrate"));
    let _ = std::fs::remove_file(&socket);
    let next_api = setup.work.join(format!("vm{index}.sock"));
    let target = if step.over_socket {
        format!("unix:{}", socket.display())
    } else {
        path_str(&image)
    };

    let mut restore = strings(&["restore"]);
    let mut listener = None;
    if step.over_socket {
        let mut args = strings(&[
            "restore",
            "--listen",
            &target,
            "--api",
            &path_str(&next_api),
        ]);
        args.extend(strings(step.restore));
        let dest = LinuxVm::spawn(&args, next_api.clone());
        // Not a probe connection: the destination takes the first one that
        // comes as the migration.
        let listening = dest.guest.wait_for_stderr(Duration::from_secs(60), |l| {
            l.contains("waiting for a migration")
        });
        if !listening {
            return Err(Failure::of(&dest, "the destination never listened"));
        }
        listener = Some(dest);
    }

    let mut save = strings(&[step.verb, "--api", &path_str(&vm.api), "--to", &target]);
    save.extend(strings(step.save));
    let saved_at = Instant::now();
    cryo_ok(&save, &format!("cryo {}", step.verb)).map_err(Failure::with_vm(&vm))?;
    let save_ms = saved_at.elapsed().as_millis();
    let code = vm.wait_exit(EXIT_TIMEOUT)?;
    if code != 0 {
        return Err(Failure::of(&vm, format!("the saved VM exited {code}")));
    }
    let before = last_heartbeat(&vm.guest.output())
        .ok_or_else(|| Failure::of(&vm, "no heartbeat before the save"))?;

    let mut next = match listener {
        Some(dest) => dest,
        None => {
            restore.extend(strings(&[
                "--from",
                &path_str(&image),
                "--api",
                &path_str(&next_api),
            ]));
            restore.extend(strings(step.restore));
            LinuxVm::spawn(&restore, next_api)
        }
    };
    let detail = carries_on(
        &mut next,
        step.scenario,
        before,
        before.seq + 1..=before.seq + 2,
        tally,
    )?;
    let _ = std::fs::remove_file(&image);
    report::figure(&format!("{}_save_ms", step.scenario), save_ms, "ms");
    Ok((next, format!("saved in {save_ms} ms; {detail}")))
}

/// A live snapshot while the workload runs; the source goes on, is
/// stopped, and the snapshot is restored: the guest comes back at the
/// moment the snapshot began.
fn live_snapshot(setup: &Setup, mut vm: LinuxVm, tally: &mut Tally) -> Result<String, Failure> {
    vm.heartbeats(2, BEAT_TIMEOUT)?;
    let image = setup.work.join("snapshot.img");
    let start = vm
        .last
        .ok_or_else(|| Failure::of(&vm, "no heartbeat before the snapshot"))?;
    take_snapshot(&vm.api, &image).map_err(Failure::with_vm(&vm))?;
    // The source keeps running through and after the snapshot.
    let after = vm.heartbeats(BEATS, BEAT_TIMEOUT)?;
    let went_on_to = after[after.len() - 1].seq;
    cryo_ok(
        &strings(&["quit", "--api", &path_str(&vm.api)]),
        "cryo quit",
    )?;
    vm.wait_exit(EXIT_TIMEOUT)?;

    let mut restored = spawn_restore(&image, setup.work.join("vm-snap.sock"));
    // The image holds the guest as it was when the snapshot began: after
    // `start` (the last heartbeat before the command) and before the
    // source's later heartbeats.
    let detail = carries_on(
        &mut restored,
        names::LIVE_SNAPSHOT,
        start,
        start.seq + 1..=went_on_to,
        tally,
    )?;
    cryo_ok(
        &strings(&["quit", "--api", &path_str(&restored.api)]),
        "cryo quit",
    )?;
    restored.wait_exit(EXIT_TIMEOUT)?;
    let _ = std::fs::remove_file(&image);
    Ok(format!(
        "source ran on to heartbeat {went_on_to}; restored snapshot: {detail}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_is_in_one_set_and_sets_are_named_back() {
        let mut all: Vec<&str> = SETS
            .iter()
            .flat_map(|s| s.scenarios.iter().copied())
            .collect();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "a scenario in two sets");
        assert_eq!(sets_of(&[names::DISK_SNAPSHOT_LIVE]), "disk");
        assert_eq!(
            sets_of(&[names::NET_TCP_SAVE_RESTORE, names::TIMEKEEPING]),
            "chain,net"
        );
        assert_eq!(sets_of(&[]), "");
    }
}
