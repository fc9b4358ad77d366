//! The error a `cryo` verb ends with, and the exit status it maps to.
//!
//! Exit status: 0 success, 1 runtime failure ([`EXIT_FAILURE`]), 2 bad input
//! ([`EXIT_BAD_INPUT`]: arguments, files, host set-up). The status of a
//! typed error comes from its type ([`From`] impls below, through each
//! error's `is_bad_input`), never from its message.

use crate::image::SaveError;

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

    /// `bad_input` when `is_bad_input`, else `failure`, with `e`'s message.
    fn classified(e: &dyn std::fmt::Display, is_bad_input: bool) -> Self {
        if is_bad_input {
            CliError::bad_input(e.to_string())
        } else {
            CliError::failure(e.to_string())
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the user can do about `e` on this command line, if anything.
fn hint(e: &microvm::Error) -> &'static str {
    match e {
        microvm::Error::TscMismatch { .. } => ": pass --allow-tsc-mismatch to restore anyway",
        _ => "",
    }
}

impl From<microvm::Error> for CliError {
    fn from(e: microvm::Error) -> Self {
        let mut c = CliError::classified(&e, e.is_bad_input());
        c.message.push_str(hint(&e));
        c
    }
}

impl From<SaveError> for CliError {
    fn from(e: SaveError) -> Self {
        let mut c = CliError::classified(&e, e.is_bad_input());
        if let SaveError::Vm(vm) = &e {
            c.message.push_str(hint(vm));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_the_error_type() {
        let bad = SaveError::Invalid {
            path: "f".into(),
            reason: "not a cryo image".into(),
        };
        assert_eq!(CliError::from(bad).status, EXIT_BAD_INPUT);
        let failed = SaveError::Write {
            path: "f".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(CliError::from(failed).status, EXIT_FAILURE);
        let cancelled = SaveError::Cancelled("save");
        assert_eq!(CliError::from(cancelled).status, EXIT_FAILURE);
    }
}
