//! [`StreamReader`]: reads and validates a stream from any [`Read`].

use std::io::{ErrorKind, Read};

use serde::de::DeserializeOwned;

use crate::error::StreamError;
use crate::format::{
    check_layout, check_name, check_page_size, check_pages, Cursor, RamRegion, ENC_RAW, ENC_ZERO,
    FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_PAYLOAD, MAX_REGIONS, PAGES_HEADER_LEN,
    RECORD_HEADER_LEN, REC_END, REC_PAGES, REC_RAM_LAYOUT, REC_SECTION, REC_SYNC,
};

/// Limits a [`StreamReader`] enforces beyond the format's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderLimits {
    /// Largest record payload accepted, in bytes. Values above
    /// [`MAX_PAYLOAD`] act as [`MAX_PAYLOAD`]. The writer's pages records
    /// hold up to 1 MiB of data plus 17 bytes (one page if pages are larger),
    /// so a limit below that refuses ordinary streams.
    pub max_payload: u32,
}

impl Default for ReaderLimits {
    fn default() -> Self {
        ReaderLimits {
            max_payload: MAX_PAYLOAD,
        }
    }
}

/// One device's state, as stored in a device section record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Device name: 1 ..= 64 bytes of printable ASCII.
    pub name: String,
    /// Instance id (which of several devices with this name).
    pub instance: u32,
    /// Version of this section's state layout.
    pub version: u32,
    /// The state, postcard-encoded.
    pub data: Vec<u8>,
}

impl Section {
    /// Decodes the state as a `T`, refusing a section version newer than
    /// `max_version` and state bytes left over after decoding.
    ///
    /// `T` is one layout: postcard does not describe itself, so a consumer
    /// whose section layout has changed across versions must not decode an
    /// older version as today's `T`; it matches on [`Section::version`] and
    /// decodes [`Section::data`] through the layout of that version (as
    /// cryo's `microvm::persist::StateSection` does).
    pub fn decode<T: DeserializeOwned>(&self, max_version: u32) -> Result<T, StreamError> {
        if self.version > max_version {
            return Err(StreamError::SectionVersionTooNew {
                name: self.name.clone(),
                instance: self.instance,
                found: self.version,
                max: max_version,
            });
        }
        let (value, rest) =
            postcard::take_from_bytes(&self.data).map_err(|source| StreamError::Decode {
                name: self.name.clone(),
                instance: self.instance,
                source,
            })?;
        if !rest.is_empty() {
            return Err(StreamError::TrailingState {
                name: self.name.clone(),
                instance: self.instance,
                extra: rest.len(),
            });
        }
        Ok(value)
    }
}

/// A batch of consecutive pages of one RAM region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    /// Index of the region in the RAM layout.
    pub region: u32,
    /// First page, numbered within the region.
    pub first_page: u64,
    /// Number of pages (at least 1).
    pub count: u32,
    /// The pages' contents.
    pub kind: PagesKind,
}

/// How a [`Pages`] record carries its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagesKind {
    /// Exactly `count * page_size` bytes.
    Raw(Vec<u8>),
    /// All pages are zero bytes.
    Zero,
}

/// One record of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A device section.
    Section(Section),
    /// The RAM layout (validated; also available from [`StreamReader::ram_layout`]).
    RamLayout(Vec<RamRegion>),
    /// A batch of pages (validated against the RAM layout).
    Pages(Pages),
    /// A sync marker with its sequence number.
    Sync(u64),
    /// The end record; the reader returns `None` after it.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Ended,
    Failed,
}

/// Reads a stream record by record, validating everything.
///
/// The input is treated as hostile: lengths are checked before use, payloads
/// are read incrementally (a length claiming more than the input holds costs
/// no more memory than the input), and every error says where it happened.
/// After the end record [`next_record`](Self::next_record) returns `None`
/// without reading further; after an error it returns
/// [`StreamError::Failed`].
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    inner: R,
    offset: u64,
    format_version: u16,
    page_size: u32,
    max_payload: u32,
    layout: Option<Vec<RamRegion>>,
    records: u64,
    state: State,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header, with default limits.
    pub fn new(inner: R) -> Result<Self, StreamError> {
        Self::with_limits(inner, ReaderLimits::default())
    }

    /// Reads and checks the stream header, with `limits`.
    pub fn with_limits(inner: R, limits: ReaderLimits) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            inner,
            offset: 0,
            format_version: 0,
            page_size: 0,
            max_payload: limits.max_payload.min(MAX_PAYLOAD),
            layout: None,
            records: 0,
            state: State::Failed,
        };
        let mut header = [0u8; HEADER_LEN];
        r.read_exact_at(&mut header[..8], "the stream header")?;
        if header[..8] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&header[..8]);
            return Err(StreamError::BadMagic { found });
        }
        r.read_exact_at(&mut header[8..10], "the stream header")?;
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version == 0 || version > FORMAT_VERSION {
            return Err(StreamError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        r.read_exact_at(&mut header[10..], "the stream header")?;
        let stored = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let computed = crc32c::crc32c(&header[..16]);
        if stored != computed {
            return Err(StreamError::HeaderChecksum { stored, computed });
        }
        let flags = u16::from_le_bytes([header[10], header[11]]);
        if flags != 0 {
            return Err(StreamError::BadHeader(format!(
                "unknown flags {flags:#06x} (no flags are defined in format version {FORMAT_VERSION})"
            )));
        }
        let page_size = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        check_page_size(page_size).map_err(StreamError::BadHeader)?;
        r.format_version = version;
        r.page_size = page_size;
        r.state = State::Open;
        Ok(r)
    }

    /// The stream's format version (from its header).
    pub fn format_version(&self) -> u16 {
        self.format_version
    }

    /// The stream's page size (from its header).
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The RAM layout, once its record has been read.
    pub fn ram_layout(&self) -> Option<&[RamRegion]> {
        self.layout.as_deref()
    }

    /// Bytes consumed from the input so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Records read so far (the end record included).
    pub fn records_read(&self) -> u64 {
        self.records
    }

    /// Reads the next record: `Some(Record::End)` for the end record, then
    /// `None` on every later call. Input that ends before the end record is
    /// an error ([`StreamError::MissingEnd`] at a record boundary,
    /// [`StreamError::Truncated`] inside one).
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        match self.state {
            State::Ended => return Ok(None),
            State::Failed => {
                return Err(StreamError::Failed {
                    offset: self.offset,
                })
            }
            State::Open => {}
        }
        match self.read_record() {
            Ok(rec) => {
                self.records += 1;
                if rec == Record::End {
                    self.state = State::Ended;
                }
                Ok(Some(rec))
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Returns the inner reader (positioned after the last byte consumed).
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_record(&mut self) -> Result<Record, StreamError> {
        let record = self.records;
        let offset = self.offset;
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        let got = self.fill(&mut hdr)?;
        if got == 0 {
            return Err(StreamError::MissingEnd {
                offset,
                records: record,
            });
        }
        if got < hdr.len() {
            return Err(StreamError::Truncated {
                offset: self.offset,
                what: format!("the header of record {record}"),
            });
        }
        let record_type = u16::from_le_bytes([hdr[0], hdr[1]]);
        let flags = u16::from_le_bytes([hdr[2], hdr[3]]);
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if len > self.max_payload {
            return Err(StreamError::RecordTooLarge {
                record,
                offset,
                len: u64::from(len),
                max: self.max_payload,
            });
        }
        let payload = self.read_payload(len as usize, record)?;
        let mut crc = [0u8; 4];
        self.read_exact_at(&mut crc, &format!("the checksum of record {record}"))?;
        let stored = u32::from_le_bytes(crc);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&hdr), &payload);
        if stored != computed {
            return Err(StreamError::RecordChecksum {
                record,
                offset,
                stored,
                computed,
            });
        }
        let bad = |reason: String| StreamError::BadRecord {
            record,
            offset,
            reason,
        };
        if flags != 0 {
            return Err(bad(format!(
                "unknown record flags {flags:#06x} (no flags are defined in format version {FORMAT_VERSION})"
            )));
        }
        match record_type {
            REC_SECTION => self
                .parse_section(payload, record, offset)
                .map(Record::Section),
            REC_RAM_LAYOUT => self
                .parse_layout(&payload, record, offset)
                .map(Record::RamLayout),
            REC_PAGES => self.parse_pages(payload, record, offset).map(Record::Pages),
            REC_SYNC => match <[u8; 8]>::try_from(payload.as_slice()) {
                Ok(b) => Ok(Record::Sync(u64::from_le_bytes(b))),
                Err(_) => Err(bad(format!(
                    "sync marker payload is {} bytes, expected 8",
                    payload.len()
                ))),
            },
            REC_END if payload.is_empty() => Ok(Record::End),
            REC_END => Err(bad(format!(
                "end record payload is {} bytes, expected 0",
                payload.len()
            ))),
            _ => Err(StreamError::UnknownRecordType {
                record,
                offset,
                record_type,
            }),
        }
    }

    fn parse_section(
        &self,
        mut payload: Vec<u8>,
        record: u64,
        offset: u64,
    ) -> Result<Section, StreamError> {
        let bad = |reason: String| StreamError::BadSection {
            record,
            offset,
            reason,
        };
        let short = || bad(format!("payload of {} bytes is too short", payload.len()));
        let mut c = Cursor::new(&payload);
        let name_len = c.u16().ok_or_else(short)?;
        let name = c.bytes(usize::from(name_len)).ok_or_else(short)?;
        check_name(name).map_err(bad)?;
        // Printable ASCII (checked above) is valid UTF-8.
        let name = String::from_utf8_lossy(name).into_owned();
        let instance = c.u32().ok_or_else(short)?;
        let version = c.u32().ok_or_else(short)?;
        let state_len = c.u32().ok_or_else(short)?;
        if u64::from(state_len) != c.remaining() as u64 {
            return Err(bad(format!(
                "state length is {state_len} but {} bytes follow it in the payload",
                c.remaining()
            )));
        }
        let start = c.pos();
        let data = payload.split_off(start);
        Ok(Section {
            name,
            instance,
            version,
            data,
        })
    }

    fn parse_layout(
        &mut self,
        payload: &[u8],
        record: u64,
        offset: u64,
    ) -> Result<Vec<RamRegion>, StreamError> {
        let bad = |reason: String| StreamError::BadLayout {
            record,
            offset,
            reason,
        };
        if self.layout.is_some() {
            return Err(bad(
                "a second RAM layout record (a stream has at most one)".to_string()
            ));
        }
        let mut c = Cursor::new(payload);
        let count = c
            .u32()
            .ok_or_else(|| bad(format!("payload of {} bytes is too short", payload.len())))?;
        if count > MAX_REGIONS {
            return Err(bad(format!(
                "{count} regions, at most {MAX_REGIONS} are allowed"
            )));
        }
        let expected = 4 + 16 * count as usize;
        if payload.len() != expected {
            return Err(bad(format!(
                "payload is {} bytes, expected {expected} for {count} regions",
                payload.len()
            )));
        }
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (Some(guest_addr), Some(size)) = (c.u64(), c.u64()) else {
                return Err(bad("payload too short".to_string()));
            };
            regions.push(RamRegion { guest_addr, size });
        }
        check_layout(&regions, self.page_size).map_err(bad)?;
        self.layout = Some(regions.clone());
        Ok(regions)
    }

    fn parse_pages(
        &self,
        mut payload: Vec<u8>,
        record: u64,
        offset: u64,
    ) -> Result<Pages, StreamError> {
        let mut c = Cursor::new(&payload);
        let (Some(region), Some(first_page), Some(count), Some(encoding)) =
            (c.u32(), c.u64(), c.u32(), c.u8())
        else {
            return Err(StreamError::BadRecord {
                record,
                offset,
                reason: format!(
                    "RAM pages payload is {} bytes, shorter than its {PAGES_HEADER_LEN}-byte header",
                    payload.len()
                ),
            });
        };
        let Some(layout) = &self.layout else {
            return Err(StreamError::PagesBeforeLayout { record, offset });
        };
        check_pages(layout, self.page_size, region, first_page, u64::from(count)).map_err(
            |reason| StreamError::PagesOutOfRange {
                record,
                offset,
                region,
                first_page,
                count: u64::from(count),
                reason,
            },
        )?;
        let data_len = c.remaining() as u64;
        let expected = match encoding {
            ENC_RAW => u64::from(count) * u64::from(self.page_size),
            ENC_ZERO => 0,
            _ => {
                return Err(StreamError::UnsupportedEncoding {
                    record,
                    offset,
                    encoding,
                })
            }
        };
        if data_len != expected {
            return Err(StreamError::BadRecord {
                record,
                offset,
                reason: format!(
                    "RAM pages record for {count} pages carries {data_len} bytes of data, expected {expected}"
                ),
            });
        }
        let kind = if encoding == ENC_RAW {
            PagesKind::Raw(payload.split_off(PAGES_HEADER_LEN))
        } else {
            PagesKind::Zero
        };
        Ok(Pages {
            region,
            first_page,
            count,
            kind,
        })
    }

    /// Reads a payload of `len` bytes (already checked against the limit),
    /// growing the buffer as data arrives rather than trusting `len`.
    fn read_payload(&mut self, len: usize, record: u64) -> Result<Vec<u8>, StreamError> {
        const FIRST_CHUNK: usize = 64 << 10;
        let mut buf = Vec::new();
        while buf.len() < len {
            let start = buf.len();
            let step = (len - start).min(start.max(FIRST_CHUNK));
            buf.resize(start + step, 0);
            let got = self.fill(&mut buf[start..])?;
            if got < step {
                return Err(StreamError::Truncated {
                    offset: self.offset,
                    what: format!("the payload of record {record} ({len} bytes)"),
                });
            }
        }
        Ok(buf)
    }

    fn read_exact_at(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        if self.fill(buf)? < buf.len() {
            return Err(StreamError::Truncated {
                offset: self.offset,
                what: what.to_string(),
            });
        }
        Ok(())
    }

    /// Reads until `buf` is full or the input ends; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => {
                    // A misbehaving reader may claim more than it was given.
                    let n = n.min(buf.len() - filled);
                    filled += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                Err(source) => {
                    return Err(StreamError::Io {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
        Ok(filled)
    }
}
