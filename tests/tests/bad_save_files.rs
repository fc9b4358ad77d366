//! Hostile stream save files (fixed-ram images have their own tests in
//! fixed_ram.rs and the fixed-ram crate): truncated, corrupted, forged. Each restore attempt
//! must end with one clear error and exit status 2, never a panic, and never
//! a running guest.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use cryo_tests::{cryo, socket_path, test_kernel, wait_for_socket, Guest};
use migration_stream::{PagesKind, Record, StreamReader, StreamWriter};

const T: Duration = Duration::from_secs(90);

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cryo-badsave-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One valid save file of a small 1-vCPU guest, made once per test binary.
fn valid_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let api = socket_path("badsave");
        let file = dir().join("valid.cryo");
        let _ = std::fs::remove_file(&api);
        let mut g = Guest::spawn([
            "run",
            "--kernel",
            test_kernel().to_str().unwrap(),
            "--mem-mib",
            "16",
            "--cmdline",
            "console=ttyS0 cryo.mem=2 cryo.hb_ms=200",
            "--api",
            api.to_str().unwrap(),
        ]);
        assert!(wait_for_socket(&api, T));
        g.follow(1, 2, 1, T);
        let (status, _, err) = cryo(&[
            "save",
            "--api",
            api.to_str().unwrap(),
            "--to",
            file.to_str().unwrap(),
            "--format",
            "stream",
        ]);
        assert_eq!(status, Some(0), "{err}");
        assert!(g.wait_exit(T).is_some());
        file
    })
}

/// Record boundaries: (offset, type, payload length).
fn records(bytes: &[u8]) -> Vec<(usize, u16, usize)> {
    let mut out = Vec::new();
    let mut off = 20;
    while off + 8 <= bytes.len() {
        let kind = u16::from_le_bytes([bytes[off], bytes[off + 1]]);
        let len = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap()) as usize;
        out.push((off, kind, len));
        off += 8 + len + 4;
    }
    out
}

/// Restores `bytes` and expects exit status 2 with `needle` in one stderr line.
fn expect_refused(name: &str, bytes: &[u8], needle: &str) {
    let path = dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    let (status, out, err) = cryo(&["restore", "--from", path.to_str().unwrap()]);
    assert_eq!(
        status,
        Some(2),
        "{name}: status {status:?}\nstdout: {out}\nstderr: {err}"
    );
    assert!(!err.contains("panicked"), "{name}: {err}");
    assert!(out.is_empty(), "{name}: the guest ran: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{name}: {err}");
    assert!(lines[0].starts_with("cryo: error: "), "{name}: {err}");
    assert!(
        lines[0].contains(needle),
        "{name}: expected {needle:?} in {err}"
    );
}

#[test]
fn truncated_at_many_offsets() {
    let bytes = std::fs::read(valid_file()).unwrap();
    let recs = records(&bytes);
    let mut cuts: Vec<usize> = vec![0, 1, 7, 8, 12, 19, 20, 21, 27, 28];
    for (off, _, len) in recs.iter().take(12) {
        cuts.extend([*off + 3, *off + 8, *off + 8 + len / 2, *off + 8 + len + 2]);
    }
    // Inside the RAM and just before the end.
    cuts.extend([
        bytes.len() / 2,
        bytes.len() * 3 / 4,
        bytes.len() - 13,
        bytes.len() - 1,
    ]);
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        if cut >= bytes.len() {
            continue;
        }
        expect_refused(&format!("trunc-{cut}"), &bytes[..cut], "");
    }
}

#[test]
fn empty_file() {
    expect_refused("empty", &[], "");
}

#[test]
fn wrong_magic() {
    let mut bytes = std::fs::read(valid_file()).unwrap();
    bytes[0..8].copy_from_slice(b"QEVM\0\0\0\x03");
    expect_refused("magic", &bytes, "not a cryo image");
}

#[test]
fn flipped_byte_in_a_device_section() {
    let mut bytes = std::fs::read(valid_file()).unwrap();
    let (off, _, len) = records(&bytes)
        .into_iter()
        .find(|(_, kind, len)| *kind == 1 && *len > 200)
        .expect("a vcpu-sized section");
    bytes[off + 8 + len / 2] ^= 0x20;
    expect_refused("flip-section", &bytes, "checksum");
}

#[test]
fn flipped_byte_in_a_ram_record() {
    let mut bytes = std::fs::read(valid_file()).unwrap();
    let (off, _, len) = records(&bytes)
        .into_iter()
        .find(|(_, kind, len)| *kind == 3 && *len > 4096)
        .expect("a raw page record");
    bytes[off + 8 + len - 100] ^= 0x01;
    expect_refused("flip-ram", &bytes, "checksum");
}

/// Re-writes the valid file through the stream API, letting `edit` change
/// sections (return None to drop one) and `extra` add sections at the end of
/// the device state.
fn rewrite(
    edit: impl Fn(&migration_stream::Section) -> Option<(String, u32, u32, Vec<u8>)>,
    extra: Option<(&str, u32, u32, Vec<u8>)>,
) -> Vec<u8> {
    let bytes = std::fs::read(valid_file()).unwrap();
    let mut r = StreamReader::new(bytes.as_slice()).unwrap();
    let mut w = StreamWriter::new(Vec::new(), r.page_size()).unwrap();
    let mut extra = extra;
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Section(s) => {
                if let Some((name, inst, ver, data)) = edit(&s) {
                    w.write_raw_section(&name, inst, ver, &data).unwrap();
                }
            }
            Record::RamLayout(l) => {
                if let Some((name, inst, ver, data)) = extra.take() {
                    w.write_raw_section(name, inst, ver, &data).unwrap();
                }
                w.write_ram_layout(&l).unwrap();
            }
            Record::Pages(p) => match p.kind {
                PagesKind::Raw(data) => w.write_pages(p.region, p.first_page, &data).unwrap(),
                PagesKind::Zero => w
                    .write_zero_pages(p.region, p.first_page, u64::from(p.count))
                    .unwrap(),
            },
            Record::Sync(n) => w.write_sync(n).unwrap(),
            Record::End => {}
        }
    }
    w.finish().unwrap()
}

fn keep(s: &migration_stream::Section) -> Option<(String, u32, u32, Vec<u8>)> {
    Some((s.name.clone(), s.instance, s.version, s.data.clone()))
}

#[test]
fn rewritten_file_still_restores() {
    // The rewrite itself is faithful: the control for the forged cases below.
    let bytes = rewrite(keep, None);
    let path = dir().join("rewritten.cryo");
    std::fs::write(&path, &bytes).unwrap();
    let mut g = Guest::spawn(["restore", "--from", path.to_str().unwrap()]);
    g.follow(1, 2, 1, T);
}

#[test]
fn section_version_newer_than_known() {
    let bytes = rewrite(
        |s| {
            let mut v = keep(s)?;
            if s.name == "serial" {
                v.2 = 7;
            }
            Some(v)
        },
        None,
    );
    expect_refused(
        "newer-section",
        &bytes,
        "section 'serial' instance 0: 'serial' state version 7 is newer than this cryo reads",
    );
}

#[test]
fn unknown_section() {
    let bytes = rewrite(keep, Some(("virtio-gpu", 0, 1, vec![1, 2, 3])));
    expect_refused("unknown-section", &bytes, "unknown section 'virtio-gpu'");
}

#[test]
fn missing_vcpu_section() {
    let bytes = rewrite(|s| if s.name == "vcpu" { None } else { keep(s) }, None);
    expect_refused("no-vcpu", &bytes, "no vcpu section for vCPU 0");
}

#[test]
fn garbage_state_in_a_section() {
    let bytes = rewrite(
        |s| {
            let mut v = keep(s)?;
            if s.name == "kvm-vm" {
                v.3.truncate(10);
            }
            Some(v)
        },
        None,
    );
    expect_refused("garbage-state", &bytes, "kvm-vm");
}

#[test]
fn tsc_frequency_mismatch_is_refused_unless_allowed() {
    // Forge the saved TSC frequency (machine section version 2, postcard):
    // decode, change, re-encode.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Machine {
        vcpus: u8,
        mem_mib: u64,
        regions: Vec<(u64, u64)>,
        cmdline: String,
        tsc_khz: u32,
        kernel: String,
        writer: String,
    }
    let bytes = rewrite(
        |s| {
            let mut v = keep(s)?;
            if s.name == "machine" {
                let mut m: Machine = postcard::from_bytes(&s.data).unwrap();
                m.tsc_khz /= 2;
                v.3 = postcard::to_allocvec(&m).unwrap();
            }
            Some(v)
        },
        None,
    );
    expect_refused("tsc", &bytes, "--allow-tsc-mismatch");
    let path = dir().join("tsc-allowed.cryo");
    std::fs::write(&path, &bytes).unwrap();
    let mut g = Guest::spawn([
        "restore",
        "--from",
        path.to_str().unwrap(),
        "--allow-tsc-mismatch",
    ]);
    g.follow(1, 2, 1, T);
    assert!(
        g.stderr().iter().any(|l| l.contains("TSC")),
        "{}",
        g.transcript()
    );
}
