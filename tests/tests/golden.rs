//! Golden images: images written by earlier versions of cryo (see
//! `tests/golden/README.md`) restore and run with this one. Each is
//! decompressed into a scratch directory, checked, restored, and the test
//! kernel inside must carry on from where it was saved.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_tests::{
    boot_with_api, check_continues, cryo, restore_vm, run_cryo, save_vm, socket_path, test_kernel,
    workdir, workspace_root, Progress,
};

const T: Duration = Duration::from_secs(90);

/// One golden image and the last heartbeat its guest printed before the save.
struct Golden {
    /// Path under `tests/golden/`.
    file: &'static str,
    /// Heartbeat (seq, tsc) of cpu 0 last printed before the save.
    last_beat: (u64, u64),
    /// `format` and `format_version` as `cryo inspect` reports them.
    format: (&'static str, u32),
    /// Whether the image records its writer and kernel (machine section 2 on).
    records_writer: bool,
    /// The CPU vendor of the host that wrote it (CPUID leaf 0).
    saved_on: &'static str,
}

const V1_FIXED_RAM: Golden = Golden {
    file: "v1/fixed-ram.cryo.zst",
    last_beat: (19, 14168911228278),
    format: ("fixed-ram", 1),
    records_writer: false,
    saved_on: "GenuineIntel",
};

const V1_STREAM: Golden = Golden {
    file: "v1/stream.cryo.zst",
    last_beat: (19, 14179940457980),
    format: ("stream", 1),
    records_writer: false,
    saved_on: "GenuineIntel",
};

const V2_FIXED_RAM: Golden = Golden {
    file: "v2/fixed-ram.cryo.zst",
    last_beat: (19, 15378487779850),
    format: ("fixed-ram", 2),
    records_writer: true,
    saved_on: "GenuineIntel",
};

const V2_STREAM: Golden = Golden {
    file: "v2/stream.cryo.zst",
    last_beat: (19, 15389386236098),
    format: ("stream", 1),
    records_writer: true,
    saved_on: "GenuineIntel",
};

/// Decompresses a golden image into a fresh scratch directory.
fn unpack(g: &Golden, name: &str) -> PathBuf {
    let src = workspace_root().join("tests/golden").join(g.file);
    let compressed =
        std::fs::read(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let bytes = zstd::decode_all(compressed.as_slice())
        .unwrap_or_else(|e| panic!("decompressing {}: {e}", src.display()));
    let path = workdir(&format!("golden-{name}")).join("vm.cryo");
    std::fs::write(&path, bytes).expect("write golden image");
    path
}

/// This host's CPU vendor, from /proc/cpuinfo.
fn host_vendor() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_default()
}

/// Restores `file` with `extra` restore arguments and checks that the guest
/// continues from `g.last_beat`; on a host of another CPU vendor than the
/// writer's, prints a visible skip instead.
fn restores_and_runs(g: &Golden, file: &Path, extra: &[&str]) {
    let host = host_vendor();
    if host != g.saved_on {
        // The vCPU state of one vendor's CPU does not load into the
        // other's (KVM refuses IA32_ARCH_CAPABILITIES, for one): the format
        // was read above, the run needs a host like the writer's.
        // Straight to the process's stderr, past the test harness's
        // capture, so that the skip shows in a passing run's output.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: golden {} restore {extra:?}: written on a {} host, this host is {host}; \
             its format was read and checked, running it needs a {} host",
            g.file,
            g.saved_on,
            g.saved_on
        );
        return;
    }
    let before = Progress {
        last_beat: BTreeMap::from([(0, g.last_beat)]),
        ..Progress::default()
    };
    // The images were saved on one host; CI may run on a host with another
    // TSC frequency (the guest then keeps running, its clock at another rate).
    let mut args = vec!["--allow-tsc-mismatch"];
    args.extend_from_slice(extra);
    let mut r = restore_vm(file, None, &args);
    let after = r.follow(1, 3, 2, T);
    check_continues(&before, &after, 1);
    r.kill();
}

/// `cryo inspect` reads the image: its format, and the VM's configuration
/// (a v1 image did not record its writer or kernel).
fn inspects(file: &Path, g: &Golden) {
    let (status, out, err) = cryo(&["inspect", file.to_str().unwrap_or_default()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect prints JSON");
    assert_eq!(v["format"], g.format.0, "{out}");
    assert_eq!(v["format_version"], g.format.1, "{out}");
    assert_eq!(v["vm"]["vcpus"], 1, "{out}");
    assert_eq!(v["vm"]["mem_mib"], 8, "{out}");
    assert_eq!(
        v["vm"]["cmdline"], "console=ttyS0 cryo.mem=1 cryo.hb_ms=200",
        "{out}"
    );
    assert_eq!(
        v["vm"]["devices"],
        serde_json::json!(["serial", "i8042", "cmos"]),
        "{out}"
    );
    let kernel = v["vm"]["kernel"].as_str().unwrap_or_default();
    if g.records_writer {
        assert_eq!(v["writer"], "cryo 0.1.0", "{out}");
        assert!(kernel.ends_with("cryo-test-kernel.elf"), "{out}");
    } else {
        assert_eq!(v["writer"], "", "{out}");
        assert_eq!(kernel, "", "{out}");
    }
}

/// Inspects, verifies (`cryo verify`) and restores a fixed-ram golden image
/// eagerly and lazily.
fn fixed_ram_golden(g: &Golden, name: &str) {
    let file = unpack(g, name);
    inspects(&file, g);
    let (status, out, err) = cryo(&["verify", file.to_str().unwrap_or_default()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    restores_and_runs(g, &file, &[]);
    restores_and_runs(g, &file, &["--lazy"]);
}

/// Inspects and restores a stream golden image.
fn stream_golden(g: &Golden, name: &str) {
    let file = unpack(g, name);
    inspects(&file, g);
    restores_and_runs(g, &file, &[]);
}

#[test]
fn v1_fixed_ram() {
    fixed_ram_golden(&V1_FIXED_RAM, "v1-fr");
}

#[test]
fn v1_stream() {
    stream_golden(&V1_STREAM, "v1-stream");
}

#[test]
fn v2_fixed_ram() {
    fixed_ram_golden(&V2_FIXED_RAM, "v2-fr");
}

#[test]
fn v2_stream() {
    stream_golden(&V2_STREAM, "v2-stream");
}

/// An image written now records this cryo as its writer, and the kernel.
#[test]
fn new_images_record_writer_and_kernel() {
    let dir = workdir("golden-new");
    for format in ["fixed-ram", "stream"] {
        let api = socket_path(&format!("golden-new-{format}"));
        let file = dir.join(format!("{format}.cryo"));
        let (mut g, _) = boot_with_api(1, 8, "cryo.mem=1 cryo.hb_ms=200", &api);
        save_vm(&api, &file, &["--format", format]);
        g.wait_exit(T);
        let (status, out, err) = cryo(&["inspect", file.to_str().unwrap_or_default()]);
        assert_eq!(status, Some(0), "{out}\n{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect prints JSON");
        // `cryo --version` prints "cryo X.Y.Z", the string an image records.
        let (_, version, _) = run_cryo(&["--version"], T);
        assert_eq!(v["writer"], version.trim(), "{out}");
        assert_eq!(
            v["vm"]["kernel"],
            test_kernel().display().to_string(),
            "{out}"
        );
        assert_eq!(v["vm"]["vcpus"], 1, "{out}");
    }
}
