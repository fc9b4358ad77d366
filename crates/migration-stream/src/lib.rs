//! cryo's stream format: one versioned, self-describing, checksummed format
//! for a VM's state, used for device state inside a save image, for a plain
//! sequential save file, and for a migration socket.
//!
//! A stream is a 20-byte header (magic `CRYOSTRM`, format version, page
//! size, CRC32C) followed by records (type, length, payload, CRC32C):
//! device sections (name, instance, version, postcard-encoded serde state),
//! the RAM layout, batches of RAM pages (raw or zero), sync markers, and an
//! end record. The byte-level specification is `docs/stream-format.md` in the
//! repository.
//!
//! - [`StreamWriter`] writes a stream to any [`std::io::Write`], checking its
//!   arguments so that it only produces valid streams.
//! - [`StreamReader`] reads one from any [`std::io::Read`], record by record
//!   ([`Record`]). It treats its input as hostile: every length is bounded,
//!   nothing is allocated from an unchecked number, it never panics, and each
//!   [`StreamError`] names the problem, the record number and the byte offset.
//! - [`Section::decode`] turns a device section back into its state type,
//!   refusing a section version newer than the caller knows.
//! - [`summarize`] walks a whole stream for `cryo inspect`.
//!
//! ```
//! use migration_stream::{PagesKind, RamRegion, Record, StreamReader, StreamWriter};
//!
//! # fn main() -> Result<(), migration_stream::StreamError> {
//! let mut w = StreamWriter::new(Vec::new(), 4096)?;
//! w.write_section("serial", 0, 1, &(0x3f8u16, true))?;
//! w.write_ram_layout(&[RamRegion { guest_addr: 0, size: 4 * 4096 }])?;
//! w.write_pages(0, 0, &[0xaa; 4096])?;
//! w.write_zero_pages(0, 1, 3)?;
//! let bytes = w.finish()?;
//!
//! let mut r = StreamReader::new(bytes.as_slice())?;
//! while let Some(record) = r.next_record()? {
//!     match record {
//!         Record::Section(s) => {
//!             let (port, enabled): (u16, bool) = s.decode(1)?;
//!             assert_eq!((s.name.as_str(), port, enabled), ("serial", 0x3f8, true));
//!         }
//!         Record::RamLayout(regions) => assert_eq!(regions.len(), 1),
//!         Record::Pages(p) => match p.kind {
//!             PagesKind::Raw(data) => assert_eq!(data.len(), 4096),
//!             PagesKind::Zero => assert_eq!((p.first_page, p.count), (1, 3)),
//!         },
//!         Record::Sync(_) | Record::End => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod format;
mod reader;
mod summary;
mod writer;

pub use error::StreamError;
pub use format::{
    RamRegion, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_NAME_LEN, MAX_PAGE_SIZE, MAX_PAYLOAD,
    MAX_REGIONS, MIN_PAGE_SIZE, RAW_PAGES_PER_RECORD_BYTES, RECORD_HEADER_LEN,
};
pub use reader::{Pages, PagesKind, ReaderLimits, Record, Section, StreamReader};
pub use summary::{summarize, SectionInfo, StreamSummary};
pub use writer::StreamWriter;

#[cfg(test)]
mod tests;

/// Compiles and runs the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
