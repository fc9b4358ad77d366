//! The error type shared by the layout, the writer and the reader.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while laying out, writing or reading a
/// fixed-ram image.
///
/// Each variant says what is wrong and where (region, chunk, file offset),
/// in one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixedRamError {
    /// A system call on the image file failed.
    #[error("I/O error {context}: {source}")]
    Io {
        /// What was being done, e.g. "writing pages of region 0 at offset 0x100000".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file's header is zero (or the file is empty): a save that never
    /// committed, e.g. because it crashed before writing the header.
    #[error("incomplete fixed-ram image: the header was never written (the save did not commit)")]
    NotCommitted,
    /// The file does not start with [`MAGIC`](crate::MAGIC).
    #[error("not a cryo fixed-ram image: the first 8 bytes are not \"CRYOFRAM\"")]
    BadMagic,
    /// The image's format version is newer than this reader (or 0).
    #[error("fixed-ram format version {found} is not supported: this cryo reads format versions 1 to {supported}")]
    UnsupportedVersion {
        /// The version in the header.
        found: u32,
        /// The newest version this reader supports ([`FORMAT_VERSION`](crate::FORMAT_VERSION)).
        supported: u32,
    },
    /// The header's flags field has bits this version does not define.
    #[error("fixed-ram header has unknown flags {0:#010x} (this cryo defines none)")]
    UnknownFlags(u32),
    /// The header's CRC32C does not match its contents.
    #[error(
        "fixed-ram header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    HeaderChecksum {
        /// The CRC stored at the end of the header.
        stored: u32,
        /// The CRC computed over the header bytes before it.
        computed: u32,
    },
    /// The bitmaps or the checksum table do not match the metadata CRC in
    /// the header (format version 2 on).
    #[error(
        "fixed-ram metadata checksum mismatch (bitmaps and checksum table): stored {stored:#010x}, computed {computed:#010x}: the image is damaged"
    )]
    MetadataChecksum {
        /// The CRC in the header.
        stored: u32,
        /// The CRC computed over the bitmaps and the checksum table.
        computed: u32,
    },
    /// The page size is not a power of two in 4096 ..= 2 MiB.
    #[error("bad page size {0}: must be a power of two from 4096 to 2097152")]
    BadPageSize(u32),
    /// The alignment is invalid.
    #[error("bad alignment {alignment}: {reason}")]
    BadAlignment {
        /// The alignment found.
        alignment: u64,
        /// What is wrong.
        reason: String,
    },
    /// The chunk size is invalid.
    #[error("bad chunk size {chunk_size}: {reason}")]
    BadChunkSize {
        /// The chunk size found.
        chunk_size: u64,
        /// What is wrong.
        reason: String,
    },
    /// The region count is 0 or larger than [`MAX_REGIONS`](crate::MAX_REGIONS).
    #[error("bad region count {0}: must be 1 to 1024")]
    RegionCount(u32),
    /// An area (or the header itself) extends past the end of the file, or
    /// its end overflows.
    #[error("{what} at offset {offset:#x}, length {len:#x}, lies outside the file (file length {file_len:#x})")]
    OutOfFile {
        /// Which area, e.g. "page area of region 1".
        what: String,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// An area's offset is not a multiple of the alignment.
    #[error("{what} at offset {offset:#x} is not aligned to {alignment:#x}")]
    Misaligned {
        /// Which area.
        what: String,
        /// Its offset.
        offset: u64,
        /// The required alignment.
        alignment: u64,
    },
    /// Two areas of the file overlap.
    #[error("{a} overlaps {b}")]
    Overlap {
        /// The first area (with its byte range).
        a: String,
        /// The second area (with its byte range).
        b: String,
    },
    /// A region's bitmap has the wrong length, or bits set past the region's
    /// last page.
    #[error("bad bitmap of region {region}: {reason}")]
    BadBitmap {
        /// Region index.
        region: usize,
        /// What is wrong.
        reason: String,
    },
    /// A region entry is invalid (size, alignment, order, overlap in guest
    /// space, overflow).
    #[error("bad region {region}: {reason}")]
    BadRegion {
        /// Region index.
        region: usize,
        /// What is wrong.
        reason: String,
    },
    /// The checksum table's length does not match the number of chunks.
    #[error("bad checksum table: length {found} bytes, expected {expected} (4 per chunk)")]
    BadChecksumTable {
        /// 4 × total chunks.
        expected: u64,
        /// The length in the header.
        found: u64,
    },
    /// The file's length is not `device-state offset + device-state length`.
    #[error("bad file length {found:#x}: the header says the image ends at {expected:#x}")]
    FileLength {
        /// Where the header says the file ends.
        expected: u64,
        /// The real file length.
        found: u64,
    },
    /// A chunk of page data does not match its CRC32C.
    #[error("chunk {chunk} of region {region} (guest {guest_start:#x}..{guest_end:#x}) is corrupt: CRC32C {found:#010x}, expected {expected:#010x}")]
    ChunkChecksum {
        /// Region index.
        region: usize,
        /// Chunk index within the region.
        chunk: u64,
        /// The CRC in the checksum table.
        expected: u32,
        /// The CRC of the bytes read.
        found: u32,
        /// Guest physical address of the chunk's first byte.
        guest_start: u64,
        /// Guest physical address just past the chunk's last byte.
        guest_end: u64,
    },
    /// The device-state blob does not match its CRC32C.
    #[error("device state at offset {offset:#x} ({len} bytes) is corrupt: CRC32C {found:#010x}, expected {expected:#010x}")]
    DeviceStateChecksum {
        /// The device state's offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the bytes read.
        found: u32,
    },
    /// `commit` was called before every chunk was written.
    #[error("chunk {chunk} of region {region} was never written")]
    MissingChunk {
        /// Region index.
        region: usize,
        /// Chunk index within the region.
        chunk: u64,
    },
    /// `ImageWriter::create` was given a path that exists.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// The API was misused (region or chunk out of range, wrong data length,
    /// non-empty file).
    #[error("invalid argument: {0}")]
    BadArgument(String),
}

impl FixedRamError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        FixedRamError::Io {
            context: context.into(),
            source,
        }
    }
}
