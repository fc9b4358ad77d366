//! Live migration between two emulated hosts (network namespaces joined by
//! a slow veth link, see `cryo_tests::migration::TwoHosts`), with the test
//! kernel as the oracle, and what survives when the source, the destination
//! or the link dies mid-way. A host that cannot emulate two hosts (not root,
//! no network namespaces, no rate-limiting qdisc) prints `SKIPPED <test>:
//! <reason>` for each test.

use std::time::Duration;

use cryo_tests::migration::{
    finished, gave_up_cleanly, listen_at, source_runs_on, start_migrate, two_hosts_or_skip,
    wait_for_phase, TwoHosts, T,
};
use cryo_tests::{boot_with_api_in, check_continues, cryo, socket_path, Guest, Progress};

/// The link between the hosts, Mbit/s each way.
const LINK_MBIT: u32 = 200;
/// The destination's port on host B.
const PORT: u16 = 7000;

/// A 2-vCPU guest of `mem_mib` MiB on host A writing `mib_per_cpu` MiB per
/// vCPU at `rate` pages/s, with an API socket.
fn boot_on_a(
    hosts: &TwoHosts,
    name: &str,
    mem_mib: u64,
    mib_per_cpu: u64,
    rate: u32,
) -> (Guest, std::path::PathBuf) {
    let api = socket_path(name);
    let cmdline = format!("cryo.mem={mib_per_cpu} cryo.hb_ms=200 cryo.rate={rate}");
    let (src, _) = boot_with_api_in(Some(&hosts.a), 2, mem_mib, &cmdline, &api);
    (src, api)
}

/// The source ended after a successful migration and the destination runs
/// the same guest on: no reboot, no MISMATCH, heartbeats continue.
fn continues_on(src: &mut Guest, dest: &mut Guest) -> Progress {
    assert_eq!(
        src.wait_exit(T).and_then(|s| s.code()),
        Some(0),
        "{}",
        src.transcript()
    );
    let before = src.follow_output(2);
    let after = dest.follow(2, 3, 1, T);
    check_continues(&before, &after, 2);
    after
}

/// Migrates a guest writing at `rate` from host A to host B over the slow
/// link; returns the migration's JSON result.
fn across_the_link(test: &str, rate: u32, extra: &[&str]) -> Option<serde_json::Value> {
    let hosts = two_hosts_or_skip(test, LINK_MBIT)?;
    let endpoint = hosts.endpoint_b(PORT);
    let mut dest = listen_at(Some(&hosts.b), &endpoint, &[]);
    let (mut src, api) = boot_on_a(&hosts, test, 128, 16, rate);
    let mut args = vec!["migrate", "--api", api.to_str()?, "--to", &endpoint];
    args.extend_from_slice(extra);
    let (status, out, err) = cryo(&args);
    assert_eq!(status, Some(0), "{out}\n{err}\n{}", dest.transcript());
    let result: serde_json::Value = serde_json::from_str(&out).expect("JSON result");
    continues_on(&mut src, &mut dest);
    Some(result)
}

#[test]
fn an_idle_guest_crosses_a_slow_link() {
    across_the_link("mf-idle", 1, &[]);
}

#[test]
fn a_slowly_writing_guest_crosses_a_slow_link() {
    let r = across_the_link("mf-slow", 500, &["--channels", "2"]);
    if let Some(r) = r {
        assert!(r["rounds"].as_u64().unwrap_or(0) >= 2, "{r}");
    }
}

#[test]
fn a_guest_writing_faster_than_the_link_converges_by_throttling() {
    // Unlimited rewrites of 2 x 16 MiB dirty memory far faster than 25 MB/s
    // drains it: only auto-converge lets the migration finish.
    let r = across_the_link(
        "mf-fast",
        0,
        &["--max-downtime-ms", "300", "--timeout-s", "150"],
    );
    if let Some(r) = r {
        assert!(r["throttle_percent"].as_u64().unwrap_or(0) > 0, "{r}");
    }
}

#[test]
fn ten_hops_back_and_forth_with_the_guest_writing() {
    let mut api = socket_path("mf-hop0");
    let (mut current, _) = boot_with_api_in(
        None,
        2,
        128,
        "cryo.mem=16 cryo.hb_ms=200 cryo.rate=2000",
        &api,
    );
    for hop in 1..=10 {
        let dest_api = socket_path(&format!("mf-hop{hop}"));
        let sock = socket_path(&format!("mf-hop{hop}-l"));
        let endpoint = format!("unix:{}", sock.display());
        let _ = std::fs::remove_file(&dest_api);
        let mut dest = listen_at(
            None,
            &endpoint,
            &["--api", dest_api.to_str().unwrap_or_default()],
        );
        let (status, out, err) = cryo(&[
            "migrate",
            "--api",
            api.to_str().unwrap_or_default(),
            "--to",
            &endpoint,
            "--channels",
            "2",
        ]);
        assert_eq!(
            status,
            Some(0),
            "hop {hop}: {out}\n{err}\n{}",
            dest.transcript()
        );
        continues_on(&mut current, &mut dest);
        let _ = std::fs::remove_file(&api);
        (current, api) = (dest, dest_api);
    }
    let _ = std::fs::remove_file(&api);
}

/// A migration from host A to host B that is under way (in its first pass
/// over the slow link): the hosts, the source, its API socket, the
/// destination and the `cryo migrate` process.
struct UnderWay {
    hosts: TwoHosts,
    src: Guest,
    api: std::path::PathBuf,
    dest: Guest,
    migrate: std::process::Child,
    _api_file: RemoveOnDrop,
}

/// Removes a file (a killed source's API socket) on drop.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn under_way(test: &str, extra: &[&str]) -> Option<UnderWay> {
    let hosts = two_hosts_or_skip(test, LINK_MBIT)?;
    let endpoint = hosts.endpoint_b(PORT);
    let dest = listen_at(Some(&hosts.b), &endpoint, &[]);
    // 2 x 64 MiB in use: about 6 s over the link.
    let (src, api) = boot_on_a(&hosts, test, 256, 64, 500);
    let migrate = start_migrate(&api, &endpoint, extra);
    wait_for_phase(&api, "first pass");
    std::thread::sleep(Duration::from_millis(500));
    Some(UnderWay {
        hosts,
        src,
        _api_file: RemoveOnDrop(api.clone()),
        api,
        dest,
        migrate,
    })
}

#[test]
fn killing_the_source_mid_way_makes_the_destination_give_up() {
    let Some(mut m) = under_way("mf-ksrc", &[]) else {
        return;
    };
    m.src.kill();
    let (code, text) = finished(m.migrate);
    assert_ne!(code, Some(0), "{text}");
    let err = gave_up_cleanly(&mut m.dest);
    eprintln!("destination: {err}");
}

#[test]
fn killing_the_destination_mid_way_leaves_the_source_running_and_able_to_migrate() {
    let Some(mut m) = under_way("mf-kdst", &[]) else {
        return;
    };
    m.dest.kill();
    let (code, text) = finished(m.migrate);
    assert_ne!(code, Some(0), "{text}");
    source_runs_on(&mut m.src, &m.api, 2);
    // Dirty logging was switched off: a second migration starts it again
    // and goes through.
    let endpoint = m.hosts.endpoint_b(PORT + 1);
    let mut dest = listen_at(Some(&m.hosts.b), &endpoint, &[]);
    let api = m.api.to_str().unwrap_or_default();
    let (status, out, err) = cryo(&["migrate", "--api", api, "--to", &endpoint]);
    assert_eq!(status, Some(0), "{out}\n{err}\n{}", dest.transcript());
    continues_on(&mut m.src, &mut dest);
}

#[test]
fn cutting_the_link_mid_way_leaves_the_source_running() {
    let Some(mut m) = under_way("mf-cut", &[]) else {
        return;
    };
    m.hosts.cut("va");
    let (code, text) = finished(m.migrate);
    assert_ne!(code, Some(0), "{text}");
    eprintln!("cryo migrate: {text}");
    source_runs_on(&mut m.src, &m.api, 2);
    let err = gave_up_cleanly(&mut m.dest);
    eprintln!("destination: {err}");
}

#[test]
fn cancel_over_a_slow_link_leaves_the_source_running() {
    let Some(mut m) = under_way("mf-cancel", &[]) else {
        return;
    };
    let (status, out, err) = cryo(&["cancel", "--api", m.api.to_str().unwrap_or_default()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let (code, text) = finished(m.migrate);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("cancelled"), "{text}");
    source_runs_on(&mut m.src, &m.api, 2);
    gave_up_cleanly(&mut m.dest);
}
