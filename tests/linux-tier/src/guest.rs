//! Following cryo's Linux test guest (`resources/linux-guest`) on its
//! console: its `INIT` line, its heartbeats, and any `MISMATCH`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cryo_tests::{cryo_bin, field, num, Guest};

/// The kernel command line the tier boots with. `workload_*` words reach
/// the guest's `/init` as environment variables.
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 workload_workers=2 workload_mib=8 workload_hb_ms=500";
/// Added to [`CMDLINE`] when the guest runs nested under QEMU's TCG
/// emulator. There the host's TSC is unstable, and a guest LAPIC timer in
/// TSC-deadline mode was seen to stop firing (a one-vCPU guest whose one
/// CPU-bound process ran on while every sleeping one slept forever); the
/// one-shot mode counts in nanoseconds and does not depend on the TSC.
pub const NESTED_CMDLINE_EXTRA: &str = "lapic=notscdeadline";
/// The heartbeat period that [`CMDLINE`] asks for.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// Guest RAM for the tier's guests.
pub const MEM_MIB: u32 = 256;

/// One `HB` line of the workload.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    /// Sequence number, from 1 at boot.
    pub seq: u64,
    /// CLOCK_MONOTONIC in the guest.
    pub mono_ns: i128,
    /// CLOCK_REALTIME in the guest.
    pub real_ns: i128,
    /// When the driver read the line.
    pub seen: Instant,
}

/// Parses an `HB seq=.. mono_ns=.. real_ns=..` line.
pub fn parse_heartbeat(line: &str) -> Option<Heartbeat> {
    let at = line.find("HB seq=")?;
    let line = &line[at..];
    Some(Heartbeat {
        seq: num(line, "seq")?,
        mono_ns: field(line, "mono_ns")?.parse().ok()?,
        real_ns: field(line, "real_ns")?.parse().ok()?,
        seen: Instant::now(),
    })
}

/// The guest's `/init` announcing a boot (and so, after a restore, a reboot).
pub fn is_init(line: &str) -> bool {
    line.contains("INIT cpus=")
}

/// A line the workload prints only when something is wrong.
pub fn is_mismatch(line: &str) -> bool {
    line.contains("MISMATCH")
}

/// The last heartbeat among `lines`.
pub fn last_heartbeat(lines: &[String]) -> Option<Heartbeat> {
    lines.iter().rev().find_map(|l| parse_heartbeat(l))
}

/// A cryo process running the Linux test guest.
pub struct LinuxVm {
    /// The cryo process and its console.
    pub guest: Guest,
    /// Its API socket.
    pub api: PathBuf,
    /// The newest heartbeat seen on its console.
    pub last: Option<Heartbeat>,
}

/// Console lines a failure keeps: the newest, heartbeats and sweeps left
/// out (they come every half second and would crowd out the rest).
pub const CONSOLE_TAIL: usize = 30;
/// cryo stderr lines a failure keeps: the newest.
pub const STDERR_TAIL: usize = 30;
/// Kernel stack frames a failure keeps per cryo thread.
const STACK_FRAMES: usize = 8;

/// What went wrong, with the guest's console and stderr attached.
#[derive(Debug)]
pub struct Failure {
    /// One line for the RESULT: the step that failed, then what happened.
    pub reason: String,
    /// The guest's transcript, bounded: console tail, stderr tail, and
    /// where cryo's threads were waiting.
    pub log: Vec<String>,
}

impl Failure {
    /// A failure of `vm` (its bounded transcript attached, and where its
    /// threads are in the host kernel if it is still running: a stuck vCPU
    /// shows there).
    pub fn of(vm: &LinuxVm, reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            log: vm_log(vm),
        }
    }

    /// A failure with no guest to show.
    pub fn plain(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            log: Vec::new(),
        }
    }

    /// For `map_err`: names the `step` that failed in the reason, and
    /// attaches `vm`'s transcript (as it is now) if the failure has none.
    pub fn at(vm: &LinuxVm, step: &'static str) -> impl FnOnce(Failure) -> Failure {
        let now = vm_log(vm);
        move |f| Failure {
            reason: format!("{step}: {}", f.reason),
            log: if f.log.is_empty() { now } else { f.log },
        }
    }

    /// For `map_err` on a command that acts on `vm` (a save, a snapshot):
    /// adds `vm`'s transcript, as it is when the command failed, to the
    /// command's own output, since what the guest or its cryo did meanwhile
    /// (a guest that reset, a cryo that exited) often explains it.
    pub fn with_vm(vm: &LinuxVm) -> impl FnOnce(Failure) -> Failure + '_ {
        move |mut f| {
            f.log.extend(vm_log(vm));
            f
        }
    }
}

/// The newest `n` of `lines`.
pub fn tail<T>(lines: &[T], n: usize) -> &[T] {
    &lines[lines.len().saturating_sub(n)..]
}

/// A workload line that comes on its own clock (heartbeat, sweep).
fn is_chatter(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("HB seq=") || line.starts_with("SWEEP ")
}

/// `vm`'s console and stderr, bounded ([`CONSOLE_TAIL`], [`STDERR_TAIL`]),
/// and the state of its threads if it still runs.
fn vm_log(vm: &LinuxVm) -> Vec<String> {
    let out = vm.guest.output();
    let quiet: Vec<&String> = out.iter().filter(|l| !is_chatter(l)).collect();
    let shown = tail(&quiet, CONSOLE_TAIL);
    let mut log = vec![format!(
        "--- console: last {} of {} lines (heartbeats and sweeps left out) ---",
        shown.len(),
        out.len()
    )];
    log.extend(shown.iter().map(|l| l.to_string()));
    if let Some(hb) = out.iter().rev().find(|l| parse_heartbeat(l).is_some()) {
        log.push(format!("--- last heartbeat: {}", hb.trim()));
    }
    let err = vm.guest.stderr();
    let shown = tail(&err, STDERR_TAIL);
    log.push(format!(
        "--- cryo stderr: last {} of {} lines ---",
        shown.len(),
        err.len()
    ));
    log.extend(shown.iter().cloned());
    let threads = thread_states(vm.guest.pid());
    if !threads.is_empty() {
        // Still running: where its vCPUs are.
        log.extend(threads);
        log.extend(crate::kvm_trace::kvm_events());
    }
    log
}

/// One line per thread of process `pid`: name, state, kernel wait channel,
/// and the top of the kernel stack where the host lets us read it.
fn thread_states(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut lines = vec!["--- cryo threads ---".to_string()];
    for task in tasks.filter_map(Result::ok) {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state follows the parenthesised name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?");
        lines.push(format!(
            "{} state={state} wchan={}",
            read("comm").trim(),
            read("wchan").trim()
        ));
        let stack = read("stack");
        lines.extend(stack.lines().take(STACK_FRAMES).map(|l| format!("    {l}")));
    }
    lines
}

impl LinuxVm {
    /// Starts `cryo` with `args` (stdin a pipe: the guest's console input).
    pub fn spawn(args: &[String], api: PathBuf) -> LinuxVm {
        let mut cmd = Command::new(cryo_bin());
        cmd.args(args);
        LinuxVm {
            guest: Guest::interactive(cmd),
            api,
            last: None,
        }
    }

    /// Reads console lines until `stop` says so or `timeout` passes. Every
    /// line is watched on the way: a heartbeat becomes the newest one seen
    /// (and must follow the previous one), a `MISMATCH` fails, and so does
    /// an `INIT` unless `init_expected`. Returns whether `stop` was met.
    fn watch(
        &mut self,
        timeout: Duration,
        init_expected: bool,
        mut stop: impl FnMut(&str, Option<Heartbeat>) -> bool,
    ) -> Result<bool, Failure> {
        let mut last = self.last;
        let mut trouble: Option<String> = None;
        let mut met = false;
        self.guest.wait_for(timeout, |line| {
            let hb = parse_heartbeat(line);
            if is_mismatch(line) {
                trouble = Some(format!("the guest reported: {line}"));
            } else if is_init(line) && !init_expected {
                trouble = Some(format!("the guest rebooted: {line}"));
            } else if let Some(hb) = hb {
                if let Some(p) = last.filter(|p| hb.seq != p.seq + 1) {
                    trouble = Some(format!("heartbeat {} after {}", hb.seq, p.seq));
                }
                last = Some(hb);
            }
            met = trouble.is_none() && stop(line, hb);
            trouble.is_some() || met
        });
        self.last = last;
        match trouble {
            Some(t) => Err(Failure::of(self, t)),
            None => Ok(met),
        }
    }

    /// Waits for the `INIT` line; returns it.
    pub fn wait_init(&mut self, timeout: Duration) -> Result<String, Failure> {
        self.find_line(timeout, true, "INIT line", is_init)
    }

    /// Waits for `count` heartbeats after the newest one seen, failing on
    /// a `MISMATCH`, on an `INIT` (a reboot), or on a sequence number that
    /// does not follow the previous one. Returns them.
    pub fn heartbeats(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Heartbeat>, Failure> {
        let mut beats = Vec::new();
        self.watch(timeout, false, |_, hb| {
            beats.extend(hb);
            beats.len() >= count
        })?;
        if beats.len() < count {
            let why = format!(
                "{} of {count} heartbeats {}",
                beats.len(),
                self.gave_up(timeout)
            );
            return Err(Failure::of(self, why));
        }
        Ok(beats)
    }

    /// Types a line into the console without waiting for anything.
    pub fn type_line(&mut self, line: &str) -> Result<(), Failure> {
        self.guest
            .send(&format!("{line}\n"))
            .map_err(|e| Failure::of(self, format!("cannot type into the console: {e}")))
    }

    /// Waits for a console line that `pred` accepts, watching heartbeats on
    /// the way as [`LinuxVm::heartbeats`] does; returns the line.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String, Failure> {
        self.find_line(timeout, false, "awaited console line", pred)
    }

    fn find_line(
        &mut self,
        timeout: Duration,
        init_expected: bool,
        what: &str,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, Failure> {
        let mut found = None;
        self.watch(timeout, init_expected, |line, _| {
            if pred(line) {
                found = Some(line.to_string());
            }
            found.is_some()
        })?;
        match found {
            Some(line) => Ok(line),
            None => {
                let why = format!("no {what} {}", self.gave_up(timeout));
                Err(Failure::of(self, why))
            }
        }
    }

    /// Types a shell command and waits for a console line containing `expect`.
    pub fn shell(&mut self, command: &str, expect: &str, timeout: Duration) -> Result<(), Failure> {
        if let Err(e) = self.guest.send(&format!("{command}\n")) {
            return Err(Failure::of(
                self,
                format!("cannot type into the console: {e}"),
            ));
        }
        // The echo of the command itself contains the command text, not the
        // expected output (the test asks for computed output).
        let found = self.watch(timeout, false, |line, _| {
            line.contains(expect) && !line.contains(command)
        })?;
        if found {
            Ok(())
        } else {
            let why = format!("typed {command:?}, no {expect:?} {}", self.gave_up(timeout));
            Err(Failure::of(self, why))
        }
    }

    /// Waits until the shell answers: input typed while it is still
    /// starting can be lost (it flushes the terminal's input), so a probe
    /// is typed up to `tries` times, `each` apart.
    pub fn wait_shell(&mut self, tries: u32, each: Duration) -> Result<(), Failure> {
        let probe = "echo SHELL-UP-$((3+4))";
        for _ in 1..tries {
            if self.shell(probe, "SHELL-UP-7", each).is_ok() {
                return Ok(());
            }
        }
        self.shell(probe, "SHELL-UP-7", each)
    }

    /// Why a wait of `timeout` for console lines ended without them: the
    /// time ran out, or cryo had exited (its console closed early).
    fn gave_up(&mut self, timeout: Duration) -> String {
        match self.guest.wait_exit(Duration::ZERO) {
            Some(status) => format!("before cryo exited ({status})"),
            None => format!("within {timeout:?}"),
        }
    }

    /// Waits for the process to end; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32, Failure> {
        match self.guest.wait_exit(timeout) {
            Some(status) => Ok(status.code().unwrap_or(-1)),
            None => Err(Failure::of(
                self,
                format!("cryo still running after {timeout:?}"),
            )),
        }
    }
}
