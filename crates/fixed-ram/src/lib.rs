//! cryo's fixed-ram save image: every guest page has one fixed place in the
//! file, so zero pages are holes (the file is sparse), a page written twice
//! overwrites itself, any page can be read or `mmap`ed directly, and many
//! threads can write at once with positioned I/O. Page data is checked by a
//! CRC32C per chunk (1 MiB), and the header is written last, after the data
//! is durable, so a crashed save is recognisably incomplete
//! ([`FixedRamError::NotCommitted`]). The byte-level specification is
//! `docs/fixed-ram-format.md` in the repository.
//!
//! - [`Layout`] places the regions ([`RegionSpec`] in, [`RegionLayout`] out)
//!   and splits them into chunks.
//! - [`ImageWriter`] creates the file; [`ImageWriter::write_chunk`] is called
//!   from any number of threads, one chunk at a time; [`ImageWriter::commit`]
//!   writes bitmaps, checksum table, device state and finally the header.
//! - [`Image`] opens a file, treating it as hostile (every offset and length
//!   is checked against the real file length; see [`Image::parse_header`]),
//!   and reads chunks ([`Image::read_chunk_into`]), checks everything
//!   ([`Image::verify`]) or maps a page area ([`Image::map_page_area`]).
//!   [`Image::read_header`] reads the header alone, for work that needs only
//!   the layout and can start before the rest is read.
//!
//! ```
//! use fixed_ram::{Image, ImageWriter, Layout, RegionSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("fixed-ram-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let path = dir.join("vm.img");
//! # let _ = std::fs::remove_file(&path);
//! let layout = Layout::new(4096, &[RegionSpec { guest_addr: 0, size: 2 << 20 }])?;
//! let guest = vec![0u8; 2 << 20]; // guest memory, mostly zero
//! let writer = ImageWriter::create(&path, layout)?;
//! for chunk in 0..writer.layout().chunks(0) {
//!     let (offset, len) = writer.layout().chunk_range(0, chunk);
//!     writer.write_chunk(0, chunk, &guest[offset as usize..][..len as usize])?;
//! }
//! writer.commit(b"device state")?; // then rename it into place
//!
//! let image = Image::open(&path)?;
//! image.verify()?;
//! let mut restored = vec![0u8; 2 << 20];
//! for chunk in 0..image.layout().chunks(0) {
//!     let (offset, len) = image.layout().chunk_range(0, chunk);
//!     image.read_chunk_into(0, chunk, &mut restored[offset as usize..][..len as usize], true)?;
//! }
//! assert_eq!(image.device_state()?, b"device state");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
mod header;
mod image;
mod io;
mod layout;
mod writer;

pub use error::FixedRamError;
pub use header::Header;
pub use image::{Image, PageAreaMapping, VerifyReport};
pub use layout::{
    Layout, RegionLayout, RegionSpec, DEFAULT_ALIGNMENT, DEFAULT_CHUNK_SIZE, FORMAT_VERSION,
    HEADER_FIXED_LEN, MAGIC, MAX_ALIGNMENT, MAX_PAGE_SIZE, MAX_REGIONS, MIN_PAGE_SIZE,
    REGION_ENTRY_LEN,
};
pub use writer::{ChunkStats, CommitTimes, ImageWriter};

#[cfg(test)]
mod tests;

/// Compiles and runs the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
