//! Live save (`cryo save --live`) with the test kernel as the oracle: the
//! guest runs while its RAM is written into a fixed-ram image, rounds of
//! dirty pages are rewritten in place, and the restored guest continues from
//! where the save ended (its heartbeats follow the last one the source
//! printed before it paused), with no mismatch and no reboot. Cancel and the
//! time limit leave the source running and no file under the name (a
//! previous image there untouched).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cryo_tests::{
    boot_with_api, check_continues, cryo, cryo_bin, restore_vm, save_vm, socket_path, workdir,
    Guest,
};

const T: Duration = Duration::from_secs(90);

/// Live-saves a guest booted with `cmdline` (the VM ends after the save, as
/// after a stopped save), checks the image with `cryo verify`, restores it
/// and checks that the guest continues from the end of the save.
fn live_save(name: &str, cmdline: &str, extra: &[&str]) -> serde_json::Value {
    let dir = workdir(name);
    let image = dir.join("vm.cryo");
    let api = socket_path(name);
    let (mut src, _) = boot_with_api(2, 64, &format!("cryo.mem=8 cryo.hb_ms=200 {cmdline}"), &api);
    let mut args = vec!["--live"];
    args.extend_from_slice(extra);
    let result = save_vm(&api, &image, &args);
    assert!(result["rounds"].as_u64().unwrap_or(0) >= 2, "{result}");
    assert!(result["pages_sent"].as_u64().unwrap_or(0) > 0, "{result}");
    assert_eq!(result["format"], "fixed-ram", "{result}");
    // Without --keep-running the VM ends once the image is committed.
    assert_eq!(src.wait_exit(T).and_then(|s| s.code()), Some(0));
    let before = src.follow_output(2);
    let (status, out, err) = cryo(&["verify", image.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let mut dest = restore_vm(&image, None, &[]);
    let after = dest.follow(2, 3, 2, T);
    check_continues(&before, &after, 2);
    dest.kill();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn live_save_of_a_nearly_idle_guest() {
    live_save(
        "ls-idle",
        "cryo.rate=10",
        &["--channels", "2", "--priority", "transfer"],
    );
}

#[test]
fn live_save_of_a_writing_guest_restores_where_the_save_ended() {
    // The guest rewrites 4000 pages a second per vCPU; the downtime limit is
    // generous so that a debug build on a busy host converges too.
    live_save(
        "ls-writing",
        "cryo.rate=4000",
        &["--channels", "3", "--max-downtime-ms", "500"],
    );
}

#[test]
fn a_guest_writing_faster_than_the_disk_limit_converges_by_auto_converge() {
    // Unlimited rewrites dirty the working set far faster than 20 MB/s of
    // writes drain it: only throttling the vCPUs lets it converge.
    let result = live_save(
        "ls-converge",
        "cryo.rate=0",
        &["--max-bandwidth", "20", "--timeout-s", "120"],
    );
    assert!(
        result["throttle_percent"].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
}

#[test]
fn keep_running_leaves_the_source_running_and_the_image_restores() {
    let dir = workdir("ls-keep");
    let image = dir.join("vm.cryo");
    let api = socket_path("ls-keep");
    let (mut src, _) = boot_with_api(2, 64, "cryo.mem=8 cryo.hb_ms=200 cryo.rate=1000", &api);
    save_vm(&api, &image, &["--live", "--keep-running"]);
    source_runs_on(&mut src, &api);
    let mut dest = restore_vm(&image, None, &[]);
    let after = dest.follow(2, 3, 2, T);
    assert!(!after.booted, "the restored guest booted again");
    dest.kill();
    src.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A live save slowed down to 4 MB/s, so that it is still under way when
/// the test interferes. A stopped save first puts a good image at the name.
struct SlowSave {
    src: Guest,
    api: PathBuf,
    dir: PathBuf,
    image: PathBuf,
    previous: Vec<u8>,
    save: Child,
}

fn slow_save(name: &str, extra: &[&str]) -> SlowSave {
    let dir = workdir(name);
    let image = dir.join("vm.cryo");
    let api = socket_path(name);
    let (src, _) = boot_with_api(2, 64, "cryo.mem=8 cryo.hb_ms=200", &api);
    save_vm(&api, &image, &["--keep-running"]);
    let previous = std::fs::read(&image).expect("the previous image");
    let save = Command::new(cryo_bin())
        .args(["save", "--api", api.to_str().unwrap(), "--to"])
        .arg(&image)
        .args(["--live", "--max-bandwidth", "4"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cryo save --live");
    std::thread::sleep(Duration::from_millis(800));
    SlowSave {
        src,
        api,
        dir,
        image,
        previous,
        save,
    }
}

impl SlowSave {
    /// The save failed, saying `why`; the source runs on; the previous
    /// image is untouched and no temporary file is left.
    fn failed_cleanly(mut self, why: &str) {
        let out = self.save.wait_with_output().expect("cryo save output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(0), "{text}");
        assert!(text.contains(why), "{text}");
        source_runs_on(&mut self.src, &self.api);
        let now = std::fs::read(&self.image).expect("the image is still there");
        assert!(now == self.previous, "the previous image changed");
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .expect("list the directory")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["vm.cryo"], "files left behind");
        self.src.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The source still runs: new heartbeats, and the API says running.
fn source_runs_on(src: &mut Guest, api: &Path) {
    src.drain();
    src.follow(2, 2, 1, T);
    let (status, out, err) = cryo(&["status", "--api", api.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    assert!(out.contains("\"running\""), "{out}");
}

#[test]
fn cancel_mid_way_leaves_the_source_running_and_the_previous_image() {
    let s = slow_save("ls-cancel", &[]);
    let api = s.api.to_str().unwrap().to_string();
    let (status, out, err) = cryo(&["query-progress", "--api", &api]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    assert!(
        out.contains("\"save\"") && out.contains("\"first pass\""),
        "{out}"
    );
    let (status, out, err) = cryo(&["cancel", "--api", &api]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    s.failed_cleanly("cancelled");
}

#[test]
fn the_time_limit_leaves_the_source_running_and_the_previous_image() {
    let s = slow_save("ls-timeout", &["--timeout-s", "1"]);
    s.failed_cleanly("did not finish within 1 s");
}

#[test]
fn live_save_requests_that_cannot_be_are_refused_and_the_vm_runs_on() {
    let api = socket_path("ls-bad");
    let dir = workdir("ls-bad");
    let (mut src, _) = boot_with_api(1, 64, "cryo.mem=4 cryo.hb_ms=200", &api);
    let api_arg = api.to_str().unwrap();
    let file = dir.join("vm.cryo");
    let file_arg = file.to_str().unwrap();
    let peer = format!("unix:{}", dir.join("peer.sock").display());
    let cases: [(&[&str], &str); 4] = [
        (&["--to", &peer, "--live"], "use migrate"),
        (
            &["--to", file_arg, "--live", "--format", "stream"],
            "fixed-ram",
        ),
        (&["--to", file_arg, "--max-bandwidth", "5"], "--live"),
        (&["--to", file_arg, "--priority", "transfer"], "--live"),
    ];
    for (args, why) in cases {
        let mut all = vec!["save", "--api", api_arg];
        all.extend_from_slice(args);
        let (status, out, err) = cryo(&all);
        assert_eq!(status, Some(2), "{args:?}: {out}\n{err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert!(!file.exists());
    src.follow(1, 2, 1, T);
    src.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
