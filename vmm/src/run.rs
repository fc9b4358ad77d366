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
    let (snapshot, memory) = crate::save::load_stream_file(&args.from).map_err(|e| match e {
        crate::save::SaveError::Read { .. } | crate::save::SaveError::Invalid { .. } => {
            CliError::bad_input(e.to_string())
        }
        _ => CliError::failure(e.to_string()),
    })?;
    let loaded = started.elapsed();
    let vm = MicroVm::restore(
        &snapshot,
        memory,
        serial,
        true,
        RestoreOptions {
            allow_tsc_mismatch: args.allow_tsc_mismatch,
        },
    )?;
    info!(
        "restored from {} in {:?} (file read in {loaded:?})",
        args.from.display(),
        started.elapsed()
    );
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
