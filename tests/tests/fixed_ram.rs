//! The fixed-ram image (the default save format): eager, lazy and
//! lazy-with-prefetch restores; sparse files; integrity checks; crash safety.

use std::path::Path;
use std::time::Duration;

use cryo_tests::{
    boot_with_api, check_continues, cryo, restore_vm, save_vm, socket_path, test_kernel,
    wait_for_socket, workdir, Guest,
};

const T: Duration = Duration::from_secs(90);

fn round_trip(vcpus: u32, name: &str, restore_args: &[&str]) {
    let dir = workdir(&format!("fr-{name}"));
    let api = socket_path(&format!("fr-{name}"));
    let file = dir.join("vm.img");
    let (mut g, _) = boot_with_api(vcpus, 64, "cryo.mem=8 cryo.hb_ms=200", &api);
    let out = save_vm(&api, &file, &[]);
    assert_eq!(out["format"], "fixed-ram", "{out}");
    assert_eq!(g.wait_exit(T).and_then(|s| s.code()), Some(0));
    let before = g.follow_output(vcpus);

    let mut r = restore_vm(&file, None, restore_args);
    let after = r.follow(vcpus, 3, 2, T);
    check_continues(&before, &after, vcpus);
    let report = r.stderr().join("\n");
    assert!(report.contains("guest resumed after"), "{report}");
    if restore_args.contains(&"--prefetch") {
        let done = r.wait_for_stderr(T, |l| l.contains("prefetch done"));
        assert!(done, "{}", r.transcript());
    }
}

#[test]
fn eager_one_vcpu() {
    round_trip(1, "eager1", &[]);
}

#[test]
fn eager_two_vcpus() {
    round_trip(2, "eager2", &[]);
}

#[test]
fn lazy_one_vcpu() {
    round_trip(1, "lazy1", &["--lazy"]);
}

#[test]
fn lazy_two_vcpus() {
    round_trip(2, "lazy2", &["--lazy"]);
}

#[test]
fn lazy_with_prefetch_two_vcpus() {
    round_trip(2, "prefetch2", &["--lazy", "--prefetch"]);
}

#[test]
fn lazy_with_verify() {
    round_trip(2, "lazyverify", &["--lazy", "--verify"]);
}

fn inspect_json(file: &Path) -> serde_json::Value {
    let (status, out, err) = cryo(&["inspect", "--json", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn image_is_sparse_and_sized_like_ram() {
    let dir = workdir("fr-sparse");
    let api = socket_path("fr-sparse");
    let file = dir.join("vm.img");
    // 256 MiB of RAM, of which the guest uses 2 x 8 MiB.
    let (mut g, _) = boot_with_api(2, 256, "cryo.mem=8 cryo.hb_ms=200", &api);
    save_vm(&api, &file, &[]);
    assert!(g.wait_exit(T).is_some());
    let info = inspect_json(&file);
    let apparent = info["apparent_bytes"].as_u64().unwrap();
    let allocated = info["allocated_bytes"].as_u64().unwrap();
    let present = info["present_pages"].as_u64().unwrap() * 4096;
    assert!(
        ((256 << 20)..((256 + 16) << 20)).contains(&apparent),
        "apparent {apparent}"
    );
    assert!(
        allocated >= present,
        "allocated {allocated} < present data {present}"
    );
    assert!(
        allocated < present + (8 << 20),
        "allocated {allocated} for {present} bytes of data"
    );
    assert!(
        ((16 << 20)..(40 << 20)).contains(&present),
        "present {present}"
    );
    assert_eq!(info["regions"].as_array().unwrap().len(), 1);
    let names: Vec<&str> = info["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["machine", "kvm-vm", "vcpu", "vcpu", "serial", "i8042", "cmos"]
    );
    // The text form says the same.
    let (status, out, _) = cryo_tests::run_cryo(&["inspect", file.to_str().unwrap()], T);
    assert_eq!(status, Some(0));
    assert!(
        out.contains("fixed-ram image") && out.contains("allocated"),
        "{out}"
    );
}

#[test]
fn page_that_became_zero_restores_as_zero() {
    // Guest RAM in a shared file lets the test write a page from the host.
    let dir = workdir("fr-zero");
    let api = socket_path("fr-zero");
    let mem = dir.join("guest.mem");
    let file = dir.join("vm.img");
    let _ = std::fs::remove_file(&api);
    let mut g = Guest::spawn([
        "run",
        "--kernel",
        test_kernel().to_str().unwrap(),
        "--mem-mib",
        "64",
        "--mem-file",
        mem.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 cryo.mem=8 cryo.hb_ms=200",
        "--api",
        api.to_str().unwrap(),
    ]);
    assert!(wait_for_socket(&api, T));
    g.follow(1, 2, 1, T);
    // A page near the top of RAM, outside the test kernel's 8 MiB share.
    let page: u64 = (60 << 20) / 4096;
    let write_page = |fill: u8| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        f.write_all_at(&vec![fill; 4096], page * 4096).unwrap();
    };
    write_page(0xa5);
    save_vm(&api, &file, &["--keep-running"]);
    let img = fixed_ram::Image::open(&file).unwrap();
    assert!(img.is_present(0, page));
    let mut buf = vec![0u8; 1 << 20];
    let chunk = page * 4096 / (1 << 20);
    img.read_chunk_into(0, chunk, &mut buf, false).unwrap();
    assert_eq!(buf[(page * 4096 % (1 << 20)) as usize], 0xa5);
    drop(img);

    write_page(0);
    save_vm(&api, &file, &[]);
    assert!(g.wait_exit(T).is_some());
    let img = fixed_ram::Image::open(&file).unwrap();
    assert!(
        !img.is_present(0, page),
        "a zero page is still marked present"
    );
    img.read_chunk_into(0, chunk, &mut buf, false).unwrap();
    assert!(buf[(page * 4096 % (1 << 20)) as usize..][..4096]
        .iter()
        .all(|b| *b == 0));
    img.verify().unwrap();
    // And the lazy mapping sees zeros there too.
    let mapping = img.map_page_area(0, true).unwrap();
    // SAFETY-free check through a copy: read the page via the mapping.
    let bytes = unsafe_read(&mapping, (page * 4096) as usize, 4096);
    assert!(bytes.iter().all(|b| *b == 0));
}

fn unsafe_read(m: &fixed_ram::PageAreaMapping, offset: usize, len: usize) -> Vec<u8> {
    assert!(offset + len <= m.len());
    let mut out = vec![0u8; len];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: within the mapping's length, which the mapping keeps alive.
        *b = unsafe { std::ptr::read_volatile(m.as_ptr().add(offset + i)) };
    }
    out
}

#[test]
fn flipped_byte_is_caught_by_verify_and_eager_restore() {
    let dir = workdir("fr-flip");
    let api = socket_path("fr-flip");
    let file = dir.join("vm.img");
    let (mut g, _) = boot_with_api(1, 32, "cryo.mem=4 cryo.hb_ms=200", &api);
    save_vm(&api, &file, &[]);
    assert!(g.wait_exit(T).is_some());
    let (status, out, err) = cryo(&["verify", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}{err}");
    assert!(out.contains("OK"), "{out}");

    // Flip one byte of a present page.
    let img = fixed_ram::Image::open(&file).unwrap();
    let region = img.layout().regions()[0];
    let page = (0..region.size / 4096)
        .rev()
        .find(|p| img.is_present(0, *p))
        .unwrap();
    drop(img);
    let offset = region.pages_offset + page * 4096 + 123;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    }
    let chunk = page * 4096 / (1 << 20);
    let (status, _, err) = cryo(&["verify", file.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains(&format!("chunk {chunk} of region 0")), "{err}");
    let (status, out, err) = cryo(&["restore", "--from", file.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert!(out.is_empty(), "the guest ran: {out}");
    assert!(err.contains(&format!("chunk {chunk} of region 0")), "{err}");
    // A lazy restore with --verify refuses it too.
    let (status, _, err) = cryo(&[
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--lazy",
        "--verify",
    ]);
    assert_eq!(status, Some(2), "{err}");
}

/// Format version 2 covers the bitmaps and the checksum table with a CRC in
/// the header: a flipped byte in any of them is refused by `verify` and by
/// every restore (eager, lazy), with an error naming the metadata, before
/// any guest runs.
#[test]
fn flipped_metadata_byte_is_refused_by_verify_and_every_restore() {
    let dir = workdir("fr-meta");
    let api = socket_path("fr-meta");
    let file = dir.join("vm.img");
    let (mut g, _) = boot_with_api(1, 32, "cryo.mem=4 cryo.hb_ms=200", &api);
    save_vm(&api, &file, &[]);
    assert!(g.wait_exit(T).is_some());
    let img = fixed_ram::Image::open(&file).unwrap();
    assert_eq!(img.header().format_version, 2);
    let h = img.header().clone();
    drop(img);
    let bitmap = h.regions[0].bitmap_offset;
    let offsets = [
        bitmap,                                   // first bitmap word
        bitmap + h.regions[0].bitmap_len / 2 + 3, // a middle one
        bitmap + h.regions[0].bitmap_len - 1,     // the last byte
        h.checksum_table_offset + 1,              // the checksum table
        h.checksum_table_offset + h.checksum_table_len - 1,
    ];
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    for offset in offsets {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], offset).unwrap();
        let path = file.to_str().unwrap();
        let (status, _, err) = cryo(&["verify", path]);
        assert_eq!(status, Some(2), "{offset:#x}: {err}");
        assert!(err.contains("metadata checksum"), "{offset:#x}: {err}");
        for extra in [&[][..], &["--lazy"][..]] {
            let mut args = vec!["restore", "--from", path];
            args.extend_from_slice(extra);
            let (status, out, err) = cryo(&args);
            assert_eq!(status, Some(2), "{offset:#x} {extra:?}: {err}");
            assert!(out.is_empty(), "the guest ran: {out}");
            assert!(err.contains("metadata checksum"), "{offset:#x}: {err}");
        }
        f.write_all_at(&b, offset).unwrap();
    }
    let (status, out, err) = cryo(&["verify", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{out}{err}");
}

#[test]
fn sigkill_during_a_save_keeps_the_previous_image() {
    let dir = workdir("fr-kill");
    let file = dir.join("vm.img");
    // 384 MiB filled with incompressible data, so a save takes a while.
    let (mut g, api) = cryo_tests::filled_guest("fr-kill", 2, 400, 192);
    save_vm(&api, &file, &["--keep-running"]);
    let good = std::fs::read(&file).unwrap();

    // Start another save to the same name and kill the VM process mid-way.
    // The temporary name is `.vm.img.tmp-<pid>-<random>`.
    let prefix = format!(".vm.img.tmp-{}-", g.pid());
    let find_tmp = || {
        std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
            let n = e.file_name();
            n.to_string_lossy().starts_with(&prefix).then(|| e.path())
        })
    };
    let saver = std::process::Command::new(cryo_tests::cryo_bin())
        .args([
            "save",
            "--api",
            api.to_str().unwrap(),
            "--to",
            file.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    let mut tmp = find_tmp();
    while tmp.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        tmp = find_tmp();
    }
    let tmp = tmp.expect("the second save never started");
    std::thread::sleep(Duration::from_millis(30));
    g.kill();
    let _ = g.wait_exit(T);
    let out = saver.wait_with_output().unwrap();
    assert!(!out.status.success(), "the killed save reported success");

    // The image under the target name is the earlier one, intact and restorable.
    assert_eq!(std::fs::read(&file).unwrap(), good);
    let (status, _, err) = cryo(&["verify", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "{err}");
    let api2 = socket_path("fr-kill-r");
    let mut r = restore_vm(&file, Some(&api2), &[]);
    assert!(wait_for_socket(&api2, T), "{}", r.transcript());
    let (status, out, _) = cryo(&["status", "--api", api2.to_str().unwrap()]);
    assert_eq!(status, Some(0));
    assert!(out.contains("\"running\""), "{out}");
    r.kill();

    // The half-written temporary file was never committed: refused clearly.
    if tmp.exists() {
        let (status, _, err) = cryo(&["verify", tmp.to_str().unwrap()]);
        assert_eq!(status, Some(2), "{err}");
        assert!(err.contains("did not commit"), "{err}");
        let (status, _, err) = cryo(&["restore", "--from", tmp.to_str().unwrap()]);
        assert_eq!(status, Some(2), "{err}");
    }
}

/// `cryo bench save-restore` end to end on a small guest: every step runs
/// under KVM against the raw reference, and the report carries the save's
/// phases and both ratios. (Speed itself is the bench's business, not this
/// test's: only that the figures exist and add up is checked.)
#[test]
fn bench_save_restore_reports_phases_and_ratios() {
    let dir = workdir("fr-bench");
    let (status, out, err) = cryo_tests::run_cryo(
        &[
            "bench",
            "save-restore",
            "--mem-mib",
            "256",
            "--fill-mib",
            "128",
            "--channels",
            "1,2",
            "--dir",
            dir.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(300),
    );
    assert_eq!(status, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("a JSON report");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{out}");
    for r in results {
        let raw = &r["raw"];
        assert!(raw["write_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(raw["read_mb_s"].as_f64().unwrap() > 0.0, "{r}");
        let save = &r["save_direct"];
        let phases: f64 = ["data_s", "metadata_s", "sync_s", "publish_s"]
            .iter()
            .map(|k| save[k].as_f64().unwrap())
            .sum();
        let whole = save["whole_s"].as_f64().unwrap();
        assert!(phases > 0.0 && phases <= whole, "{r}");
        assert!(save["data_ratio"].as_f64().unwrap() > 0.0, "{r}");
        assert!(save["whole_ratio"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["eager_restore"]["mb_per_s"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        // Ratios also against one transfer in flight per channel, and the
        // VMM's own memory (mincore over its other mappings) is seen.
        assert!(
            raw["read_one_per_channel_mb_s"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(
            save["data_ratio_one_per_channel"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        let eager = &r["eager_restore"];
        assert!(
            eager["ratio_to_raw_one_per_channel"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(
            eager["vmm_peak_mib_beyond_guest"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    // The bench leaves nothing behind: no image, raw file or kernel copy.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
