//! Builds the cryo test kernel image (`$OUT_DIR/cryo-test-kernel.elf`) from
//! the C and assembly sources in `kernel/` with the system C compiler.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags for every C and assembly file. Ring-0 code runs in KVM's
/// instruction emulator on PVM hosts: integer instructions only.
const CFLAGS: &[&str] = &[
    "-m64",
    "-std=gnu11",
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-nostdinc",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-sse2",
    "-mno-mmx",
    "-mno-avx",
    "-mno-3dnow",
    "-mno-popcnt",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-stack-clash-protection",
    "-fcf-protection=none",
    "-mcmodel=small",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-vectorize",
    "-fno-common",
];

const SOURCES: &[&str] = &["boot.S", "main.c", "lib.c", "user.c", "blk.c"];
const OTHER_INPUTS: &[&str] = &["kernel.h", "kernel.ld"];

fn run(cmd: &mut Command, what: &str) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cryo-test-kernel: cannot run {what} ({cmd:?}): {e}"),
    };
    if !out.status.success() {
        panic!(
            "cryo-test-kernel: {what} failed ({}):\n{cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn compiler() -> PathBuf {
    if let Ok(cc) = env::var("CRYO_TEST_KERNEL_CC") {
        return PathBuf::from(cc);
    }
    // The kernel is always x86_64; only trust cc's choice when the target is too.
    let target = env::var("TARGET").unwrap_or_default();
    if target.starts_with("x86_64-") {
        let tool = cc::Build::new()
            .cargo_metadata(false)
            .cargo_warnings(false)
            .get_compiler();
        return tool.path().to_path_buf();
    }
    PathBuf::from("gcc")
}

fn main() {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let obj_dir = out_dir.join("obj");
    std::fs::create_dir_all(&obj_dir).expect("create object directory");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CRYO_TEST_KERNEL_CC");
    for f in SOURCES.iter().chain(OTHER_INPUTS) {
        println!("cargo:rerun-if-changed=kernel/{f}");
    }

    let cc = compiler();
    let mut objs = Vec::new();
    for src in SOURCES {
        let obj = obj_dir.join(format!("{src}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&src_dir)
            .arg("-c")
            .arg(src_dir.join(src))
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &format!("compiling {src}"));
        objs.push(obj);
    }

    let elf = out_dir.join("cryo-test-kernel.elf");
    let mut cmd = Command::new(&cc);
    cmd.args(["-m64", "-nostdlib", "-static", "-no-pie"])
        .arg(format!("-Wl,-T,{}", src_dir.join("kernel.ld").display()))
        .args([
            "-Wl,-z,noexecstack",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
            "-Wl,--no-warn-rwx-segments",
        ])
        .args(&objs)
        .arg("-o")
        .arg(&elf);
    run(&mut cmd, "linking cryo-test-kernel.elf");
}
