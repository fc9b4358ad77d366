//! QEMU beside cryo in `cryo bench migrate`: the same test kernel, guest
//! size, hot set, write rate, channels, downtime limit and link limit,
//! migrated live by QEMU (multifd, auto-converge) over loopback TCP, in the
//! same run and right after cryo's migration of that rate, so that both see
//! the same host.
//!
//! QEMU boots the test kernel through its PVH entry (`-kernel`), with COM1
//! in a file. Its figures are its own (`query-migrate`): total time, its
//! downtime (stop to completion, like cryo's pause), RAM bytes sent and
//! dirty-sync rounds. The guest's write rate before and during comes from
//! the heartbeats printed in the two seconds before the migration and
//! during it, told apart by where the console file ended at each moment.
//! By default neither QEMU preallocates its memory, as cryo does not. Then
//! QEMU's first pass reads every never-touched page of the guest, and each
//! such read faults in a page, where cryo skips those pages unread. With
//! `prealloc` (`-mem-prealloc`) both QEMUs fault in all guest memory at
//! start, before the migration and outside its total time.
//! QEMU restores a migrated guest's TSC to its value at the stop, so its
//! guests' TSC stamps do not show the pause: no guest-visible gap is given
//! for QEMU.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::bench_snapshot::{heartbeats_in, rate as write_rate};

/// The QEMU binary run beside cryo.
pub const QEMU: &str = "qemu-system-x86_64";

/// How long QMP may take to answer one command, or to greet: a QEMU
/// preallocating its memory greets only once that is done (tens of seconds
/// for 4 GiB where faulting in fresh memory is slow).
const QMP_TIMEOUT: Duration = Duration::from_secs(300);

/// What QEMU is asked to migrate, and how: the same as cryo's run.
pub struct QemuShape<'a> {
    /// Where the consoles and QMP sockets go.
    pub dir: &'a Path,
    /// The test kernel (ELF with a PVH note).
    pub kernel: &'a Path,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The kernel command line (hot set, rate, heartbeat).
    pub cmdline: String,
    /// multifd channels.
    pub channels: usize,
    /// `downtime-limit`, ms.
    pub max_downtime_ms: u64,
    /// `max-bandwidth`, bytes/s (None: no limit).
    pub max_bandwidth: Option<u64>,
    /// Give the migration up after this long.
    pub timeout: Duration,
    /// Run both QEMUs with `-mem-prealloc`.
    pub prealloc: bool,
}

/// QEMU's live migration of one write rate.
#[derive(Serialize, Default, Debug)]
pub struct QemuFigures {
    /// Completed, and the destination's guest beat on every vCPU with no
    /// mismatch.
    pub ok: bool,
    /// Why not (or why QEMU was not run).
    pub error: Option<String>,
    /// `qemu-system-x86_64 --version`, first line.
    pub version: String,
    /// QEMU's `total-time`, s.
    pub total_s: f64,
    /// QEMU's `downtime`, ms: from the stop to the completion.
    pub downtime_ms: f64,
    /// QEMU's `ram.dirty-sync-count`.
    pub rounds: u64,
    /// RAM bytes sent (`ram.transferred`) over guest RAM.
    pub bytes_over_ram: f64,
    /// `cpu-throttle-percentage` at the end (auto-converge).
    pub throttle_percent: u64,
    /// The guest's page writes per second in the 2 s before.
    pub write_rate_before_pages_s: f64,
    /// And during the migration.
    pub write_rate_during_pages_s: f64,
    /// During over before.
    pub during_over_before: f64,
}

impl QemuFigures {
    fn failed(version: String, error: String) -> Self {
        QemuFigures {
            version,
            error: Some(error),
            ..Default::default()
        }
    }
}

/// The installed QEMU's version line, or why there is none.
pub fn version() -> Result<String, String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("{QEMU} not found ({e}); install qemu-system-x86 (10.x from bookworm-backports) or pass --no-qemu"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Boots the guest in QEMU, lets it fill its hot set, migrates it live to a
/// second QEMU and reports QEMU's figures. Never fails: a failure is
/// reported in the figures.
pub fn migrate(shape: &QemuShape) -> QemuFigures {
    let version = match version() {
        Ok(v) => v,
        Err(e) => return QemuFigures::failed(String::new(), e),
    };
    match run(shape) {
        Ok(mut f) => {
            f.version = version;
            f
        }
        Err(e) => QemuFigures::failed(version, e),
    }
}

fn run(shape: &QemuShape) -> Result<QemuFigures, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let src = Qemu::start(shape, "src", false)?;
    let dst = Qemu::start(shape, "dst", true)?;
    let (mut src_qmp, mut dst_qmp) = (src.qmp()?, dst.qmp()?);
    crate::bench_migrate::wait_writing(&src.console, shape.vcpus, Duration::from_secs(1200))
        .map_err(|e| format!("the QEMU guest: {e}"))?;
    let bandwidth = shape.max_bandwidth.unwrap_or(100_000_000_000);
    for (qmp, params) in [
        (&mut dst_qmp, json!({"multifd-channels": shape.channels})),
        (
            &mut src_qmp,
            json!({
                "multifd-channels": shape.channels,
                "downtime-limit": shape.max_downtime_ms,
                "max-bandwidth": bandwidth,
            }),
        ),
    ] {
        let caps = json!({"capabilities": [
            {"capability": "multifd", "state": true},
            {"capability": "auto-converge", "state": true},
        ]});
        qmp.call("migrate-set-capabilities", caps)?;
        qmp.call("migrate-set-parameters", params)?;
    }
    dst_qmp.call("migrate-incoming", json!({ "uri": uri }))?;
    let before_from = console_len(&src.console);
    std::thread::sleep(Duration::from_secs(2));
    let before_to = console_len(&src.console);
    src_qmp.call("migrate", json!({ "uri": uri }))?;
    let info = wait_completed(&mut src_qmp, shape.timeout)?;
    let during_to = console_len(&src.console);
    // Its console starts empty (it runs only once migrated): any stamp is
    // one after the switch.
    crate::bench_migrate::wait_beats_after(&dst.console, shape.vcpus, 0, Duration::from_secs(60))
        .map_err(|e| format!("QEMU: {e}"))?;
    let text = std::fs::read_to_string(&src.console).unwrap_or_default();
    let tsc_hz = tsc_hz(&text);
    let slice = |from: usize, to: usize| heartbeats_in(text.get(from..to).unwrap_or_default());
    let before = write_rate(&slice(before_from, before_to), 0, u64::MAX, tsc_hz);
    let during = write_rate(&slice(before_to, during_to), 0, u64::MAX, tsc_hz);
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ram = &info["ram"];
    Ok(QemuFigures {
        ok: true,
        error: None,
        version: String::new(),
        total_s: num(&info["total-time"]) / 1e3,
        downtime_ms: num(&info["downtime"]),
        rounds: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        bytes_over_ram: num(&ram["transferred"]) / (shape.mem_mib << 20) as f64,
        throttle_percent: info["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        write_rate_before_pages_s: before,
        write_rate_during_pages_s: during,
        during_over_before: if before > 0.0 { during / before } else { 0.0 },
    })
}

/// Polls `query-migrate` until it completes; its last answer. A migration
/// that fails or outlasts `timeout` is an error (cancelled first).
fn wait_completed(qmp: &mut Qmp, timeout: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.call("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(format!(
                    "QEMU's migration {}: {}",
                    info["status"],
                    info["error-desc"].as_str().unwrap_or("no reason given")
                ))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = qmp.call("migrate_cancel", json!({}));
            return Err(format!(
                "QEMU's migration did not finish within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The console file's length now, bytes.
fn console_len(console: &Path) -> usize {
    std::fs::metadata(console).map_or(0, |m| m.len() as usize)
}

/// The guest's TSC rate, from its boot line (`tsc_khz=`) in its console.
fn tsc_hz(console: &str) -> f64 {
    let khz = console
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tsc_khz="))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    khz.max(1.0) * 1e3
}

/// One QEMU process, killed and its files removed on drop.
struct Qemu {
    child: Child,
    console: PathBuf,
    qmp: PathBuf,
    /// Its standard error.
    log: PathBuf,
}

impl Qemu {
    fn start(shape: &QemuShape, tag: &str, incoming: bool) -> Result<Qemu, String> {
        let base = shape
            .dir
            .join(format!(".cryo-bench-qemu-{tag}-{}", std::process::id()));
        let (console, qmp) = (base.with_extension("console"), base.with_extension("qmp"));
        let log = base.with_extension("log");
        let _ = std::fs::remove_file(&qmp);
        let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-m", &format!("{}M", shape.mem_mib)])
            .args(["-smp", &shape.vcpus.to_string()])
            .arg("-kernel")
            .arg(shape.kernel)
            .args(["-append", &shape.cmdline])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if shape.prealloc {
            cmd.arg("-mem-prealloc");
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {QEMU}: {e}"))?;
        Ok(Qemu {
            child,
            console,
            qmp,
            log,
        })
    }

    /// Connects to its QMP socket (waiting for QEMU to create it); a
    /// failure says what QEMU printed.
    fn qmp(&self) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let failed = |what: String| {
            let said = std::fs::read_to_string(&self.log).unwrap_or_default();
            format!("{what}; QEMU said: {}", said.trim())
        };
        loop {
            match UnixStream::connect(&self.qmp) {
                Ok(s) => return Qmp::handshake(s).map_err(failed),
                Err(e) if Instant::now() > deadline => {
                    return Err(failed(format!(
                        "QEMU's QMP socket {}: {e}",
                        self.qmp.display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.console);
        let _ = std::fs::remove_file(&self.qmp);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation mode.
    fn handshake(stream: UnixStream) -> Result<Qmp, String> {
        let io = |e: std::io::Error| format!("QMP: {e}");
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.read()?;
        qmp.call("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP: QEMU closed the connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `command` with `arguments`; its `return` value. Events that
    /// arrive meanwhile are skipped.
    fn call(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let answer = self.read()?;
            if let Some(r) = answer.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = answer.get("error") {
                return Err(format!(
                    "QMP {command}: {}",
                    e["desc"].as_str().unwrap_or("error")
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QMP peer that greets, then answers each request line with the
    /// given lines.
    fn peer(answers: Vec<Vec<&'static str>>) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut requests = Vec::new();
            for lines in answers {
                let mut req = String::new();
                if r.read_line(&mut req).unwrap() == 0 {
                    break;
                }
                requests.push(req.trim().to_string());
                for l in lines {
                    writeln!(w, "{l}").unwrap();
                }
            }
            requests
        });
        (ours, h)
    }

    #[test]
    fn qmp_skips_events_and_returns_the_answer() {
        let (s, h) = peer(vec![
            vec![r#"{"return": {}}"#],
            vec![
                r#"{"event": "MIGRATION", "data": {"status": "active"}}"#,
                r#"{"return": {"status": "completed", "total-time": 1234}}"#,
            ],
            vec![r#"{"error": {"class": "GenericError", "desc": "no such thing"}}"#],
        ]);
        let mut q = Qmp::handshake(s).unwrap();
        let info = q.call("query-migrate", json!({})).unwrap();
        assert_eq!(info["total-time"], 1234);
        let err = q.call("bogus", json!({"a": 1})).unwrap_err();
        assert!(err.contains("no such thing"), "{err}");
        drop(q);
        let requests = h.join().unwrap();
        assert!(requests[0].contains("qmp_capabilities"));
        assert!(
            requests[2].contains(r#""arguments":{"a":1}"#),
            "{}",
            requests[2]
        );
    }

    #[test]
    fn a_closed_qmp_connection_is_an_error() {
        let (s, h) = peer(vec![]);
        assert!(Qmp::handshake(s).is_err());
        h.join().unwrap();
    }

    #[test]
    fn the_tsc_rate_comes_from_the_boot_line() {
        let console = "cpus=2 apic_ids=0,1 tsc_khz=2601073 tsc_source=pit\n";
        assert_eq!(tsc_hz(console), 2_601_073_000.0);
    }
}
