//! `cryo`: a small, fast KVM VMM whose job is to freeze and thaw whole VMs.
//!
//! This binary owns policy: the command line, which crates to combine, exit
//! codes. Exit status: 0 success, 1 runtime failure, 2 bad input.

mod api;
mod bench;
mod bench_devwrites;
mod bench_disk;
mod bench_migrate;
mod bench_migtrace;
mod bench_qemu;
mod bench_snapshot;
mod cli;
mod client;
mod error;
mod files;
mod image;
mod inspect;
mod managed;
mod progress;
mod run;
mod signals;

use std::process::ExitCode;

use clap::Parser;

use error::CliError;

/// Files cryo creates (images, managed state, sockets, logs, serial
/// output, a --mem-file) can hold guest memory: whatever the caller's
/// umask, they are created readable by their owner only (0600, 0700).
fn private_umask() {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
}

/// Verbs that print and exit end quietly when their output is closed
/// (`cryo inspect IMAGE | head -1`), as other Unix tools do: SIGPIPE is
/// restored to its default action. A process running a VM (run, restore,
/// bench) keeps it ignored, so that a client or peer that goes away cannot
/// end it; it reports the broken pipe as an error instead.
fn quiet_on_closed_output(command: &cli::Command) {
    if matches!(
        command,
        cli::Command::Run(_) | cli::Command::Restore(_) | cli::Command::Bench(_)
    ) {
        return;
    }
    // SAFETY: setting a signal's disposition to its default; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    private_umask();
    quiet_on_closed_output(&args.command);
    if let Err(e) = init_logging(args.log_level.as_deref(), args.log_file.as_deref()) {
        eprintln!("cryo: error: {}", e.message);
        return ExitCode::from(e.status);
    }
    // The KVM device: `/dev/kvm`, or `$CRYO_KVM_DEVICE` (hosts that put it
    // elsewhere, tests of the error paths). The library reads no environment.
    if let Some(path) = std::env::var_os("CRYO_KVM_DEVICE") {
        microvm::set_kvm_device_path(path.into());
    }
    let out = client::Output { json: args.json };
    let api =
        |a: &cli::ApiArgs, cmd: &str| client::call(&a.api, serde_json::json!({"cmd": cmd}), out);
    let result = match args.command {
        cli::Command::Run(a) => run::run(a),
        cli::Command::Restore(a) => run::restore(a),
        cli::Command::Save(a) => client::save(a, out),
        cli::Command::Snapshot(a) => client::snapshot(a, out),
        cli::Command::Migrate(a) => client::migrate(a, out),
        cli::Command::ManagedSave(a) => client::managed_save(a, out),
        cli::Command::ManagedSaveRemove(a) => managed::remove(
            &a.state_dir.unwrap_or_else(managed::default_state_dir),
            &a.name,
            out,
        ),
        cli::Command::Cancel(a) => api(&a, "cancel"),
        cli::Command::QueryProgress(a) => api(&a, "query-progress"),
        cli::Command::Inspect(a) => files::check_input_file(&a.file)
            .map_err(CliError::bad_input)
            .and_then(|()| inspect::inspect(a)),
        cli::Command::Verify(a) => files::check_input_file(&a.file)
            .map_err(CliError::bad_input)
            .and_then(|()| inspect::verify(a)),
        cli::Command::Bench(b) => bench::bench(b),
        cli::Command::Pause(a) => api(&a, "pause"),
        cli::Command::Resume(a) => api(&a, "resume"),
        cli::Command::Status(a) => api(&a, "status"),
        cli::Command::Quit(a) => api(&a, "quit"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryo: error: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}

fn init_logging(level: Option<&str>, file: Option<&std::path::Path>) -> Result<(), CliError> {
    // Quiet by default: warnings and errors only. `--log-level` or RUST_LOG for more.
    let env = env_logger::Env::default().default_filter_or(level.unwrap_or("warn"));
    let mut b = env_logger::Builder::from_env(env);
    b.format_timestamp_millis().format_target(true);
    if let Some(path) = file {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                CliError::bad_input(format!("cannot open log file {}: {e}", path.display()))
            })?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    b.init();
    Ok(())
}
