//! `cryo run` and `cryo restore`: build a VM (booted or restored) and run it
//! with the event loop, signal handling and the optional control socket.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use log::info;
use microvm::{
    BootProtocol, BootSource, MemoryBacking, MicroVm, RestoreOptions, SerialOutput, VmConfig,
    VmExitReason,
};

use crate::api::Managed;
use crate::cli::{BootArg, RestoreArgs, RunArgs};
use crate::error::CliError;
use crate::image::{self, RestoreMode, SaveError};
use crate::managed::{ManagedConfig, ManagedVm};
use crate::progress::{Display, Progress};

fn serial_output(path: Option<&Path>) -> Result<SerialOutput, CliError> {
    match path {
        None => Ok(SerialOutput::Stdout),
        Some(path) => Ok(SerialOutput::File(
            crate::files::create_private(path).map_err(|e| {
                CliError::bad_input(format!(
                    "cannot create serial output file {}: {e}",
                    path.display()
                ))
            })?,
        )),
    }
}

/// The API socket, bound before the VM is built or loaded; its file is
/// removed when this is dropped (the VM ended, or it never started).
struct BoundApi {
    path: PathBuf,
    listener: UnixListener,
}

impl Drop for BoundApi {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl BoundApi {
    /// Starts answering requests for `vm` on the bound socket.
    fn serve(
        &self,
        vm: &MicroVm,
        managed: Option<Managed>,
    ) -> Result<crate::api::ApiHandle, CliError> {
        let controller = vm.controller()?;
        self.listener
            .try_clone()
            .and_then(|listener| crate::api::serve(listener, controller, managed))
            .map_err(|e| {
                CliError::failure(format!(
                    "cannot serve the API on {}: {e}",
                    self.path.display()
                ))
            })
    }
}

fn bind_api(path: Option<&Path>) -> Result<Option<BoundApi>, CliError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let listener = crate::api::bind(path).map_err(|e| {
        CliError::bad_input(format!("cannot serve the API on {}: {e}", path.display()))
    })?;
    Ok(Some(BoundApi {
        path: path.to_owned(),
        listener,
    }))
}

fn load_err(e: SaveError) -> CliError {
    e.into()
}

/// Loads an image with a progress display on stderr (a bar on a terminal).
fn load_with_progress(
    path: &Path,
    mode: RestoreMode,
    verify: bool,
    channels: &image::fixed::ChannelOptions,
) -> Result<image::Loaded, CliError> {
    let progress = Arc::new(Progress::new("restore", 0));
    // Dropping `loaded` tells the display thread the load is over; it
    // wakes at once (a plain sleep loop made every restore wait for the
    // rest of its 50 ms nap, most of a lazy restore's time).
    let (loaded, over) = std::sync::mpsc::channel::<()>();
    let shown = progress.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            // Only long loads get a display: wait a moment first.
            let start = Instant::now();
            let mut display: Option<Display> = None;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                over.recv_timeout(std::time::Duration::from_millis(50))
            {
                if start.elapsed().as_millis() > 500 {
                    let info = shown.info();
                    display
                        .get_or_insert_with(|| Display::new("restore", info.bytes_total))
                        .update(&info);
                }
            }
            if let Some(d) = display {
                d.finish();
            }
        });
        let r = image::load(path, mode, verify, channels, Some(&progress)).map_err(load_err);
        drop(loaded);
        r
    })
}

/// Boots and runs the VM; returns when it ends. With `--name`, restores the
/// VM's managed save image instead of booting when there is one.
pub fn run(args: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let vcpus = u8::try_from(args.vcpus)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            CliError::bad_input(format!(
                "{} vCPUs requested, but cryo supports 1 to {}",
                args.vcpus,
                microvm::arch::layout::MAX_VCPUS
            ))
        })?;
    let managed = match &args.name {
        Some(name) => Some(ManagedVm::open(
            &args
                .state_dir
                .clone()
                .unwrap_or_else(crate::managed::default_state_dir),
            name,
        )?),
        None => None,
    };
    let api = args
        .api
        .clone()
        .or_else(|| managed.as_ref().map(ManagedVm::api_socket));
    let asked = ManagedConfig {
        kernel: std::fs::canonicalize(&args.kernel).unwrap_or_else(|_| args.kernel.clone()),
        initrd: args
            .initrd
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        cmdline: args.cmdline.clone(),
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
    };
    let api = bind_api(api.as_deref())?;
    if let Some(m) = &managed {
        if m.image().exists() {
            return run_managed_restore(m, &asked, &args, api, started);
        }
    }
    let config = VmConfig {
        vcpus,
        mem_mib: args.mem_mib,
        backing: match args.mem_file {
            Some(p) => MemoryBacking::SharedFile(p),
            None => MemoryBacking::Anonymous,
        },
        boot: BootSource {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            protocol: match args.boot {
                BootArg::Auto => BootProtocol::Auto,
                BootArg::Linux => BootProtocol::Linux,
                BootArg::Pvh => BootProtocol::Pvh,
            },
        },
        serial: serial_output(args.serial_out.as_deref())?,
        serial_input: true,
        disks: args.disks,
        nets: args.nets,
    };
    let vm = MicroVm::new(config)?;
    if let Some(m) = &managed {
        m.write_config(&asked)?;
    }
    info!("VM built in {:?}", started.elapsed());
    run_vm(vm, api, managed_info(managed.as_ref()), started)
}

fn managed_info(m: Option<&ManagedVm>) -> Option<Managed> {
    m.map(|m| Managed {
        name: m.name.clone(),
        image: m.image(),
    })
}

/// `cryo run --name NAME` with a managed image: restore it (with the same
/// configuration), and delete the image once the restored VM runs.
fn run_managed_restore(
    m: &ManagedVm,
    asked: &ManagedConfig,
    args: &RunArgs,
    api: Option<BoundApi>,
    started: Instant,
) -> Result<(), CliError> {
    let image_path = m.image();
    let channels = image::fixed::ChannelOptions::default();
    let mut loaded = load_with_progress(&image_path, RestoreMode::Eager, false, &channels)?;
    let diff = crate::managed::differences(asked, m.config().as_ref(), &loaded.snapshot.machine);
    if !diff.is_empty() {
        return Err(CliError::bad_input(format!(
            "{} has a managed save image made with another configuration: {}; run it with the image's configuration, or discard the image with `cryo managed-save-remove {}`",
            m.name,
            diff.join(", "),
            m.name
        )));
    }
    let serial = serial_output(args.serial_out.as_deref())?;
    let mut vm = MicroVm::restore_in(
        loaded.take_shell()?,
        &loaded.snapshot,
        serial,
        true,
        RestoreOptions {
            nets: args.nets.clone(),
            ..RestoreOptions::default()
        },
    )?;
    vm.start()?;
    eprintln!(
        "cryo: {} restored from its managed save image: guest resumed after {:.1} ms",
        m.name,
        started.elapsed().as_secs_f64() * 1000.0
    );
    // The restored VM runs: only now is the image no longer needed.
    m.remove_image().map_err(|e| {
        CliError::failure(format!(
            "the VM runs, but its managed image {} could not be removed: {e}",
            image_path.display()
        ))
    })?;
    run_vm(vm, api, managed_info(Some(m)), started)
}

/// Restores a VM from a saved file (or a migration) and runs it. Everything
/// that can be checked without the image (the file type, the API socket,
/// the serial output) is checked before any of it is read.
pub fn restore(args: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    if let Some(path) = &args.from {
        crate::files::check_input_file(path).map_err(CliError::bad_input)?;
    }
    if args.listen.is_some() && (args.lazy || args.verify) {
        return Err(CliError::bad_input(
            "--lazy and --verify apply to image files, not to --listen",
        ));
    }
    let api = bind_api(args.api.as_deref())?;
    let serial = serial_output(args.serial_out.as_deref())?;
    let mode = if args.lazy {
        RestoreMode::Lazy {
            prefetch: args.prefetch,
        }
    } else {
        RestoreMode::Eager
    };
    if args.lazy && !args.verify {
        eprintln!("{LAZY_WARNING}");
    }
    let mut channels = image::fixed::ChannelOptions::default();
    if let Some(n) = args.channels {
        channels.channels = usize::from(n);
    }
    if let Some(d) = args.direct_io {
        channels.direct_io = d.into();
    }
    let (source, mut loaded) = match (&args.from, &args.listen) {
        (Some(path), _) => (
            path.display().to_string(),
            load_with_progress(path, mode, args.verify, &channels)?,
        ),
        (None, Some(listen)) => (
            listen.clone(),
            image::migrate::receive_vm(listen, args.disk_changed_ok, &args.nets, args.prealloc_mib)
                .map_err(load_err)?,
        ),
        (None, None) => {
            return Err(CliError::bad_input(
                "restore needs --from FILE or --listen ENDPOINT",
            ))
        }
    };
    let read_time = started.elapsed();
    // The restore made the KVM VM while the image was read, or the RAM
    // arrived, where it could.
    let shell = loaded.take_shell()?;
    let mut vm = MicroVm::restore_in(
        shell,
        &loaded.snapshot,
        serial,
        true,
        RestoreOptions {
            allow_tsc_mismatch: args.allow_tsc_mismatch,
            disk_changed_ok: args.disk_changed_ok,
            nets: args.nets,
        },
    )?;
    if args.paused {
        vm.start_paused()?;
    } else {
        vm.start()?;
    }
    let mode_name = match mode {
        RestoreMode::Eager => "eager",
        RestoreMode::Lazy { prefetch: false } => "lazy",
        RestoreMode::Lazy { prefetch: true } => "lazy+prefetch",
    };
    // Time to resume is the restore's headline figure: always reported.
    eprintln!(
        "cryo: restored {source} ({mode_name}, {} MiB, {} vCPUs): guest {} after {:.1} ms (memory ready after {:.1} ms)",
        loaded.snapshot.machine.mem_mib,
        loaded.snapshot.machine.vcpus,
        if args.paused { "ready, paused (`cryo resume` runs it)," } else { "resumed" },
        started.elapsed().as_secs_f64() * 1000.0,
        read_time.as_secs_f64() * 1000.0
    );
    if let Some(prefetch) = loaded.prefetch {
        prefetch.start(|elapsed, pages| {
            eprintln!(
                "cryo: prefetch done: {pages} pages loaded in {:.1} ms after resuming",
                elapsed.as_secs_f64() * 1000.0
            );
        });
    }
    run_vm(vm, api, None, started)
}

/// Printed by every `restore --lazy` without `--verify`.
const LAZY_WARNING: &str = "cryo: WARNING: --lazy restores without checking page data: pages are read from the image on first touch and their checksums are not verified, so a corrupt image can run with corrupt memory. Run `cryo verify` on the image first, or add --verify.";

fn run_vm(
    mut vm: MicroVm,
    api: Option<BoundApi>,
    managed: Option<Managed>,
    started: Instant,
) -> Result<(), CliError> {
    let served = api.as_ref().map(|b| b.serve(&vm, managed)).transpose()?;
    let signals = crate::signals::SignalWatcher::install(vm.stop_handle())
        .map_err(|e| CliError::failure(format!("cannot install signal handlers: {e}")))?;
    let reason = vm.run(vec![signals]);
    // A save or snapshot under way stops, cleans up and answers its client
    // before the process ends.
    if let Some(handle) = served {
        handle.shutdown();
    }
    drop(api);
    let reason = reason?;
    info!("VM ended after {:?}: {reason:?}", started.elapsed());
    match reason {
        VmExitReason::Error(msg) => Err(CliError::failure(msg)),
        VmExitReason::TripleFault => {
            eprintln!("cryo: the guest triple-faulted (treated as a reset)");
            Ok(())
        }
        _ => Ok(()),
    }
}
