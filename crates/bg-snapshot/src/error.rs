//! The crate's error type.

use std::io;

/// A [`BlockSink`](crate::BlockSink)'s own error, kept whole (with its
/// source chain) in [`SnapshotError::Sink`].
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong while checking support, arming or running a snapshot.
///
/// Whatever the error, by the time a function returns it no memory is left
/// write-protected by this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The kernel lacks a feature the snapshot needs.
    #[error(
        "the kernel ({kernel}) does not offer {feature}, which Linux {since} introduced: {detail}"
    )]
    Unsupported {
        /// The missing feature.
        feature: &'static str,
        /// The Linux version that introduced it.
        since: &'static str,
        /// The running kernel's release string.
        kernel: String,
        /// What was tried and what failed.
        detail: String,
    },
    /// The kernel offers userfaultfd but this process may not use it.
    #[error("not allowed to create a userfaultfd: {0} (run as root / with CAP_SYS_PTRACE, set vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd)")]
    PermissionDenied(String),
    /// A range's memory type cannot be write-protected with userfaultfd.
    #[error("memory range {region} cannot be write-protected: {reason}")]
    UnsupportedMemory {
        /// Index of the range in the slice given to `arm`.
        region: usize,
        /// Why, including the mapping as `/proc/self/maps` shows it.
        reason: String,
    },
    /// An argument is invalid (alignment, block size, overlapping ranges, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A userfaultfd operation or thread creation failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The sink refused a block.
    #[error("sink failed to write block {block} of range {range}: {source}")]
    Sink {
        /// Range index.
        range: usize,
        /// Block index within the range.
        block: u64,
        /// The sink's own error.
        #[source]
        source: SinkError,
    },
    /// The userfaultfd reported something a write-protect-only registration never produces.
    #[error("unexpected userfaultfd event: {0}")]
    UnexpectedEvent(String),
    /// The snapshot was cancelled through its [`CancelHandle`](crate::CancelHandle).
    #[error("snapshot cancelled")]
    Cancelled,
}

impl SnapshotError {
    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> SnapshotError {
        SnapshotError::Io {
            op: op.into(),
            source,
        }
    }
}
