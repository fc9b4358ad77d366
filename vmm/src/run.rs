//! `cryo run` and `cryo restore`: build a VM (booted or restored) and run it
//! with the event loop, signal handling and the optional control socket.

use std::fs::File;
use std::path::Path;
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
        Some(path) => Ok(SerialOutput::File(File::create(path).map_err(|e| {
            CliError::bad_input(format!(
                "cannot create serial output file {}: {e}",
                path.display()
            ))
        })?)),
    }
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
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only long loads get a display: wait a moment first.
            let start = Instant::now();
            let mut display: Option<Display> = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if start.elapsed().as_millis() > 500 {
                    let info = progress.info();
                    display
                        .get_or_insert_with(|| Display::new("restore", info.bytes_total))
                        .update(&info);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if let Some(d) = display {
                d.finish();
            }
        });
        let r = image::load(path, mode, verify, channels, Some(&progress)).map_err(load_err);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
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
    if let Some(m) = &managed {
        if m.image().exists() {
            return run_managed_restore(m, &asked, &args, api.as_deref(), started);
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
    };
    let vm = MicroVm::new(config)?;
    if let Some(m) = &managed {
        m.write_config(&asked)?;
    }
    info!("VM built in {:?}", started.elapsed());
    run_vm(vm, api.as_deref(), managed_info(managed.as_ref()), started)
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
    api: Option<&Path>,
    started: Instant,
) -> Result<(), CliError> {
    let image_path = m.image();
    let channels = image::fixed::ChannelOptions::default();
    let loaded = load_with_progress(&image_path, RestoreMode::Eager, false, &channels)?;
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
    let mut vm = MicroVm::restore(
        &loaded.snapshot,
        loaded.memory,
        serial,
        true,
        RestoreOptions::default(),
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

/// Restores a VM from a saved file (or a migration) and runs it.
pub fn restore(args: RestoreArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let serial = serial_output(args.serial_out.as_deref())?;
    let mode = if args.lazy {
        RestoreMode::Lazy {
            prefetch: args.prefetch,
        }
    } else {
        RestoreMode::Eager
    };
    let mut channels = image::fixed::ChannelOptions::default();
    if let Some(n) = args.channels {
        channels.channels = usize::from(n);
    }
    if let Some(d) = args.direct_io {
        channels.direct_io = d.into();
    }
    let (source, loaded) = match (&args.from, &args.listen) {
        (Some(path), _) => (
            path.display().to_string(),
            load_with_progress(path, mode, args.verify, &channels)?,
        ),
        (None, Some(listen)) => {
            if args.lazy || args.verify {
                return Err(CliError::bad_input(
                    "--lazy and --verify apply to image files, not to --listen",
                ));
            }
            (
                listen.clone(),
                image::migrate::receive_vm(listen).map_err(load_err)?,
            )
        }
        (None, None) => {
            return Err(CliError::bad_input(
                "restore needs --from FILE or --listen ENDPOINT",
            ))
        }
    };
    let read_time = started.elapsed();
    let mut vm = MicroVm::restore(
        &loaded.snapshot,
        loaded.memory,
        serial,
        true,
        RestoreOptions {
            allow_tsc_mismatch: args.allow_tsc_mismatch,
        },
    )?;
    vm.start()?;
    let mode_name = match mode {
        RestoreMode::Eager => "eager",
        RestoreMode::Lazy { prefetch: false } => "lazy",
        RestoreMode::Lazy { prefetch: true } => "lazy+prefetch",
    };
    // Time to resume is the restore's headline figure: always reported.
    eprintln!(
        "cryo: restored {source} ({mode_name}, {} MiB, {} vCPUs): guest resumed after {:.1} ms (memory ready after {:.1} ms)",
        loaded.snapshot.machine.mem_mib,
        loaded.snapshot.machine.vcpus,
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
    run_vm(vm, args.api.as_deref(), None, started)
}

fn run_vm(
    mut vm: MicroVm,
    api: Option<&Path>,
    managed: Option<Managed>,
    started: Instant,
) -> Result<(), CliError> {
    if let Some(path) = api {
        let controller = vm.controller()?;
        crate::api::serve(path, controller, managed).map_err(|e| {
            CliError::bad_input(format!("cannot serve the API on {}: {e}", path.display()))
        })?;
    }
    let signals = crate::signals::SignalWatcher::install(vm.stop_handle())
        .map_err(|e| CliError::failure(format!("cannot install signal handlers: {e}")))?;
    let reason = vm.run(vec![signals]);
    if let Some(path) = api {
        let _ = std::fs::remove_file(path);
    }
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
