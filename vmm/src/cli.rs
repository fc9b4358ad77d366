//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// cryo: a small, fast KVM VMM that boots, freezes and thaws whole VMs.
#[derive(Parser, Debug)]
#[command(name = "cryo", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level for messages on stderr: error, warn (default), info, debug, trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a kernel in a new VM and run it until the guest resets or powers off.
    Run(RunArgs),
}

/// Entry protocol choice.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootArg {
    /// PVH when the ELF image has a PVH note, else the Linux 64-bit protocol.
    Auto,
    /// Linux 64-bit boot protocol.
    Linux,
    /// PVH entry (ELF images with the Xen PVH note).
    Pvh,
}

/// `cryo run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (initramfs).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=1"
    )]
    pub cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// Back guest RAM with this host file, shared (created and sized if absent).
    #[arg(long, value_name = "PATH")]
    pub mem_file: Option<PathBuf>,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_out: Option<PathBuf>,
    /// Entry protocol.
    #[arg(long, value_enum, default_value = "auto")]
    pub boot: BootArg,
}
