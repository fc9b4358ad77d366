//! How a VM ends: a guest reset through the i8042 ends `cryo run` with
//! status 0; an instruction KVM cannot handle is reported with its bytes and
//! status 1; a triple fault ends the VM cleanly with a message.

use std::time::Duration;

use cryo_tests::{host_is_pvm, run_cryo, temp_file, tiny_elf};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn i8042_reset_ends_with_status_0() {
    // mov al, 0xfe; out 0x64, al; jmp $
    let k = temp_file(
        "reset.elf",
        &tiny_elf(1 << 20, &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], 4096),
    );
    let (status, out, err) = run_cryo(
        &["run", "--kernel", k.to_str().unwrap(), "--mem-mib", "16"],
        TIMEOUT,
    );
    assert_eq!(status, Some(0), "stdout: {out}\nstderr: {err}");
}

#[test]
fn serial_output_reaches_the_file() {
    // Write "ok\n" to COM1 (0x3f8), then reset: mov dx,0x3f8; mov al,'o'; out dx,al; ...
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'o', 0xee, // mov al, 'o'; out dx, al
        0xb0, b'k', 0xee, // mov al, 'k'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0xb0, 0xfe, 0xe6, 0x64, // reset
        0xeb, 0xfe,
    ];
    let k = temp_file("serial.elf", &tiny_elf(1 << 20, &code, 4096));
    let out_file = temp_file("serial.out", b"");
    let (status, _, err) = run_cryo(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--mem-mib",
            "16",
            "--serial-out",
            out_file.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    assert_eq!(status, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "ok\n");
}

#[test]
fn triple_fault_ends_the_vm() {
    // ud2 with no IDT: #UD -> #GP -> #DF -> triple fault (on PVM the emulator
    // may report the ud2 itself as an emulation failure instead).
    let k = temp_file("ud2.elf", &tiny_elf(1 << 20, &[0x0f, 0x0b], 4096));
    let (status, out, err) = run_cryo(
        &["run", "--kernel", k.to_str().unwrap(), "--mem-mib", "16"],
        TIMEOUT,
    );
    match status {
        Some(0) => assert!(err.contains("triple-faulted"), "{err}"),
        Some(1) => assert!(
            err.contains("instruction bytes") && err.contains("0f 0b"),
            "{err}"
        ),
        other => panic!("status {other:?}\nstdout: {out}\nstderr: {err}"),
    }
}

#[test]
fn emulation_failure_is_reported_with_instruction_bytes() {
    if !host_is_pvm() {
        eprintln!("skipped: needs PVM's instruction emulator (hardware KVM runs int3 natively)");
        return;
    }
    // int3 in ring 0: the PVM emulator cannot handle it.
    let k = temp_file(
        "int3.elf",
        &tiny_elf(1 << 20, &[0x90, 0xcc, 0xeb, 0xfe], 4096),
    );
    let (status, out, err) = run_cryo(
        &["run", "--kernel", k.to_str().unwrap(), "--mem-mib", "16"],
        TIMEOUT,
    );
    assert_eq!(status, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("KVM internal error, suberror 1 (emulation failure)"),
        "{err}"
    );
    assert!(err.contains("RIP 0x100001"), "{err}");
    assert!(
        err.contains("instruction bytes at 0x100001: cc eb fe"),
        "{err}"
    );
}
