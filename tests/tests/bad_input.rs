//! Bad input to `cryo run`: one clear line on stderr and exit status 2.

use std::process::Command;
use std::time::Duration;

use cryo_tests::{cryo_bin, run_command, run_cryo, test_kernel, tiny_elf};

const TIMEOUT: Duration = Duration::from_secs(30);

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cryo-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_bad_input(result: (Option<i32>, String, String), needle: &str) {
    let (status, stdout, stderr) = result;
    assert_eq!(status, Some(2), "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("cryo: error: "), "{stderr}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in {stderr}"
    );
}

#[test]
fn missing_kernel() {
    assert_bad_input(
        run_cryo(&["run", "--kernel", "/nonexistent/vmlinux"], TIMEOUT),
        "cannot read /nonexistent/vmlinux",
    );
}

#[test]
fn unreadable_kernel() {
    // A directory opens but cannot be read.
    let d = tmpdir("dir");
    assert_bad_input(
        run_cryo(&["run", "--kernel", d.to_str().unwrap()], TIMEOUT),
        "cannot read",
    );
}

#[test]
fn neither_elf_nor_bzimage() {
    let d = tmpdir("garbage");
    let p = d.join("kernel");
    std::fs::write(&p, vec![0x5a_u8; 8192]).unwrap();
    assert_bad_input(
        run_cryo(&["run", "--kernel", p.to_str().unwrap()], TIMEOUT),
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn memory_too_small_for_the_kernel() {
    let d = tmpdir("big-elf");
    let p = d.join("vmlinux");
    // Needs 16 MiB + 32 MiB of RAM.
    std::fs::write(&p, tiny_elf(16 << 20, &[0xeb, 0xfe], 32 << 20)).unwrap();
    assert_bad_input(
        run_cryo(
            &["run", "--kernel", p.to_str().unwrap(), "--mem-mib", "32"],
            TIMEOUT,
        ),
        "guest memory too small",
    );
}

#[test]
fn memory_below_the_minimum() {
    let k = test_kernel().to_str().unwrap().to_string();
    assert_bad_input(
        run_cryo(&["run", "--kernel", &k, "--mem-mib", "1"], TIMEOUT),
        "guest memory of 1 MiB is invalid",
    );
}

#[test]
fn too_many_vcpus() {
    let k = test_kernel().to_str().unwrap().to_string();
    assert_bad_input(
        run_cryo(&["run", "--kernel", &k, "--vcpus", "300"], TIMEOUT),
        "300 vCPUs requested",
    );
    assert_bad_input(
        run_cryo(&["run", "--kernel", &k, "--vcpus", "0"], TIMEOUT),
        "0 vCPUs requested",
    );
}

#[test]
fn more_vcpus_than_the_host_allows() {
    // KVM here allows fewer than 254 vCPUs per VM only on unusual hosts; ask
    // KVM what it allows and go one above when that is representable.
    let k = test_kernel().to_str().unwrap().to_string();
    let (status, _, stderr) = run_cryo(&["run", "--kernel", &k, "--vcpus", "255"], TIMEOUT);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("vCPUs requested"), "{stderr}");
}

#[test]
fn kvm_device_missing() {
    let k = test_kernel().to_str().unwrap().to_string();
    let mut cmd = Command::new(cryo_bin());
    cmd.args(["run", "--kernel", &k])
        .env("CRYO_KVM_DEVICE", "/nonexistent/kvm");
    assert_bad_input(run_command(cmd, TIMEOUT), "/nonexistent/kvm does not exist");
}

#[test]
fn kvm_device_not_kvm() {
    let k = test_kernel().to_str().unwrap().to_string();
    let mut cmd = Command::new(cryo_bin());
    cmd.args(["run", "--kernel", &k])
        .env("CRYO_KVM_DEVICE", "/dev/null");
    assert_bad_input(run_command(cmd, TIMEOUT), "not a usable KVM device");
}

#[test]
fn kvm_device_not_accessible() {
    // As root every file is accessible; drop to an unprivileged user to see
    // the permission error, where setpriv exists and /dev/kvm is not world-usable.
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode()
    });
    if kvm_mode.map(|m| m & 0o006 == 0o006).unwrap_or(true)
        || !std::path::Path::new("/usr/bin/setpriv").exists()
    {
        eprintln!("skipped: /dev/kvm is world-accessible or setpriv is missing");
        return;
    }
    // The unprivileged user must be able to reach the binary and kernel: copy them to /tmp.
    let d = tmpdir("noaccess");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = d.join("cryo");
    let kernel = d.join("kernel");
    std::fs::copy(cryo_bin(), &bin).unwrap();
    std::fs::copy(test_kernel(), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(&bin)
    .args(["run", "--kernel"])
    .arg(&kernel);
    assert_bad_input(run_command(cmd, TIMEOUT), "not accessible");
}

#[test]
fn pvh_without_a_pvh_note() {
    let d = tmpdir("nopvh");
    let p = d.join("vmlinux");
    std::fs::write(&p, tiny_elf(2 << 20, &[0xeb, 0xfe], 4096)).unwrap();
    assert_bad_input(
        run_cryo(
            &["run", "--kernel", p.to_str().unwrap(), "--boot", "pvh"],
            TIMEOUT,
        ),
        "no PVH entry note",
    );
}

#[test]
fn unknown_option_is_a_usage_error() {
    let (status, _, stderr) = run_cryo(&["run", "--no-such-option"], TIMEOUT);
    assert_eq!(status, Some(2), "{stderr}");
}
