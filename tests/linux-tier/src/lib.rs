//! # cryo's Linux test tier
//!
//! Boots the Debian cloud kernel with cryo's own initramfs
//! (`resources/linux-guest`: busybox, a `/init`, and a workload that
//! rewrites and re-verifies its memory and checks its clocks) to user space
//! under cryo, and checks every save mode on it. See this crate's README.
//!
//! Where it runs:
//! - **Hardware KVM** (no `/sys/module/kvm_pvm`): the scenario driver runs
//!   directly on the host ([`Mode::Direct`]).
//! - **PVM** (this project's development and CI machines, where guest ring
//!   0 is emulated and a stock kernel dies in early boot): the driver runs
//!   inside a QEMU TCG machine whose emulated AMD SVM gives a real kvm-amd
//!   ([`Mode::Nested`]).
//!
//! The pieces, in the order [`run_tier`] uses them:
//! - [`artifacts`]: statically linked cryo, driver and workload (cargo);
//!   the Debian kernels (`apt-get download`); busybox-static; QEMU.
//! - [`guest_image`]: the guest's initramfs, and the nested machine's.
//! - [`scenarios`]: what the driver does and checks (run by the
//!   `cryo-linux-driver` binary), with [`guest`] to follow the guest's
//!   console and [`boot_log`] for the list of expected boot warnings.
//! - [`report`]: the `LINUX-TIER` lines between driver and harness.
//!
//! A missing piece is an error that names the package to install, never a
//! silent skip.
#![deny(missing_docs)]

pub mod artifacts;
pub mod boot_log;
mod disk_scenarios;
pub mod guest;
pub mod guest_image;
mod kvm_trace;
mod net_scenarios;
pub mod report;
mod rootfs_scenarios;
pub mod scenarios;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cryo_tests::host_is_pvm;
use report::Report;

/// How long the nested machine may run before it is killed.
pub const NESTED_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// All nested runs together stop starting after this long, so that the
/// tier ends inside a CI job's time however the runs go.
const NESTED_BUDGET: Duration = Duration::from_secs(45 * 60);
/// A nested run is not started with less than this left of the budget.
const NESTED_RUN_AT_LEAST: Duration = Duration::from_secs(5 * 60);
/// Memory of the nested machine: the guests' RAM and their images (tmpfs).
const NESTED_MEM: &str = "3G";

/// Why the tier could not run.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// A piece the tier needs is not on this host.
    #[error("the Linux tier needs {0}")]
    Missing(String),
    /// Building the static binaries failed.
    #[error("{0}")]
    Build(String),
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The driver or the nested machine did not finish.
    #[error("{0}")]
    Run(String),
}

/// Where the driver ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On this host's hardware KVM.
    Direct,
    /// Inside QEMU TCG with a nested kvm-amd (on a PVM host).
    Nested,
}

/// A finished run of the tier.
pub struct TierRun {
    /// Where the driver ran.
    pub mode: Mode,
    /// What it reported.
    pub report: Report,
    /// Everything that was printed (driver output, or the nested console)
    /// in the run whose results stand.
    pub transcript: Vec<String>,
    /// Nested runs after which some scenario had not passed yet: one note
    /// each, naming them, with each one's failure and log (see
    /// [`Report::failure`]).
    pub retries: Vec<String>,
    /// Per scenario that failed in some nested run: one line per such run,
    /// with why.
    pub nested_failures: BTreeMap<String, Vec<String>>,
    /// Wall time of the run, builds and fetches included.
    pub wall: Duration,
}

/// Builds everything, runs the scenarios where KVM is real, and collects
/// the report.
pub fn run_tier() -> Result<TierRun, TierError> {
    let started = Instant::now();
    let mode = if host_is_pvm() {
        Mode::Nested
    } else {
        Mode::Direct
    };
    let work = std::env::temp_dir().join(format!("cryo-linux-tier-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| TierError::Io(work.clone(), e))?;
    let busybox = artifacts::busybox()?;
    let qemu = match mode {
        Mode::Nested => Some(artifacts::qemu()?),
        Mode::Direct => None,
    };
    let bins = artifacts::static_binaries()?;
    let guest_kernel = artifacts::guest_kernel()?;
    let guest_modules = artifacts::guest_modules()?;
    let guest_tools = artifacts::guest_disk_tools()?;
    let guest_initrd =
        guest_image::guest_initramfs(&work, &busybox, &bins, &guest_modules, &guest_tools)?;
    let root = guest_image::root_disk(&work, &busybox, &bins, &guest_modules)?;
    let mut retries = Vec::new();
    let mut nested_failures = BTreeMap::new();
    let mut merged = None;
    let transcript = match qemu {
        None => run_direct(&bins, &guest_kernel, &guest_initrd, &root, &work)?,
        Some(qemu) => {
            let host_kernel = artifacts::nested_host_kernel()?;
            let guests = guest_image::NestedGuests {
                kernel: &guest_kernel,
                initrd: &guest_initrd,
                root: &root,
                tools: &guest_tools,
            };
            let initrd =
                guest_image::nested_initramfs(&work, &busybox, &bins, &host_kernel, &guests)?;
            let nested = run_nested_until_pass(&qemu, &host_kernel.vmlinuz, &initrd)?;
            retries = nested.notes;
            nested_failures = nested.failures;
            merged = Some(nested.report);
            nested.transcript
        }
    };
    let _ = std::fs::remove_dir_all(&work);
    let report = merged.unwrap_or_else(|| {
        let report = Report::parse(transcript.iter().map(String::as_str));
        retries = set_retry_notes("the driver", &report);
        report
    });
    Ok(TierRun {
        mode,
        report,
        transcript,
        retries,
        nested_failures,
        wall: started.elapsed(),
    })
}

/// How long the driver may print nothing (not even its `ALIVE` lines,
/// see [`report::ALIVE_EVERY`]) before its machine counts as hung: it is
/// killed and the run ends there, unfinished, like one that died.
const SILENCE_LIMIT: Duration = Duration::from_secs(180);

/// Runs a command to its end (or `timeout`, or [`SILENCE_LIMIT`] without a
/// line), returning its stdout lines (stderr joined in). Each line is also
/// echoed to this process's stderr, so that a long run shows its progress.
fn collect_lines(mut cmd: Command, timeout: Duration) -> Result<Vec<String>, TierError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TierError::Run(format!("cannot start {cmd:?}: {e}")))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut pumps = Vec::new();
    let outputs: [Option<Box<dyn std::io::Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ];
    for out in outputs.into_iter().flatten() {
        let tx = tx.clone();
        pumps.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(SILENCE_LIMIT)) {
            Ok(line) => {
                eprintln!("{line}");
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Killed, the run ends unfinished: its report has no DONE
                // line and the scenarios it did not reach are run again.
                let why = if left <= SILENCE_LIMIT {
                    format!("still running after {timeout:?}")
                } else {
                    format!("silent for {SILENCE_LIMIT:?} (hung)")
                };
                let killed = format!("{} HARNESS killed: {why}", report::PREFIX);
                eprintln!("{killed}");
                lines.push(killed);
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    for p in pumps {
        let _ = p.join();
    }
    Ok(lines)
}

fn run_direct(
    bins: &artifacts::StaticBinaries,
    kernel: &artifacts::GuestKernel,
    initrd: &Path,
    root: &guest_image::RootDisk,
    work: &Path,
) -> Result<Vec<String>, TierError> {
    let mut cmd = Command::new(&bins.driver);
    cmd.arg("--cryo")
        .arg(&bins.cryo)
        .arg("--kernel")
        .arg(&kernel.vmlinux)
        .arg("--bzimage")
        .arg(&kernel.bzimage)
        .arg("--initrd")
        .arg(initrd)
        .arg("--root-initrd")
        .arg(&root.initrd)
        .arg("--rootfs")
        .arg(&root.image)
        .arg("--work")
        .arg(work.join("driver"));
    collect_lines(cmd, NESTED_TIMEOUT)
}

/// How many times the nested machine may run. The nested machine's own
/// kernel has died (a kernel stack overflow in a vCPU thread's page fault,
/// or silently) while a two-vCPU guest booted, in two runs of three on a
/// quiet host: a fourth run costs minutes only when three were not enough.
pub const NESTED_ATTEMPTS: usize = 4;

/// Lines of the nested console a note shows when the driver did not finish.
const CONSOLE_TAIL: usize = 30;
/// Lines of a scenario's log kept per nested run it failed in.
const FAILURE_LOG_TAIL: usize = 120;

/// What [`run_nested_until_pass`] found.
struct NestedRuns {
    /// The last run's console.
    transcript: Vec<String>,
    /// Each scenario's outcome from a run where it passed, else from the
    /// last run.
    report: Report,
    /// One note per run after which some scenario had not passed yet.
    notes: Vec<String>,
    /// Per scenario, why it failed in each run where it did.
    failures: BTreeMap<String, Vec<String>>,
}

impl NestedRuns {
    /// The note on run `attempt`, whose `report` left `missing` not passed
    /// in any run: each one's failure with its log, and the end of the
    /// console if the driver did not finish. Records the failures.
    fn note(&mut self, attempt: usize, report: &Report, missing: &[&str]) -> String {
        let run = format!("nested run {attempt} of {NESTED_ATTEMPTS}");
        let mut note = format!("{run}: not yet passed in any run: {}", missing.join(", "));
        for name in missing {
            let why = report.failure(name).unwrap_or_default();
            let mut lines = why.lines();
            let first = lines.next().unwrap_or_default();
            let reason = first.strip_prefix(&format!("{name}: ")).unwrap_or(first);
            // The end of its log too: a scenario that fails in every run
            // must be explained by the test's message alone, and the last
            // run's log (the one the report keeps) may only say "not run".
            let log: Vec<&str> = lines.collect();
            let log_tail = log[log.len().saturating_sub(FAILURE_LOG_TAIL)..].join("\n");
            self.failures
                .entry(name.to_string())
                .or_default()
                .push(format!("{run}: {reason}\n{log_tail}"));
            note.push('\n');
            note.push_str(&why);
        }
        if !report.done && !missing.is_empty() {
            let alive = format!("{} ALIVE", report::PREFIX);
            let console: Vec<&str> = self
                .transcript
                .iter()
                .map(String::as_str)
                .filter(|l| !l.contains(&alive))
                .collect();
            let tail = guest::tail(&console, CONSOLE_TAIL);
            note.push_str(&format!(
                "\nthe driver did not finish; the nested console's last {} lines:\n{}",
                tail.len(),
                tail.join("\n")
            ));
        }
        note
    }
}

/// One note per scenario whose set the driver of `run` ran again (see
/// `scenarios::SET_ATTEMPTS`): why it failed, and the end of its log, so
/// that a flake shows in the CI log even when the retry passed.
fn set_retry_notes(run: &str, report: &Report) -> Vec<String> {
    let notes = report.retried.iter().map(|(name, set_attempt, reason)| {
        let log = report.logs.get(name).map(Vec::as_slice).unwrap_or_default();
        let tail = guest::tail(log, FAILURE_LOG_TAIL);
        format!(
            "{run}: {name} failed in attempt {set_attempt} of its set, which the driver ran again: {reason}\n    | {}",
            tail.join("\n    | ")
        )
    });
    notes.collect()
}

/// Runs the nested machine until every scenario has passed in some run, at
/// most [`NESTED_ATTEMPTS`] times.
///
/// Under QEMU's TCG emulation of nested SVM, guests have been seen, once
/// in a few boots and more often on a loaded host, to triple-fault in early
/// boot with no save or restore involved, to stall with a vCPU that takes
/// no timer interrupt or NMI, or to end the nested machine without a
/// message; and the nested machine's own kernel to die ("stack guard page
/// was hit" in a cryo vCPU thread, at `exc_page_fault`'s first access
/// through GS, which keeps faulting: its GS base is not the kernel's) while
/// a two-vCPU guest boots. Each run is a fresh machine: a scenario that passes in one
/// shows what cryo does; one that fails in every run still fails the tier.
/// The notes (printed by the tests) give every failure of every run, with
/// its reason and log, so that a flake shows in the CI log even when a
/// later run passed.
fn run_nested_until_pass(
    qemu: &Path,
    vmlinuz: &Path,
    initrd: &Path,
) -> Result<NestedRuns, TierError> {
    let mut runs = NestedRuns {
        transcript: Vec::new(),
        report: Report::default(),
        notes: Vec::new(),
        failures: BTreeMap::new(),
    };
    let mut only = std::env::var(scenarios::ONLY_VAR).ok();
    let started = Instant::now();
    for attempt in 1..=NESTED_ATTEMPTS {
        let left = NESTED_BUDGET.saturating_sub(started.elapsed());
        if left < NESTED_RUN_AT_LEAST {
            let note = format!(
                "no nested run {attempt}: the tier's {NESTED_BUDGET:?} were spent (the scenarios not passed yet fail)"
            );
            eprintln!("{} NESTED {note}", report::PREFIX);
            runs.notes.push(note);
            break;
        }
        let timeout = NESTED_TIMEOUT.min(left);
        runs.transcript = run_nested(qemu, vmlinuz, initrd, only.as_deref(), timeout)?;
        let report = Report::parse(runs.transcript.iter().map(String::as_str));
        let passed = |r: &Report, name: &str| r.results.get(name).is_some_and(|o| o.passed);
        let missing: Vec<&str> = scenarios::selected()
            .iter()
            .copied()
            .filter(|name| !passed(&runs.report, name) && !passed(&report, name))
            .collect();
        let mut note = runs.note(attempt, &report, &missing);
        let run = format!("nested run {attempt} of {NESTED_ATTEMPTS}");
        runs.notes.extend(set_retry_notes(&run, &report));
        runs.report.merge(report);
        if missing.is_empty() {
            break;
        }
        if attempt < NESTED_ATTEMPTS {
            // The next run carries only the sets that did not pass.
            let sets = scenarios::sets_of(&missing);
            note.push_str(&format!("\nthe next run carries the sets {sets} only"));
            only = Some(sets);
        }
        eprintln!("{} NESTED {note}", report::PREFIX);
        runs.notes.push(note);
    }
    Ok(runs)
}

/// The nested machine's kernel command line. `mitigations=off`: the
/// speculation mitigations of the nested machine's own kernel protect
/// nothing the tier has and cost emulated time on every VM exit (IBPB,
/// VERW, return thunks); the guests keep theirs.
fn nested_cmdline(only: Option<&str>) -> String {
    let mut line = if std::env::var("CRYO_LINUX_TIER_VERBOSE").is_ok_and(|v| v == "1") {
        "console=ttyS0 panic=-1 mitigations=off".to_string()
    } else {
        "console=ttyS0 quiet panic=-1 mitigations=off".to_string()
    };
    // Reaches the nested /init, and so the driver, as an environment variable.
    if let Some(only) = only {
        line.push_str(&format!(" {}={only}", scenarios::ONLY_VAR));
    }
    line
}

/// One run of the nested machine, carrying the scenario sets `only` names
/// (all if none).
fn run_nested(
    qemu: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    only: Option<&str>,
    timeout: Duration,
) -> Result<Vec<String>, TierError> {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", NESTED_MEM,
    ])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    // Quiet: the nested machine's own kernel messages are noise here;
    // the guests' consoles come through the driver. CRYO_LINUX_TIER_VERBOSE=1
    // shows them, to debug the nested machine itself.
    .arg("-append")
    .arg(nested_cmdline(only))
    .args(["-display", "none", "-nodefaults", "-serial", "stdio"])
    .args(["-no-reboot", "-monitor", "none"]);
    collect_lines(cmd, timeout)
}

/// Compiles the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
