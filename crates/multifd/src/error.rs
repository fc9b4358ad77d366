//! The error type shared by the file and socket channels.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Which connection of a socket transfer an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The main (control) connection.
    Main,
    /// Data connection number `n` (counting from 0).
    Data(u16),
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Main => write!(f, "the main connection"),
            Channel::Data(n) => write!(f, "data channel {n}"),
        }
    }
}

/// The caller's own error (from a [`FileLayout`](crate::FileLayout) or a
/// [`receive`](crate::receive) allocator), kept whole with its source chain.
pub type CallerError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in a multifd transfer.
///
/// Each message is one line and says where it happened (channel, region,
/// chunk, file offset or packet) when that is known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MultifdError {
    /// A system call or a socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with its position (channel, region, chunk, offset).
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Direct I/O was required (`DirectIo::On`) but the file's filesystem
    /// refuses `O_DIRECT`.
    #[error(
        "{}: the filesystem ({fs_type}) does not support O_DIRECT; use direct I/O \"auto\" or \"off\", or put the file on a filesystem that does (ext4, xfs, btrfs)",
        path.display()
    )]
    DirectIoUnsupported {
        /// The file that was opened.
        path: PathBuf,
        /// The filesystem's name (from `statfs`), or its magic number.
        fs_type: String,
    },
    /// The peer sent something that breaks the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer closed a connection (or reset it) before the transfer was complete.
    #[error("{channel} was closed by the peer while {during}")]
    PeerDisconnected {
        /// Which connection.
        channel: Channel,
        /// What this side was doing.
        during: String,
    },
    /// A chunk or a packet does not match its CRC32C.
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// The memory regions, the file layout or a peer's RAM layout are
    /// inconsistent (sizes, alignment, ranges).
    #[error("layout error: {0}")]
    Layout(String),
    /// The transfer was stopped (another channel failed, or a thread panicked).
    #[error("transfer aborted: {0}")]
    Aborted(String),
    /// The peer reported an error of its own.
    #[error("the peer reported an error: {0}")]
    Remote(String),
    /// An argument (options, regions) is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A chunk read back was refused by the caller's
    /// [`FileLayout::chunk_loaded`](crate::FileLayout::chunk_loaded) (its
    /// checksum does not match).
    #[error("checksum mismatch: {context}: {source}")]
    ChunkRejected {
        /// Channel, region, chunk and bytes.
        context: String,
        /// The layout's error.
        #[source]
        source: CallerError,
    },
    /// The caller's layout or allocator failed.
    #[error("{context}: {source}")]
    Caller {
        /// What was being done.
        context: String,
        /// The caller's error.
        #[source]
        source: CallerError,
    },
}

impl MultifdError {
    /// An [`MultifdError::Io`] with its context.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        MultifdError::Io {
            context: context.into(),
            source,
        }
    }
}
