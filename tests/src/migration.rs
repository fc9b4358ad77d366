//! Scaffolding of the live-migration tests: a `cryo restore --listen`
//! destination, a `cryo migrate` running in the background, checks that a
//! source runs on, and two emulated hosts (network namespaces joined by a
//! shaped veth link).

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{cryo, cryo_bin, socket_path, Guest};

/// How long one step of a migration test may take.
pub const T: Duration = Duration::from_secs(90);

/// A `cryo` command, run inside network namespace `netns` when given
/// (`ip netns exec NS cryo ...`, which execs cryo itself: the child's pid is
/// cryo's).
pub fn cryo_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(cryo_bin());
            c
        }
        None => Command::new(cryo_bin()),
    }
}

/// A `cryo restore --listen ENDPOINT [extra...]` (inside `netns` when
/// given), once it waits for a migration.
pub fn listen_at(netns: Option<&str>, endpoint: &str, extra: &[&str]) -> Guest {
    let mut cmd = cryo_in(netns);
    cmd.args(["restore", "--listen", endpoint]).args(extra);
    let dest = Guest::from_command(cmd);
    assert!(
        dest.wait_for_stderr(T, |l| l.contains("waiting for a migration")),
        "{}",
        dest.transcript()
    );
    dest
}

/// A `cryo restore --listen` on a fresh Unix socket (or, for a name that
/// starts with `tcp`, a loopback port); returns it and the endpoint.
pub fn listener(name: &str) -> (Guest, String) {
    let endpoint = if name.starts_with("tcp") {
        // A port unlikely to collide: derived from the process id.
        format!("tcp:127.0.0.1:{}", 40000 + std::process::id() % 20000)
    } else {
        let p = socket_path(&format!("{name}-l"));
        let _ = std::fs::remove_file(&p);
        format!("unix:{}", p.display())
    };
    (listen_at(None, &endpoint, &[]), endpoint)
}

/// Starts `cryo migrate --api API --to ENDPOINT [extra...]` in the
/// background (see [`finished`]).
pub fn start_migrate(api: &Path, endpoint: &str, extra: &[&str]) -> Child {
    Command::new(cryo_bin())
        .args(["migrate", "--api", &api.display().to_string(), "--to"])
        .arg(endpoint)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cryo migrate")
}

/// Waits for a background `cryo migrate`: its exit code and its output.
/// Panics (after killing it) if it has not ended within [`T`].
pub fn finished(mut child: Child) -> (Option<i32>, String) {
    let deadline = std::time::Instant::now() + T;
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cryo migrate hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("cryo migrate output");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until `cryo query-progress` says a migration is past `phase`'s
/// start (e.g. "first pass"); panics after [`T`].
pub fn wait_for_phase(api: &Path, phase: &str) {
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        let (_, out, _) = cryo(&["query-progress", "--api", &api.display().to_string()]);
        if out.contains(&format!("\"{phase}\"")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the migration never reached {phase:?}");
}

/// The source still runs: new heartbeats from every one of `vcpus`, and
/// the API says running.
pub fn source_runs_on(src: &mut Guest, api: &Path, vcpus: u32) {
    src.drain();
    src.follow(vcpus, 2, 1, T);
    let (status, out, err) = cryo(&["status", "--api", &api.display().to_string()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    assert!(out.contains("\"running\""), "{out}");
}

/// A destination that gave up: exited non-zero within [`T`] with an error
/// on stderr, and never ran the guest (no console line at all).
pub fn gave_up_cleanly(dest: &mut Guest) -> String {
    let status = dest.wait_exit(T);
    assert!(
        status.is_some(),
        "the destination hangs\n{}",
        dest.transcript()
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{}",
        dest.transcript()
    );
    assert!(
        dest.output().is_empty(),
        "the destination ran the guest\n{}",
        dest.transcript()
    );
    let err = dest.stderr().join("\n");
    assert!(
        err.contains("error: receiving from"),
        "no clear error:\n{err}"
    );
    err
}

/// Two emulated hosts: network namespaces `a` and `b` joined by a veth
/// pair (`va` 10.77.0.1 in `a`, `vb` 10.77.0.2 in `b`), both ends shaped to
/// a slow link. Deleted on drop, which deletes the veth pair too.
pub struct TwoHosts {
    /// Namespace of the source host.
    pub a: String,
    /// Namespace of the destination host.
    pub b: String,
    /// How the link is shaped, for messages.
    pub shaping: String,
}

/// The destination host's address on the link.
pub const HOST_B_IP: &str = "10.77.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TwoHosts {
    /// Sets up the namespaces and a link of `mbit` Mbit/s each way, with a
    /// 5 ms delay where `sch_netem` exists (else rate only, said in
    /// [`TwoHosts::shaping`]). Err: why this host cannot (not root, no
    /// network namespaces, no `ip`/`tc`, no rate-limiting qdisc).
    pub fn new(name: &str, mbit: u32) -> Result<TwoHosts, String> {
        let base = format!("cryo-{}-{name}", std::process::id());
        let mut hosts = TwoHosts {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
            shaping: String::new(),
        };
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        ip(&[
            "link", "add", "va", "netns", &hosts.a, "type", "veth", "peer", "name", "vb", "netns",
            &hosts.b,
        ])?;
        for (ns, dev, addr) in [
            (&hosts.a, "va", "10.77.0.1/24"),
            (&hosts.b, "vb", "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        hosts.shaping = hosts.shape("va", mbit).and(hosts.shape("vb", mbit))?;
        Ok(hosts)
    }

    /// Shapes `dev` (in whichever namespace holds it): netem with delay and
    /// rate, else a token bucket.
    fn shape(&self, dev: &str, mbit: u32) -> Result<String, String> {
        let ns = if dev == "va" { &self.a } else { &self.b };
        let rate = format!("{mbit}mbit");
        let netem = ["delay", "5ms", "rate", &rate];
        let tbf = ["rate", &rate, "burst", "64kb", "latency", "50ms"];
        let tc = |kind: &str, args: &[&str]| {
            Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", kind,
                ])
                .args(args)
                .output()
                .map_err(|e| format!("cannot run tc: {e}"))
                .and_then(|o| {
                    o.status.success().then_some(()).ok_or_else(|| {
                        format!("tc {kind}: {}", String::from_utf8_lossy(&o.stderr).trim())
                    })
                })
        };
        match tc("netem", &netem) {
            Ok(()) => Ok(format!("netem delay 5ms rate {rate}")),
            Err(netem_err) => tc("tbf", &tbf)
                .map(|()| format!("tbf rate {rate}, no delay ({netem_err}: no sch_netem here)"))
                .map_err(|e| format!("{netem_err}; {e}")),
        }
    }

    /// The destination's endpoint on the link.
    pub fn endpoint_b(&self, port: u16) -> String {
        format!("tcp:{HOST_B_IP}:{port}")
    }

    /// Takes `dev` ("va" or "vb") down: the cable is cut.
    pub fn cut(&self, dev: &str) {
        let ns = if dev == "va" { &self.a } else { &self.b };
        ip(&["-n", ns, "link", "set", dev, "down"]).expect("take the link down");
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Two hosts for test `test`, or a visible skip line naming the test and
/// the reason (None).
pub fn two_hosts_or_skip(test: &str, mbit: u32) -> Option<TwoHosts> {
    match TwoHosts::new(test, mbit) {
        Ok(h) => {
            eprintln!("{test}: link {}", h.shaping);
            Some(h)
        }
        Err(why) => {
            // Straight to stderr, past the test harness's capture: the
            // skip shows in a passing run's output.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: cannot emulate two hosts here: {why}"
            );
            None
        }
    }
}
