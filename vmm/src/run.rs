//! `cryo run` and `cryo restore`: build a VM (booted or restored) and run it
//! with the event loop, signal handling and the optional control socket.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use log::info;
use microvm::{
    BootProtocol, BootSource, MemoryBacking, MicroVm, RestoreOptions, SerialOutput, VmConfig,
    VmExitReason,
};

use crate::cli::{BootArg, RestoreArgs, RunArgs};
use crate::image::RestoreMode;
use crate::CliError;

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

/// Boots and runs the VM; returns when it ends.
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
    info!("VM built in {:?}", started.elapsed());
    run_vm(vm, args.api.as_deref(), started)
}

/// Restores a VM from a saved file and runs it.
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
    let mut channels = crate::image::fixed::ChannelOptions::default();
    if let Some(n) = args.channels {
        channels.channels = usize::from(n);
    }
    if let Some(d) = args.direct_io {
        channels.direct_io = d.into();
    }
    let to_cli = |e: crate::image::SaveError| {
        if e.is_bad_input() {
            CliError::bad_input(e.to_string())
        } else {
            CliError::failure(e.to_string())
        }
    };
    let (source, loaded) = match (&args.from, &args.listen) {
        (Some(path), _) => (
            path.display().to_string(),
            crate::image::load(path, mode, args.verify, &channels).map_err(to_cli)?,
        ),
        (None, Some(listen)) => {
            if args.lazy || args.verify {
                return Err(CliError::bad_input(
                    "--lazy and --verify apply to image files, not to --listen",
                ));
            }
            (
                listen.clone(),
                crate::image::migrate::receive_vm(listen).map_err(to_cli)?,
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
    run_vm(vm, args.api.as_deref(), started)
}

fn run_vm(mut vm: MicroVm, api: Option<&Path>, started: Instant) -> Result<(), CliError> {
    if let Some(path) = api {
        let controller = vm.controller()?;
        crate::api::serve(path, controller).map_err(|e| {
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
