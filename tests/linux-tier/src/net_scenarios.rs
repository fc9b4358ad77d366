//! Network scenarios: a Linux guest with virtio-net on a persistent host
//! tap. A TCP stream from the guest to the driver keeps flowing, with no
//! number lost or repeated, across a stopped fixed-ram save and a restore in
//! a new cryo process reattached to the same tap; then ping keeps answering
//! both ways across a live snapshot of the restored guest.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use cryo_tests::run_cryo;

use crate::guest::{Failure, LinuxVm};
use crate::report;
use crate::scenarios::{cryo_ok, names, path_str, run_args, strings, take_snapshot, Setup, Tally};
use crate::scenarios::{BEAT_TIMEOUT, BOOT_TIMEOUT, EXIT_TIMEOUT};

/// The host's tap, made persistent so that it outlives each cryo process.
pub(crate) const TAP: &str = "cryotap0";
/// The host's address on the tap.
pub(crate) const HOST_IP: &str = "10.77.0.1";
/// The guest's address.
pub(crate) const GUEST_IP: &str = "10.77.0.2";
/// The port the driver listens on.
const PORT: u16 = 7777;
/// Numbers to see before the save, and after the restore.
const LINES_BEFORE: u64 = 10;
const LINES_AFTER: u64 = 10;
/// How long TCP may take to recover after a restore: both ends back off
/// their retransmissions while the guest is saved, and the nested machine
/// is slow.
pub(crate) const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);
/// Ping replies to see after the live snapshot.
const PINGS_AFTER: u64 = 6;

/// Runs `busybox` with `args` on the host side; fails with its output.
pub(crate) fn host(args: &[&str]) -> Result<String, Failure> {
    let out = Command::new("/bin/busybox")
        .args(args)
        .output()
        .map_err(|e| Failure::plain(format!("busybox {args:?}: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(Failure::plain(format!(
            "busybox {args:?} exited {}: {}",
            out.status,
            text.trim()
        )))
    }
}

/// Creates the persistent tap with the host's address, up.
pub(crate) fn make_tap() -> Result<(), Failure> {
    let _ = host(&["tunctl", "-d", TAP]);
    host(&["tunctl", "-t", TAP])?;
    host(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    host(&["ip", "link", "set", TAP, "up"])?;
    Ok(())
}

/// Accepts one connection on `listener` and sends each line read from it,
/// until it ends or nobody listens. Its handle on the listener is closed as
/// soon as `accept` returns: a killed guest never ends the connection.
fn serve_lines(listener: TcpListener) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let accepted = listener.accept();
        drop(listener);
        let Ok((stream, _)) = accepted else {
            return;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The numbers of `SEQ n` lines received so far.
pub(crate) struct Stream {
    rx: Receiver<String>,
    pub(crate) seen: Vec<u64>,
    /// The listening socket [`serve_lines`] accepts on (a second handle):
    /// shut down when the stream is dropped, which ends an `accept` that
    /// no guest answered, so that the port is free for a set's retry (see
    /// `scenarios::SET_ATTEMPTS`) once the thread's handle is gone too.
    listener: TcpListener,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a socket this handle owns; on a listening
        // socket it wakes a blocked accept(2) with an error.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Stream {
    /// Listens for a TCP stream on `port` of the host's tap address.
    pub(crate) fn listen(port: u16) -> Result<Stream, Failure> {
        Stream::listen_on(HOST_IP, port)
    }

    fn listen_on(ip: &str, port: u16) -> Result<Stream, Failure> {
        let bound = TcpListener::bind((ip, port))
            .and_then(|l| Ok((l.try_clone()?, l)))
            .map_err(|e| Failure::plain(format!("listen on {ip}:{port}: {e}")))?;
        let (listener, served) = bound;
        Ok(Stream {
            rx: serve_lines(served),
            seen: Vec::new(),
            listener,
        })
    }

    /// Waits until `count` numbers have arrived in all.
    pub(crate) fn wait_for(&mut self, count: u64, timeout: Duration) -> Result<(), Failure> {
        let deadline = Instant::now() + timeout;
        while (self.seen.len() as u64) < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.rx.recv_timeout(left).map_err(|_| {
                Failure::plain(format!(
                    "{} of {count} numbers over TCP within {timeout:?} (last {:?})",
                    self.seen.len(),
                    self.seen.last()
                ))
            })?;
            self.take(&line);
        }
        Ok(())
    }

    /// Takes every line that has arrived so far, without waiting: numbers
    /// that arrive after this were sent after it.
    pub(crate) fn drain(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.take(&line);
        }
    }

    fn take(&mut self, line: &str) {
        if let Some(n) = line
            .strip_prefix("SEQ ")
            .and_then(|n| n.trim().parse().ok())
        {
            self.seen.push(n);
        }
    }

    /// Every number from 1 on, once each, in order.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        match self.seen.iter().zip(1u64..).find(|(n, i)| **n != *i) {
            None => Ok(()),
            Some((n, i)) => Err(Failure::plain(format!(
                "number {i} of the TCP stream was {n}: data lost, repeated or reordered"
            ))),
        }
    }
}

/// Runs the network scenarios.
pub fn net_guest(setup: &Setup, tally: &mut Tally) {
    match tcp_save_restore(setup) {
        Ok((detail, mut vm)) => {
            tally.pass(names::NET_TCP_SAVE_RESTORE, &detail);
            let ping = ping_live_snapshot(setup, &mut vm);
            tally.outcome(names::NET_PING_LIVE_SNAPSHOT, ping);
            let _ = cryo_ok(
                &strings(&["quit", "--api", &path_str(&vm.api)]),
                "cryo quit",
            );
            let _ = vm.wait_exit(EXIT_TIMEOUT);
        }
        Err(f) => {
            tally.fail(names::NET_TCP_SAVE_RESTORE, &f);
            tally.not_run_after(
                &[names::NET_PING_LIVE_SNAPSHOT],
                "the TCP save scenario failed",
                &f,
            );
        }
    }
    let _ = host(&["tunctl", "-d", TAP]);
}

/// Boots with a net device on the tap, streams numbers from the guest to
/// the driver over TCP, saves (fixed-ram, stopped), restores in a new
/// process on the same tap, and checks the stream goes on intact. Returns
/// the detail and the running restored VM.
fn tcp_save_restore(setup: &Setup) -> Result<(String, LinuxVm), Failure> {
    make_tap()?;
    let mut stream = Stream::listen(PORT)?;
    let api = setup.work.join("net-vm.sock");
    let net = format!("tap={TAP}");
    let extra = strings(&["--api", &path_str(&api), "--net", &net]);
    let mut vm = LinuxVm::spawn(&run_args(setup, 1, &extra), api.clone());
    vm.wait_init(BOOT_TIMEOUT)?;
    vm.shell(
        &format!("ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && echo NET-UP-$((40+2)) $(cat /sys/class/net/eth0/address)"),
        "NET-UP-42 02:63:72:79:6f:00",
        BOOT_TIMEOUT,
    )
    .map_err(Failure::at(&vm, "eth0 with the default MAC"))?;
    vm.type_line(&format!(
        "(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo SEQ $i; sleep 0.2; done) | nc {HOST_IP} {PORT} &"
    ))?;
    stream
        .wait_for(LINES_BEFORE, BOOT_TIMEOUT)
        .map_err(Failure::at(&vm, "TCP stream before the save"))?;

    let image = setup.work.join("net-vm.img");
    cryo_ok(
        &strings(&["save", "--api", &path_str(&api), "--to", &path_str(&image)]),
        "cryo save",
    )?;
    let code = vm.wait_exit(EXIT_TIMEOUT)?;
    if code != 0 {
        return Err(Failure::of(&vm, format!("the saved VM exited {code}")));
    }
    // Every number the saved guest sent has arrived by now (it has exited,
    // the restore has not started): counted, so that the numbers awaited
    // below are the restored guest's.
    stream.drain();
    let before = stream.seen.len() as u64;
    let mismatch = count_mismatch(&image)?;

    let api2 = setup.work.join("net-vm2.sock");
    let args = strings(&[
        "restore",
        "--from",
        &path_str(&image),
        "--api",
        &path_str(&api2),
        "--net",
        &net,
    ]);
    let mut restored = LinuxVm::spawn(&args, api2);
    restored.heartbeats(2, BEAT_TIMEOUT)?;
    let started = Instant::now();
    stream
        .wait_for(before + LINES_AFTER, RECOVERY_TIMEOUT)
        .map_err(Failure::at(&restored, "TCP stream after the restore"))?;
    report::figure(
        "net_tcp_recovery_after_restore_nested_ms",
        started.elapsed().as_millis(),
        "ms",
    );
    stream
        .check()
        .map_err(Failure::at(&restored, "TCP stream content"))?;
    let _ = std::fs::remove_file(&image);
    Ok((
        format!(
            "{before} numbers before the save, {} after the restore on {TAP}, none lost or repeated; {mismatch}",
            stream.seen.len() as u64 - before
        ),
        restored,
    ))
}

/// A restore naming two taps for the one saved device is refused (exit 2).
fn count_mismatch(image: &Path) -> Result<String, Failure> {
    let (code, _, err) = run_cryo(
        &[
            "restore",
            "--from",
            &path_str(image),
            "--net",
            "tap=cryox1",
            "--net",
            "tap=cryox2",
        ],
        BEAT_TIMEOUT,
    );
    if code != Some(2) || !err.contains("1 network devices but 2 --net") {
        return Err(Failure::plain(format!(
            "a restore with two --net for one device gave {code:?}: {}",
            err.trim()
        )));
    }
    Ok("two --net for one device refused".to_string())
}

/// Pings the host from the guest, takes a live snapshot, and checks the
/// replies go on, then pings the guest from the host.
fn ping_live_snapshot(setup: &Setup, vm: &mut LinuxVm) -> Result<String, Failure> {
    vm.type_line(&format!("ping -i 0.5 {HOST_IP} &"))?;
    // The sequence number of a reply from the host ("64 bytes from HOST: seq=N ...").
    let reply = |l: &str| -> Option<u64> {
        if !l.contains(HOST_IP) {
            return None;
        }
        let rest = &l[l.find("seq=")? + 4..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let mut before = 0;
    vm.wait_line(BOOT_TIMEOUT, |l| {
        before = reply(l).unwrap_or(before);
        before >= 3
    })
    .map_err(Failure::at(vm, "ping before the snapshot"))?;
    let snap = setup.work.join("net-snap.img");
    take_snapshot(&vm.api, &snap).map_err(Failure::with_vm(vm))?;
    let _ = std::fs::remove_file(&snap);
    let mut last = 0;
    let mut after = 0;
    vm.wait_line(BEAT_TIMEOUT, |l| {
        if let Some(s) = reply(l) {
            last = s;
            after += 1;
        }
        after >= PINGS_AFTER
    })
    .map_err(Failure::at(vm, "ping after the snapshot"))?;
    let back = host(&["ping", "-c", "3", "-W", "10", GUEST_IP])
        .map_err(Failure::at(vm, "host pings the guest"))?;
    let received = back
        .lines()
        .find(|l| l.contains("packets received"))
        .unwrap_or("")
        .trim()
        .to_string();
    let _ = vm.type_line("kill %1 %2 2>/dev/null");
    Ok(format!(
        "guest -> host replies {before}..{last}, {PINGS_AFTER} of them after the live snapshot; host -> guest: {received}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    /// A free loopback port, found by binding port 0.
    fn free_port() -> u16 {
        let probe = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        probe.local_addr().unwrap().port()
    }

    #[test]
    fn a_dropped_stream_frees_its_port_whether_or_not_a_peer_came() {
        let port = free_port();
        // Nobody connects: the accept is woken and the port freed.
        drop(Stream::listen_on("127.0.0.1", port).unwrap());
        // A peer connects, sends a line and never hangs up (as a killed
        // guest does).
        let mut stream = Stream::listen_on("127.0.0.1", port).unwrap();
        let mut peer = TcpStream::connect(("127.0.0.1", port)).unwrap();
        peer.write_all(b"SEQ 1\n").unwrap();
        stream.wait_for(1, Duration::from_secs(10)).unwrap();
        drop(stream);
        let again = Stream::listen_on("127.0.0.1", port);
        assert!(again.is_ok(), "{:?}", again.err().map(|f| f.reason));
        drop(peer);
    }
}
