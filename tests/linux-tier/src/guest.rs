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

/// What went wrong, with the guest's console and stderr attached.
#[derive(Debug)]
pub struct Failure {
    /// One line for the RESULT.
    pub reason: String,
    /// The guest's transcript (console tail and stderr).
    pub log: Vec<String>,
}

impl Failure {
    /// A failure of `vm` (its transcript attached, and where its threads
    /// are in the host kernel if it is still running: a stuck vCPU shows
    /// there).
    pub fn of(vm: &LinuxVm, reason: impl Into<String>) -> Failure {
        let mut log: Vec<String> = vm.guest.transcript().lines().map(str::to_string).collect();
        log.extend(thread_states(vm.guest.pid()));
        Failure {
            reason: reason.into(),
            log,
        }
    }

    /// A failure with no guest to show.
    pub fn plain(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            log: Vec::new(),
        }
    }
}

/// One line per thread of process `pid`: name, state, kernel wait channel,
/// and the kernel stack where the host lets us read it.
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
        lines.extend(read("stack").lines().map(|l| format!("    {l}")));
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
            return Err(Failure::of(
                self,
                format!("{} of {count} heartbeats within {timeout:?}", beats.len()),
            ));
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
        found.ok_or_else(|| Failure::of(self, format!("no {what} within {timeout:?}")))
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
            Err(Failure::of(
                self,
                format!("typed {command:?}, no {expect:?} within {timeout:?}"),
            ))
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
