//! `cryo`: a small, fast KVM VMM whose job is to freeze and thaw whole VMs.
//!
//! This binary owns policy: the command line, which crates to combine, exit
//! codes. Exit status: 0 success, 1 runtime failure, 2 bad input.

mod api;
mod bench;
mod bench_snapshot;
mod cli;
mod client;
mod image;
mod inspect;
mod run;
mod signals;

use std::process::ExitCode;

use clap::Parser;

/// Exit status for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for bad input (arguments, files, host set-up).
pub const EXIT_BAD_INPUT: u8 = 2;

/// A failure with the exit status it maps to.
#[derive(Debug)]
pub struct CliError {
    /// One line for the user.
    pub message: String,
    /// 1 or 2.
    pub status: u8,
}

impl CliError {
    /// Bad input (status 2).
    pub fn bad_input(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            status: EXIT_BAD_INPUT,
        }
    }
    /// Runtime failure (status 1).
    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            status: EXIT_FAILURE,
        }
    }
}

impl From<microvm::Error> for CliError {
    fn from(e: microvm::Error) -> Self {
        if e.is_bad_input() {
            CliError::bad_input(e.to_string())
        } else {
            CliError::failure(e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.log_level.as_deref());
    let result = match args.command {
        cli::Command::Run(a) => run::run(a),
        cli::Command::Restore(a) => run::restore(a),
        cli::Command::Save(a) => client::save(a),
        cli::Command::Snapshot(a) => client::snapshot(a),
        cli::Command::Cancel(a) => client::call(&a.api, serde_json::json!({"cmd": "cancel"})),
        cli::Command::Inspect(a) => inspect::inspect(a),
        cli::Command::Verify(a) => inspect::verify(a),
        cli::Command::Bench(b) => bench::bench(b),
        cli::Command::Pause(a) => client::call(&a.api, serde_json::json!({"cmd": "pause"})),
        cli::Command::Resume(a) => client::call(&a.api, serde_json::json!({"cmd": "resume"})),
        cli::Command::Status(a) => client::call(&a.api, serde_json::json!({"cmd": "status"})),
        cli::Command::Quit(a) => client::call(&a.api, serde_json::json!({"cmd": "quit"})),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryo: error: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}

fn init_logging(level: Option<&str>) {
    // Quiet by default: warnings and errors only. `--log-level` or RUST_LOG for more.
    let env = env_logger::Env::default().default_filter_or(level.unwrap_or("warn"));
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .format_target(true)
        .init();
}
