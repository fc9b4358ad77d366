//! [`summarize`]: walks a whole stream and reports what it holds.

use std::io::Read;

use crate::error::StreamError;
use crate::format::RamRegion;
use crate::reader::{PagesKind, Record, StreamReader};

/// One device section as listed by [`summarize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// Device name.
    pub name: String,
    /// Instance id.
    pub instance: u32,
    /// Section version.
    pub version: u32,
    /// Size of the encoded state in bytes.
    pub size: u64,
}

/// What a stream holds, for `cryo inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// Format version from the header.
    pub format_version: u16,
    /// Page size from the header.
    pub page_size: u32,
    /// Device sections in stream order.
    pub sections: Vec<SectionInfo>,
    /// The RAM layout (empty if the stream has none).
    pub ram_layout: Vec<RamRegion>,
    /// Raw pages, counted once per pages record (a page sent twice counts twice).
    pub raw_pages: u64,
    /// Zero pages, counted the same way.
    pub zero_pages: u64,
    /// Sync markers.
    pub sync_markers: u64,
    /// Records, the end record included.
    pub records: u64,
    /// Stream size in bytes, up to and including the end record.
    pub total_bytes: u64,
}

/// Reads a whole stream (through its end record), validating every record,
/// and summarizes it. Page contents are read and checked, not kept.
pub fn summarize<R: Read>(r: R) -> Result<StreamSummary, StreamError> {
    let mut reader = StreamReader::new(r)?;
    let mut s = StreamSummary {
        format_version: reader.format_version(),
        page_size: reader.page_size(),
        sections: Vec::new(),
        ram_layout: Vec::new(),
        raw_pages: 0,
        zero_pages: 0,
        sync_markers: 0,
        records: 0,
        total_bytes: 0,
    };
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Section(sec) => s.sections.push(SectionInfo {
                size: sec.data.len() as u64,
                name: sec.name,
                instance: sec.instance,
                version: sec.version,
            }),
            Record::RamLayout(regions) => s.ram_layout = regions,
            Record::Pages(p) => match p.kind {
                PagesKind::Raw(_) => s.raw_pages += u64::from(p.count),
                PagesKind::Zero => s.zero_pages += u64::from(p.count),
            },
            Record::Sync(_) => s.sync_markers += 1,
            Record::End => {}
        }
    }
    s.records = reader.records_read();
    s.total_bytes = reader.offset();
    Ok(s)
}
