//! `cryo run`: build a VM from the command line and run it.

use std::fs::File;
use std::time::Instant;

use log::info;
use microvm::{
    BootProtocol, BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig, VmExitReason,
};

use crate::cli::{BootArg, RunArgs};
use crate::CliError;

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
    let serial = match &args.serial_out {
        None => SerialOutput::Stdout,
        Some(path) => SerialOutput::File(File::create(path).map_err(|e| {
            CliError::bad_input(format!(
                "cannot create serial output file {}: {e}",
                path.display()
            ))
        })?),
    };
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
        serial,
        serial_input: true,
    };
    let mut vm = MicroVm::new(config)?;
    info!("VM built in {:?}", started.elapsed());
    let signals = crate::signals::SignalWatcher::install(vm.stop_handle())
        .map_err(|e| CliError::failure(format!("cannot install signal handlers: {e}")))?;
    let reason = vm.run(vec![signals])?;
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
