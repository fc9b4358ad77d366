//! Golden images: images written by earlier versions of cryo (see
//! `tests/golden/README.md`) restore and run with this one. Each is
//! decompressed into a scratch directory, checked, restored, and the test
//! kernel inside must carry on from where it was saved.

use std::collections::BTreeMap;
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
}

const V1_FIXED_RAM: Golden = Golden {
    file: "v1/fixed-ram.cryo.zst",
    last_beat: (19, 14168911228278),
};

const V1_STREAM: Golden = Golden {
    file: "v1/stream.cryo.zst",
    last_beat: (19, 14179940457980),
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

/// Restores `file` with `extra` restore arguments and checks that the guest
/// continues from `g.last_beat`.
fn restores_and_runs(g: &Golden, file: &Path, extra: &[&str]) {
    let before = Progress {
        last_beat: BTreeMap::from([(0, g.last_beat)]),
        ..Progress::default()
    };
    let mut r = restore_vm(file, None, extra);
    let after = r.follow(1, 3, 2, T);
    check_continues(&before, &after, 1);
    r.kill();
}

/// `cryo inspect` reads the image: its format, and the VM's configuration
/// (a v1 image did not record its writer or kernel).
fn inspects(file: &Path, format: &str) {
    let (status, out, err) = cryo(&["inspect", file.to_str().unwrap_or_default()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect prints JSON");
    assert_eq!(v["format"], format, "{out}");
    assert_eq!(v["format_version"], 1, "{out}");
    assert_eq!(v["writer"], "", "{out}");
    assert_eq!(v["vm"]["vcpus"], 1, "{out}");
    assert_eq!(v["vm"]["mem_mib"], 8, "{out}");
    assert_eq!(
        v["vm"]["cmdline"], "console=ttyS0 cryo.mem=1 cryo.hb_ms=200",
        "{out}"
    );
    assert_eq!(v["vm"]["kernel"], "", "{out}");
    assert_eq!(
        v["vm"]["devices"],
        serde_json::json!(["serial", "i8042", "cmos"]),
        "{out}"
    );
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

#[test]
fn v1_fixed_ram_restores_eagerly() {
    let file = unpack(&V1_FIXED_RAM, "v1-fr-eager");
    inspects(&file, "fixed-ram");
    let (status, out, err) = cryo(&["verify", file.to_str().unwrap_or_default()]);
    assert_eq!(status, Some(0), "{out}\n{err}");
    restores_and_runs(&V1_FIXED_RAM, &file, &[]);
}

#[test]
fn v1_fixed_ram_restores_lazily() {
    let file = unpack(&V1_FIXED_RAM, "v1-fr-lazy");
    restores_and_runs(&V1_FIXED_RAM, &file, &["--lazy"]);
}

#[test]
fn v1_stream_restores() {
    let file = unpack(&V1_STREAM, "v1-stream");
    inspects(&file, "stream");
    restores_and_runs(&V1_STREAM, &file, &[]);
}
