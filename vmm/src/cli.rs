//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::image::migrate::CompressionArg;
use crate::image::precopy::CpuPriority;
use crate::image::SaveFormat;

/// `--format` (the save core's [`SaveFormat`] knows nothing of clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatChoice {
    /// Every page at a fixed offset (docs/fixed-ram-format.md).
    FixedRam,
    /// A sequential migration stream (docs/stream-format.md).
    Stream,
}

impl From<FormatChoice> for SaveFormat {
    fn from(f: FormatChoice) -> Self {
        match f {
            FormatChoice::FixedRam => SaveFormat::FixedRam,
            FormatChoice::Stream => SaveFormat::Stream,
        }
    }
}

/// `--priority` (the save core's [`CpuPriority`] knows nothing of clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PriorityChoice {
    /// The guest's vCPUs go first: the transfer yields.
    Guest,
    /// The transfer runs at the vCPUs' priority.
    Transfer,
}

impl From<PriorityChoice> for CpuPriority {
    fn from(p: PriorityChoice) -> Self {
        match p {
            PriorityChoice::Guest => CpuPriority::Guest,
            PriorityChoice::Transfer => CpuPriority::Transfer,
        }
    }
}

/// `--compress` (the save core's [`CompressionArg`] knows nothing of clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressChoice {
    /// Raw pages.
    None,
    /// zstd, level 1.
    Zstd,
    /// lz4.
    Lz4,
}

impl From<CompressChoice> for CompressionArg {
    fn from(c: CompressChoice) -> Self {
        match c {
            CompressChoice::None => CompressionArg::None,
            CompressChoice::Zstd => CompressionArg::Zstd,
            CompressChoice::Lz4 => CompressionArg::Lz4,
        }
    }
}

/// cryo: a small, fast KVM VMM that boots, freezes and thaws whole VMs.
///
/// Exit status: 0 success, 1 runtime failure, 2 bad input.
#[derive(Parser, Debug)]
#[command(name = "cryo", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn (default), info, debug, trace (also RUST_LOG,
    /// e.g. `cryo::api=debug`). Log lines carry the time, level and component.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Write log lines to this file instead of stderr.
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Print results as JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a kernel in a new VM and run it until the guest resets or powers off.
    Run(RunArgs),
    /// Save a running VM (through its API socket) to a file.
    Save(SaveArgs),
    /// Take a live snapshot of a running VM (through its API socket): the VM
    /// at this instant, written while it keeps running.
    Snapshot(SnapshotArgs),
    /// Live-migrate a running VM (through its API socket) to a `cryo
    /// restore --listen` peer while it keeps running; it ends here once the
    /// peer confirmed.
    Migrate(MigrateArgs),
    /// Cancel a running save, managed save, live snapshot or migration (no
    /// file is left; the VM runs on).
    Cancel(ApiArgs),
    /// Build a VM from a saved file in this process and resume it.
    Restore(RestoreArgs),
    /// Print what a saved file holds: header, sections, RAM layout.
    Inspect(InspectArgs),
    /// Check a fixed-ram image's header and every chunk checksum.
    Verify(VerifyArgs),
    /// Save a VM started with --name into its state directory and end it
    /// (`cryo managed-save NAME`); the next `cryo run --name` restores it.
    ManagedSave(ManagedSaveArgs),
    /// Discard the managed save image of a named VM.
    ManagedSaveRemove(ManagedSaveRemoveArgs),
    /// Show the progress of a running save or snapshot.
    QueryProgress(ApiArgs),
    /// Pause a running VM's vCPUs.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Print a VM's state, vCPUs, memory and uptime.
    Status(ApiArgs),
    /// End a VM.
    Quit(ApiArgs),
    /// Measure save and restore speed against this machine's limits.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
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
    /// Serve the control API on this unix socket (mode 0600). With --name,
    /// defaults to <state-dir>/<name>/api.sock.
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Register the VM under this name: `cryo managed-save` saves it into the
    /// state directory, and the next `cryo run --name` restores it from there
    /// instead of booting (with the same configuration, or a clear error).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// State directory for named VMs (default: $XDG_STATE_HOME/cryo or ~/.local/state/cryo).
    #[arg(long, value_name = "DIR", requires = "name")]
    pub state_dir: Option<PathBuf>,
    /// A raw disk image as a virtio-blk disk (repeatable: /dev/vda, vdb, ...
    /// in order); `ro` makes it read-only, `direct` opens it with O_DIRECT.
    /// The guest finds it in the ACPI DSDT (`LNRO0005`, Linux's virtio_mmio
    /// driver); the disk must stay in place, unchanged, for restores.
    #[arg(long = "disk", value_name = "PATH[,ro][,direct]", value_parser = microvm::devices::virtio::block::DiskConfig::parse)]
    pub disks: Vec<microvm::devices::virtio::block::DiskConfig>,
    /// A virtio-net device on host tap NAME (repeatable: eth0, eth1, ...
    /// in order, in the MMIO slots after the disks), opened with
    /// IFF_VNET_HDR (checksum and TSO offloads pass through); created if
    /// missing (needs root or CAP_NET_ADMIN), and then removed when cryo
    /// exits unless made persistent. `mac` defaults to 02:63:72:79:6f:SLOT.
    #[arg(long = "net", value_name = "tap=NAME[,mac=XX:XX:XX:XX:XX:XX]", value_parser = microvm::devices::virtio::net::NetConfig::parse)]
    pub nets: Vec<microvm::devices::virtio::net::NetConfig>,
}

/// `cryo managed-save`.
#[derive(Args, Debug)]
pub struct ManagedSaveArgs {
    /// The VM's name (as given to `cryo run --name`), like `virsh
    /// managedsave NAME`; its API socket is <state-dir>/<name>/api.sock.
    /// A path (with a '/') is taken as the API socket itself.
    #[arg(
        value_name = "NAME",
        required_unless_present = "api",
        conflicts_with = "api"
    )]
    pub name: Option<String>,
    /// The VM's API socket (instead of NAME).
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// State directory of named VMs (default: $XDG_STATE_HOME/cryo or ~/.local/state/cryo).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Channel threads moving pages (default: one per host CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: Option<u16>,
    /// O_DIRECT for the page data: auto (the default without the option), on, off;
    /// a bare --direct-io means on.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub direct_io: Option<crate::api::DirectIoArg>,
}

/// `cryo managed-save-remove`.
#[derive(Args, Debug)]
pub struct ManagedSaveRemoveArgs {
    /// The VM's name.
    pub name: String,
    /// State directory (default: $XDG_STATE_HOME/cryo or ~/.local/state/cryo).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `cryo save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// Target file (written under a temporary name, renamed when complete),
    /// or `tcp:HOST:PORT` / `unix:PATH` of a `cryo restore --listen`.
    #[arg(long, value_name = "FILE|tcp:HOST:PORT|unix:PATH")]
    pub to: String,
    /// Channel threads moving pages (default: one per host CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: Option<u16>,
    /// O_DIRECT for the page data of a file save: auto (the default without
    /// the option: on where the filesystem supports it), on (an error where it
    /// does not), off; a bare --direct-io means on. Files only.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub direct_io: Option<crate::api::DirectIoArg>,
    /// Per-packet compression when sending to a peer (tcp: or unix: only;
    /// refused for a file).
    #[arg(long, value_enum, value_name = "ALGO")]
    pub compress: Option<CompressChoice>,
    /// Image format of a file save (default fixed-ram; refused for a peer).
    #[arg(long, value_enum)]
    pub format: Option<FormatChoice>,
    /// Resume the VM after saving instead of ending it.
    #[arg(long)]
    pub keep_running: bool,
    /// With --keep-running: copy each disk, at the save's instant, to this
    /// file (repeat once per disk, in slot order); the image then names the
    /// copies, so it restores while the VM goes on writing its disks. The
    /// copies are made inside the pause (a reflink where the filesystem
    /// shares extents, else a full copy).
    #[arg(
        long,
        value_name = "FILE",
        requires = "keep_running",
        conflicts_with = "live"
    )]
    pub disk_snapshot: Vec<PathBuf>,
    /// Save while the VM runs (pre-copy into a fixed-ram file, as `migrate`
    /// does to a peer): the image is the VM at the end of the save, which
    /// pauses it only for the last round.
    #[arg(long)]
    pub live: bool,
    /// Live save: the longest pause the guest may see (default 50); the VM
    /// is paused for the last round only once the expected pause (the dirty
    /// pages left at the measured write bandwidth, the last log fetch and
    /// the state) fits 80% of this.
    #[arg(long, value_name = "MS", requires = "live")]
    pub max_downtime_ms: Option<u64>,
    /// Live save: write bandwidth limit, MB/s (10^6 bytes).
    #[arg(long, value_name = "MB/S", requires = "live", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bandwidth: Option<u64>,
    /// Live save: give up after this many seconds; the VM runs on, no file is left.
    #[arg(long, value_name = "N", requires = "live", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: Option<u64>,
    /// Live save: who goes first for the host's CPUs while the guest runs
    /// (default guest: the save's threads yield to the vCPUs; transfer:
    /// they run at the vCPUs' priority, so the save ends sooner on a busy
    /// host and the guest slows meanwhile).
    #[arg(long, value_enum, value_name = "WHO", requires = "live")]
    pub priority: Option<PriorityChoice>,
}

/// `cryo migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// The `cryo restore --listen` peer.
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    pub to: String,
    /// Data channels (default: one per host CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: Option<u16>,
    /// The longest pause the guest may see: the VM is stopped for the last
    /// round only once the expected pause (the dirty pages left at the
    /// measured bandwidth, the last log fetch, the state, the destination's
    /// resume) fits 80% of this.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub max_downtime_ms: u64,
    /// Bandwidth limit of the transfer, MB/s (10^6 bytes); the last round,
    /// with the VM paused, is not held to it.
    #[arg(long, value_name = "MB/S", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bandwidth: Option<u64>,
    /// Give up after this many seconds; the VM runs on here.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: Option<u64>,
    /// Per-packet compression.
    #[arg(long, value_enum, value_name = "ALGO")]
    pub compress: Option<CompressChoice>,
    /// Who goes first for the host's CPUs while the guest runs (default
    /// guest: the transfer threads yield to the vCPUs, so a busy guest keeps
    /// its speed; transfer: they run at the vCPUs' priority, as QEMU's do,
    /// so the migration ends sooner on a host without spare CPUs and the
    /// guest slows meanwhile). The last round, with the VM paused, always
    /// runs at full priority.
    #[arg(long, value_enum, value_name = "WHO")]
    pub priority: Option<PriorityChoice>,
}

/// `cryo snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    /// Target file (a fixed-ram image, committed only when complete).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Copy each disk at the snapshot's instant to this file (repeat once
    /// per disk, in slot order); the image then names the copies.
    #[arg(long, value_name = "FILE")]
    pub disk_snapshot: Vec<PathBuf>,
    /// Walker threads copying pages (default: one per host CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: Option<u16>,
    /// O_DIRECT for the page data: auto (the default without the option), on, off;
    /// a bare --direct-io means on.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub direct_io: Option<crate::api::DirectIoArg>,
}

/// `cryo restore`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "listen"])))]
pub struct RestoreArgs {
    /// The saved file (it is only read: restore it as often as you like).
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Wait for a `cryo save --to` from another process on this endpoint
    /// (tcp:HOST:PORT or unix:PATH) and run the VM it sends.
    #[arg(long, value_name = "tcp:HOST:PORT|unix:PATH")]
    pub listen: Option<String>,
    /// With --listen: make N MiB of guest memory and fault it all in before
    /// waiting (as QEMU's -mem-prealloc), so that receiving the VM's RAM
    /// does not fault page by page, where faulting in fresh memory is slow.
    /// A VM of N MiB is received into it; one of another size into fresh
    /// memory, as without. Costs N MiB of host memory from the start.
    #[arg(long, value_name = "N", requires = "listen")]
    pub prealloc_mib: Option<u64>,
    /// Channel threads reading the image (default: one per host CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: Option<u16>,
    /// O_DIRECT for reading the image: auto (the default without the option),
    /// on, off; a bare --direct-io means on.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "on")]
    pub direct_io: Option<crate::api::DirectIoArg>,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_out: Option<PathBuf>,
    /// Serve the control API on this unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Restore even when this host's TSC frequency differs from the saved
    /// one and KVM cannot scale it (guest time then runs at the wrong rate).
    #[arg(long)]
    pub allow_tsc_mismatch: bool,
    /// Restore even when a disk's size or fingerprint (inode, modification
    /// time, first and last MiB) differs from the one recorded in the save;
    /// the guest may then see a filesystem that does not match its caches.
    /// A missing disk is refused even so.
    #[arg(long)]
    pub disk_changed_ok: bool,
    /// Reattach the saved network devices to these taps, one per device in
    /// order (default: the taps recorded in the save). The guest keeps its
    /// MAC; a `mac=` here must match it.
    #[arg(long = "net", value_name = "tap=NAME[,mac=XX:XX:XX:XX:XX:XX]", value_parser = microvm::devices::virtio::net::NetConfig::parse)]
    pub nets: Vec<microvm::devices::virtio::net::NetConfig>,
    /// Map the image as guest memory and resume at once; pages load on first
    /// touch (fixed-ram images only; the image must stay in place while the VM runs).
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: load the rest of the pages in the background after resuming.
    #[arg(long, requires = "lazy")]
    pub prefetch: bool,
    /// Check every checksum of the image before restoring (a lazy restore
    /// cannot check pages it has not read yet, and warns unless --verify is
    /// given; an eager one checks as it reads).
    #[arg(long)]
    pub verify: bool,
    /// Restore the VM paused: its vCPUs do not run until `cryo resume`
    /// through the API socket (which it therefore needs).
    #[arg(long, requires = "api")]
    pub paused: bool,
}

/// `cryo verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The fixed-ram image.
    pub file: PathBuf,
}

/// `cryo inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The saved file.
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Verbs that only talk to a VM's API socket.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
}
