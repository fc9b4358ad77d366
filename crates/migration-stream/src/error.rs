//! The error type shared by the writer and the reader.

use std::io;

/// Everything that can go wrong while writing or reading a stream.
///
/// Every variant says what is wrong and, where a position exists, the record
/// number (records count from 0 after the header) and the byte offset of the
/// record's first byte (or, for truncation and I/O errors, of the point where
/// the input stopped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The underlying reader or writer failed.
    #[error("I/O error at byte offset {offset}: {source}")]
    Io {
        /// Bytes of the stream consumed (reader) or written (writer) before the failure.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The input does not start with [`MAGIC`](crate::MAGIC).
    #[error("not a cryo stream: the first 8 bytes are {found:02x?}, expected \"CRYOSTRM\"")]
    BadMagic {
        /// The 8 bytes found instead.
        found: [u8; 8],
    },
    /// The stream's format version is newer than this reader (or 0).
    #[error(
        "stream format version {found} is not supported: this cryo reads format versions 1 to {supported}"
    )]
    UnsupportedVersion {
        /// The version in the stream header.
        found: u16,
        /// The newest version this reader supports ([`FORMAT_VERSION`](crate::FORMAT_VERSION)).
        supported: u16,
    },
    /// The stream header has a valid checksum but an invalid field (flags or page size).
    #[error("bad stream header: {0}")]
    BadHeader(String),
    /// The stream header's CRC32C does not match its contents.
    #[error("stream header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// The CRC stored in the header.
        stored: u32,
        /// The CRC computed over the header's first 16 bytes.
        computed: u32,
    },
    /// A record's CRC32C does not match its header and payload.
    #[error(
        "record {record} at byte offset {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    RecordChecksum {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// The CRC stored after the payload.
        stored: u32,
        /// The CRC computed over the record header and payload.
        computed: u32,
    },
    /// The input ended in the middle of the header or of a record.
    #[error("truncated stream: input ended at byte offset {offset}, inside {what}")]
    Truncated {
        /// Bytes consumed when the input ended.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// A record's payload length is larger than the reader's limit (or the
    /// writer was asked for a record larger than [`MAX_PAYLOAD`](crate::MAX_PAYLOAD)).
    #[error("record {record} at byte offset {offset}: payload length {len} exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// The payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// A record type that format version 1 does not define.
    #[error("record {record} at byte offset {offset}: unknown record type {record_type}")]
    UnknownRecordType {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// The type found.
        record_type: u16,
    },
    /// A record whose framing or payload size is wrong (reserved flags set,
    /// payload too short or too long for its type).
    #[error("record {record} at byte offset {offset}: {reason}")]
    BadRecord {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An invalid device section (name, lengths).
    #[error("record {record} at byte offset {offset}: bad device section: {reason}")]
    BadSection {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A section's version is newer than the consumer can read.
    #[error("section '{name}' instance {instance} has version {found}; this cryo reads versions up to {max}")]
    SectionVersionTooNew {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Version in the stream.
        found: u32,
        /// Newest version the consumer reads.
        max: u32,
    },
    /// An invalid RAM layout (count, alignment, order, overlap, overflow, duplicate).
    #[error("record {record} at byte offset {offset}: bad RAM layout: {reason}")]
    BadLayout {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A pages record names a region or pages outside the RAM layout.
    #[error(
        "record {record} at byte offset {offset}: {count} pages from page {first_page} of region {region} are out of range: {reason}"
    )]
    PagesOutOfRange {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// Region index.
        region: u32,
        /// First page within the region.
        first_page: u64,
        /// Page count.
        count: u64,
        /// What is wrong.
        reason: String,
    },
    /// A pages record came before the RAM layout record.
    #[error("record {record} at byte offset {offset}: RAM pages before the RAM layout record")]
    PagesBeforeLayout {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
    },
    /// A pages encoding this version does not read (2 zstd and 3 lz4 are
    /// reserved for sockets; others are undefined).
    #[error("record {record} at byte offset {offset}: unsupported page encoding {encoding} ({})", encoding_name(*.encoding))]
    UnsupportedEncoding {
        /// Record number.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
        /// The encoding byte.
        encoding: u8,
    },
    /// A section's state could not be decoded as the requested type.
    #[error("section '{name}' instance {instance}: cannot decode its state: {source}")]
    Decode {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// The postcard error.
        #[source]
        source: postcard::Error,
    },
    /// A section's state decoded but left bytes unused.
    #[error(
        "section '{name}' instance {instance}: {extra} bytes left over after decoding its state"
    )]
    TrailingState {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Bytes left over.
        extra: usize,
    },
    /// A value could not be encoded with postcard.
    #[error("cannot encode section state: {0}")]
    Encode(#[source] postcard::Error),
    /// The input ended at a record boundary before the end record.
    #[error("truncated stream: no end record (input ended at byte offset {offset} after {records} records)")]
    MissingEnd {
        /// Bytes consumed.
        offset: u64,
        /// Records read.
        records: u64,
    },
    /// The writer was called with an invalid argument (page size, data length).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// `next_record` was called again after it returned an error.
    #[error("the stream reader already failed at byte offset {offset}; it cannot continue")]
    Failed {
        /// Bytes consumed when it failed.
        offset: u64,
    },
}

fn encoding_name(encoding: u8) -> &'static str {
    match encoding {
        0 => "raw",
        1 => "zero",
        2 => "zstd, reserved for sockets",
        3 => "lz4, reserved for sockets",
        _ => "undefined",
    }
}
