//! Helpers for cryo's integration tests: find (and build) the `cryo` binary,
//! run guests under real KVM and follow their serial console line by line.
//!
//! The tests themselves live in `tests/tests/`. They need `/dev/kvm`; the
//! Debian-kernel tests also need the kernel that `resources/fetch-kernel.sh`
//! caches (CI fetches it first; locally the tests fetch it on demand).
#![deny(missing_docs)]

pub mod blk_reader;
pub mod initramfs;
pub mod migration;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The test kernel image built by `cryo-test-kernel`'s build script.
pub fn test_kernel() -> &'static Path {
    cryo_test_kernel::kernel_path()
}

/// The `cryo` binary: `$CRYO_BIN` when set (for example inside the Linux
/// tier's nested machine, which has no cargo), otherwise the one of the same
/// profile as this test, built on first use.
pub fn cryo_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CRYO_BIN") {
            return PathBuf::from(bin);
        }
        // target/<profile>/deps/<test-binary> -> target/<profile>/cryo
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "cryo", "--bin", "cryo"])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(workspace_root());
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the cryo binary");
        assert!(status.success(), "building the cryo binary failed");
        profile_dir.join("cryo")
    })
}

/// Whether KVM here is PVM (guest ring 0 emulated), where a stock Linux
/// kernel only gets through early boot.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A `cryo` process whose stdout (the guest's serial console) is read line by line.
pub struct Guest {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    pumps: Vec<std::thread::JoinHandle<()>>,
    /// When the process was started.
    pub started: Instant,
}

fn pump(
    reader: impl std::io::Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    tx: Option<std::sync::mpsc::Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if let Ok(mut s) = sink.lock() {
                        s.push(line.clone());
                    }
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            }
        }
    })
}

impl Guest {
    /// Starts `cryo` with `args`, stdin closed, stdout and stderr captured.
    pub fn spawn<I, S>(args: I) -> Guest
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(cryo_bin());
        cmd.args(args);
        Guest::from_command(cmd)
    }

    /// Starts a prepared command (e.g. with extra environment), stdin closed,
    /// stdout and stderr captured.
    pub fn from_command(cmd: Command) -> Guest {
        Guest::start(cmd, false)
    }

    /// Starts a prepared command with a pipe to its stdin (the guest's
    /// console input, see [`Guest::send`]), stdout and stderr captured.
    pub fn interactive(cmd: Command) -> Guest {
        Guest::start(cmd, true)
    }

    fn start(mut cmd: Command, with_stdin: bool) -> Guest {
        let started = Instant::now();
        let mut child = cmd
            .stdin(if with_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cryo");
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pumps = vec![
            pump(
                child.stdout.take().expect("stdout"),
                Arc::clone(&seen),
                Some(tx),
            ),
            pump(
                child.stderr.take().expect("stderr"),
                Arc::clone(&stderr),
                None,
            ),
        ];
        Guest {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen,
            stderr,
            pumps,
            started,
        }
    }

    /// Boots the test kernel with `vcpus` vCPUs, `mem_mib` MiB and extra command line words.
    pub fn test_kernel(vcpus: u32, mem_mib: u64, cmdline: &str, extra: &[&str]) -> Guest {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            test_kernel().display().to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
            "--mem-mib".into(),
            mem_mib.to_string(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Guest::spawn(args)
    }

    /// Waits until a line matches `pred`, returning it, or None after `timeout`
    /// (or when the process has closed its output).
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Discards the console lines received but not yet followed, so that the
    /// next [`Guest::follow`] sees only what the guest prints from now on.
    pub fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// Every console line so far.
    pub fn output(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until a stderr line matches `pred` (polling), at most `timeout`.
    pub fn wait_for_stderr(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr().iter().any(|l| pred(l)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The console and stderr, for assertion messages.
    pub fn transcript(&self) -> String {
        let out = self.output();
        let err = self.stderr();
        let tail: Vec<&String> = out
            .iter()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "--- console (last {} of {} lines) ---\n{}\n--- stderr ---\n{}",
            tail.len(),
            out.len(),
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            err.join("\n")
        )
    }

    /// Types `text` on the guest's console (only for [`Guest::interactive`]).
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(text.as_bytes()).and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other(
                "this guest was started without a stdin pipe",
            )),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // Let the pump threads drain the pipes to their end.
                let drain = Instant::now() + Duration::from_secs(10);
                while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < drain {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A parsed `key=value` field of a test-kernel line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A numeric field of a test-kernel line.
pub fn num(line: &str, key: &str) -> Option<u64> {
    field(line, key).and_then(|v| v.parse().ok())
}

/// Runs `cryo` with `args` to completion (stdin closed) and returns status, stdout, stderr.
pub fn run_cryo(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(cryo_bin());
    cmd.args(args);
    run_command(cmd, timeout)
}

/// Runs a prepared command to completion and returns status, stdout, stderr.
pub fn run_command(cmd: Command, timeout: Duration) -> (Option<i32>, String, String) {
    let mut g = Guest::from_command(cmd);
    let status = g.wait_exit(timeout);
    if status.is_none() {
        g.kill();
    }
    (
        status.and_then(|s| s.code()),
        g.output().join("\n"),
        g.stderr().join("\n"),
    )
}

/// A minimal x86_64 ELF64 vmlinux: one loadable segment at physical `paddr`
/// holding `code` (the entry point), `memsz` bytes in memory, no PVH note.
/// Entered through the Linux 64-bit boot protocol (long mode, ring 0).
pub fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + code.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&memsz.max(code.len() as u64).to_le_bytes());
    f[0x1000..].copy_from_slice(code);
    f
}

/// Writes `bytes` to a fresh file under the temp dir and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cryo-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// What a test-kernel console showed per vCPU while being watched.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// First heartbeat (seq, tsc) per vCPU.
    pub first_beat: std::collections::BTreeMap<u64, (u64, u64)>,
    /// Last heartbeat (seq, tsc) per vCPU.
    pub last_beat: std::collections::BTreeMap<u64, (u64, u64)>,
    /// Heartbeats seen per vCPU.
    pub beats: std::collections::BTreeMap<u64, u64>,
    /// SWEEP lines seen per vCPU.
    pub sweeps: std::collections::BTreeMap<u64, u64>,
    /// Whether a boot banner was seen.
    pub booted: bool,
}

impl Guest {
    /// Follows the test kernel's console until every one of `vcpus` vCPUs
    /// has printed `beats` heartbeats and `sweeps` SWEEP lines. Panics on
    /// MISMATCH, PANIC, TSC-BACKWARDS, ERROR, a heartbeat sequence that does
    /// not go up by one, or a timeout.
    pub fn follow(&mut self, vcpus: u32, beats: u64, sweeps: u64, timeout: Duration) -> Progress {
        let mut p = Progress::default();
        let mut bad: Option<String> = None;
        let done = self.wait_for(timeout, |l| {
            if l.starts_with("cryo-test-kernel") {
                p.booted = true;
            }
            if ["MISMATCH", "PANIC", "TSC-BACKWARDS", "ERROR", "AP-TIMEOUT"]
                .iter()
                .any(|k| l.starts_with(k))
            {
                bad = Some(l.to_string());
                return true;
            }
            // Only whole lines count: a save can cut a line in two.
            if let (Some(cpu), true) = (num(l, "cpu"), l.contains("errors=")) {
                if l.starts_with("HB ") {
                    let (seq, tsc) = (num(l, "seq").unwrap_or(0), num(l, "tsc").unwrap_or(0));
                    if let Some((last, _)) = p.last_beat.get(&cpu) {
                        if seq != last + 1 {
                            bad = Some(format!("heartbeat sequence jumped from {last}: {l}"));
                            return true;
                        }
                    }
                    p.first_beat.entry(cpu).or_insert((seq, tsc));
                    p.last_beat.insert(cpu, (seq, tsc));
                    *p.beats.entry(cpu).or_default() += 1;
                } else if l.starts_with("SWEEP ") {
                    *p.sweeps.entry(cpu).or_default() += 1;
                }
            }
            (0..u64::from(vcpus)).all(|c| {
                p.beats.get(&c).copied().unwrap_or(0) >= beats
                    && p.sweeps.get(&c).copied().unwrap_or(0) >= sweeps
            })
        });
        assert!(
            bad.is_none(),
            "guest reported: {}\n{}",
            bad.unwrap_or_default(),
            self.transcript()
        );
        assert!(
            done.is_some(),
            "guest did not make progress: {p:?}\n{}",
            self.transcript()
        );
        p
    }
}

impl Guest {
    /// Summarizes the console output seen so far (for a VM that has ended):
    /// the last whole heartbeat per vCPU.
    pub fn follow_output(&self, vcpus: u32) -> Progress {
        let mut p = Progress::default();
        for l in self.output() {
            if l.starts_with("cryo-test-kernel") {
                p.booted = true;
            }
            if let (true, Some(cpu), true) =
                (l.starts_with("HB "), num(&l, "cpu"), l.contains("errors="))
            {
                let beat = (num(&l, "seq").unwrap_or(0), num(&l, "tsc").unwrap_or(0));
                p.first_beat.entry(cpu).or_insert(beat);
                p.last_beat.insert(cpu, beat);
                *p.beats.entry(cpu).or_default() += 1;
            }
        }
        assert_eq!(
            p.last_beat.len() as u32,
            vcpus,
            "not every vCPU beat:\n{}",
            self.transcript()
        );
        p
    }
}

/// A unix socket path for a test (short enough for sun_path).
pub fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/cryo-{}-{name}.sock", std::process::id()))
}

/// Runs a `cryo` CLI verb to completion with `--json` output and returns
/// (status, stdout, stderr).
pub fn cryo(args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    run_cryo(&all, Duration::from_secs(120))
}

/// Waits until a unix socket accepts connections.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Boots the test kernel with `vcpus` vCPUs, `mem_mib` MiB, extra command
/// line words and an API socket, and lets it run until every vCPU beat three
/// times and swept twice.
pub fn boot_with_api(vcpus: u32, mem_mib: u64, cmdline: &str, api: &Path) -> (Guest, Progress) {
    boot_with_api_in(None, vcpus, mem_mib, cmdline, api)
}

/// [`boot_with_api`] inside network namespace `netns` when given.
pub fn boot_with_api_in(
    netns: Option<&str>,
    vcpus: u32,
    mem_mib: u64,
    cmdline: &str,
    api: &Path,
) -> (Guest, Progress) {
    boot_with_api_until(netns, vcpus, mem_mib, cmdline, api, (3, 2))
}

/// Boots behind `api` and waits until every vCPU printed `beats`
/// heartbeats and `sweeps` verification sweeps.
fn boot_with_api_until(
    netns: Option<&str>,
    vcpus: u32,
    mem_mib: u64,
    cmdline: &str,
    api: &Path,
    (beats, sweeps): (u64, u64),
) -> (Guest, Progress) {
    let _ = std::fs::remove_file(api);
    let mut cmd = migration::cryo_in(netns);
    cmd.args([
        "run",
        "--kernel",
        test_kernel().to_str().unwrap_or_default(),
        "--vcpus",
        &vcpus.to_string(),
        "--mem-mib",
        &mem_mib.to_string(),
        "--cmdline",
        &format!("console=ttyS0 {cmdline}"),
        "--api",
        api.to_str().unwrap_or_default(),
    ]);
    let mut g = Guest::from_command(cmd);
    assert!(
        wait_for_socket(api, Duration::from_secs(90)),
        "no API socket\n{}",
        g.transcript()
    );
    let p = g.follow(vcpus, beats, sweeps, Duration::from_secs(90));
    (g, p)
}

/// Boots the test kernel behind an API socket like [`boot_with_api`], but
/// returns as soon as every vCPU printed its first heartbeat: the guest is
/// then still filling its memory for the first time.
pub fn boot_with_api_filling(
    vcpus: u32,
    mem_mib: u64,
    cmdline: &str,
    api: &Path,
) -> (Guest, Progress) {
    boot_with_api_until(None, vcpus, mem_mib, cmdline, api, (1, 0))
}

/// `cryo save --api API --to FILE [extra...]`; panics unless it succeeds.
/// Returns the save's JSON result.
pub fn save_vm(api: &Path, to: &Path, extra: &[&str]) -> serde_json::Value {
    verb_to("save", api, to, extra)
}

/// Takes a live snapshot of the running VM behind `api` into `to` (asserting
/// success) and returns its JSON statistics.
pub fn snapshot_vm(api: &Path, to: &Path) -> serde_json::Value {
    verb_to("snapshot", api, to, &[])
}

/// `cryo VERB --api API --to TO [extra...]`, asserting success; its JSON reply.
fn verb_to(verb: &str, api: &Path, to: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        verb,
        "--api",
        api.to_str().unwrap_or_default(),
        "--to",
        to.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    let (status, out, err) = cryo(&args);
    assert_eq!(status, Some(0), "{verb} failed: {out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{verb} printed {out:?}: {e}"))
}

/// `cryo restore --from FILE [--api API] [extra...]` as a running guest.
pub fn restore_vm(file: &Path, api: Option<&Path>, extra: &[&str]) -> Guest {
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        file.display().to_string(),
    ];
    if let Some(api) = api {
        let _ = std::fs::remove_file(api);
        args.push("--api".into());
        args.push(api.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Guest::spawn(args)
}

/// Asserts a restored guest continues a saved one: no reboot, the next
/// heartbeat number (or the one after, if the save cut a line), and a TSC
/// that did not run backwards.
pub fn check_continues(before: &Progress, after: &Progress, vcpus: u32) {
    assert!(!after.booted, "the restored guest booted again");
    for cpu in 0..u64::from(vcpus) {
        let (seq0, tsc0) = before.last_beat[&cpu];
        let (seq1, tsc1) = after.first_beat[&cpu];
        assert!(
            seq1 == seq0 + 1 || seq1 == seq0 + 2,
            "cpu {cpu}: saved at heartbeat {seq0}, restored guest's first is {seq1}"
        );
        assert!(
            tsc1 > tsc0,
            "cpu {cpu}: TSC went backwards: {tsc0} -> {tsc1}"
        );
    }
}

/// A fresh scratch directory for a test.
pub fn workdir(name: &str) -> PathBuf {
    remove_dead_runs_files();
    let d = std::env::temp_dir().join(format!("cryo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create work dir");
    d
}

/// Removes, once per test process, the `cryo-<pid>-*` work directories and
/// sockets that test processes which have ended left in the temp directory
/// (a full suite leaves gigabytes of images there otherwise).
pub fn remove_dead_runs_files() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("cryo-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    });
}

/// Boots the test kernel in fill mode (each of `vcpus` vCPUs fills
/// `share_mib` MiB with incompressible data, then halts) with an API socket
/// named after `name`, and waits for the fill to finish.
pub fn filled_guest(name: &str, vcpus: u32, mem_mib: u64, share_mib: u64) -> (Guest, PathBuf) {
    let api = socket_path(name);
    let _ = std::fs::remove_file(&api);
    let mut g = Guest::spawn([
        "run",
        "--kernel",
        test_kernel().to_str().unwrap_or_default(),
        "--vcpus",
        &vcpus.to_string(),
        "--mem-mib",
        &mem_mib.to_string(),
        "--cmdline",
        &format!("console=ttyS0 cryo.mode=fill cryo.mem={share_mib}"),
        "--api",
        api.to_str().unwrap_or_default(),
    ]);
    assert!(
        wait_for_socket(&api, Duration::from_secs(90)),
        "{}",
        g.transcript()
    );
    let mut filled = 0;
    let ok = g.wait_for(Duration::from_secs(180), |l| {
        if l.starts_with("FILLED") {
            filled += 1;
        }
        filled == vcpus
    });
    assert!(ok.is_some(), "{}", g.transcript());
    (g, api)
}

/// A filesystem the test mounts on a fresh directory (root only), unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    /// `mount -t FSTYPE [-o OPTS] none DIR`; None when mounting is not possible here.
    pub fn new(name: &str, fstype: &str, opts: Option<&str>) -> Option<Mount> {
        let dir = workdir(name);
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if let Some(o) = opts {
            cmd.args(["-o", o]);
        }
        let ok = cmd
            .arg("none")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Mount(dir))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
