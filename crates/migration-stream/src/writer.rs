//! [`StreamWriter`]: writes a stream to any [`Write`].

use std::io::Write;

use serde::Serialize;

use crate::error::StreamError;
use crate::format::{
    check_layout, check_name, check_page_size, check_pages, RamRegion, ENC_RAW, ENC_ZERO,
    FORMAT_VERSION, MAGIC, MAX_PAYLOAD, MAX_REGIONS, RAW_PAGES_PER_RECORD_BYTES, REC_END,
    REC_PAGES, REC_RAM_LAYOUT, REC_SECTION, REC_SYNC,
};

/// Writes a stream: the header on creation, then one record per call, and
/// the end record in [`finish`](Self::finish).
///
/// The writer checks its arguments as the reader would (names, layout, page
/// ranges), so it never produces a stream the reader refuses. It writes each
/// record with a few `write_all` calls; wrap a file or socket in a
/// [`std::io::BufWriter`] for many small records.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    inner: W,
    page_size: u32,
    written: u64,
    records: u64,
    layout: Option<Vec<RamRegion>>,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the stream header for pages of `page_size` bytes (a power of
    /// two, 4096 ..= 2 MiB).
    pub fn new(inner: W, page_size: u32) -> Result<Self, StreamError> {
        check_page_size(page_size).map_err(StreamError::InvalidArgument)?;
        let mut w = StreamWriter {
            inner,
            page_size,
            written: 0,
            records: 0,
            layout: None,
        };
        let mut header = [0u8; 20];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[10..12].copy_from_slice(&0u16.to_le_bytes());
        header[12..16].copy_from_slice(&page_size.to_le_bytes());
        let crc = crc32c::crc32c(&header[..16]);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    /// The page size given to [`new`](Self::new).
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes a device section whose state is `state` encoded with postcard.
    /// Read it back with [`Section::decode`](crate::Section::decode).
    pub fn write_section<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        instance: u32,
        version: u32,
        state: &T,
    ) -> Result<(), StreamError> {
        let bytes = postcard::to_stdvec(state).map_err(StreamError::Encode)?;
        self.write_raw_section(name, instance, version, &bytes)
    }

    /// Writes a device section with already-encoded state bytes.
    ///
    /// `name` is 1 ..= 64 bytes of printable ASCII.
    pub fn write_raw_section(
        &mut self,
        name: &str,
        instance: u32,
        version: u32,
        bytes: &[u8],
    ) -> Result<(), StreamError> {
        check_name(name.as_bytes()).map_err(|reason| StreamError::BadSection {
            record: self.records,
            offset: self.written,
            reason,
        })?;
        self.payload_len(14 + name.len(), bytes.len())?;
        // Fits in a u32: the whole payload does (checked above).
        let state_len = bytes.len() as u32;
        let mut head = Vec::with_capacity(14 + name.len());
        // The name length is at most 64 (checked above).
        head.extend_from_slice(&(name.len() as u16).to_le_bytes());
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(&instance.to_le_bytes());
        head.extend_from_slice(&version.to_le_bytes());
        head.extend_from_slice(&state_len.to_le_bytes());
        self.write_record(REC_SECTION, &head, bytes)
    }

    /// Writes the RAM layout. A stream has at most one, and it must come
    /// before any pages. Regions are sorted, non-overlapping, page-aligned
    /// and nonzero in size; at most 1024.
    pub fn write_ram_layout(&mut self, regions: &[RamRegion]) -> Result<(), StreamError> {
        let bad = |reason| StreamError::BadLayout {
            record: self.records,
            offset: self.written,
            reason,
        };
        if self.layout.is_some() {
            return Err(bad("a stream has at most one RAM layout record".to_string()));
        }
        check_layout(regions, self.page_size).map_err(bad)?;
        let mut head = Vec::with_capacity(4 + 16 * regions.len());
        // At most MAX_REGIONS (checked above).
        debug_assert!(regions.len() <= MAX_REGIONS as usize);
        head.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        for r in regions {
            head.extend_from_slice(&r.guest_addr.to_le_bytes());
            head.extend_from_slice(&r.size.to_le_bytes());
        }
        self.write_record(REC_RAM_LAYOUT, &head, &[])?;
        self.layout = Some(regions.to_vec());
        Ok(())
    }

    /// Writes raw pages of region `region` starting at page `first_page`
    /// (page number within the region). `data.len()` is a multiple of the
    /// page size; the pages are split into records of at most 1 MiB of data
    /// (at least one page each). Empty `data` writes nothing.
    pub fn write_pages(
        &mut self,
        region: u32,
        first_page: u64,
        data: &[u8],
    ) -> Result<(), StreamError> {
        let ps = self.page_size as usize;
        if !data.len().is_multiple_of(ps) {
            return Err(StreamError::InvalidArgument(format!(
                "{} bytes of page data is not a multiple of the page size {ps}",
                data.len()
            )));
        }
        let count = (data.len() / ps) as u64;
        if count == 0 {
            return Ok(());
        }
        self.check_pages(region, first_page, count)?;
        let per_record = (RAW_PAGES_PER_RECORD_BYTES / ps).max(1);
        let mut page = first_page;
        for chunk in data.chunks(per_record * ps) {
            let n = (chunk.len() / ps) as u32;
            let head = pages_head(region, page, n, ENC_RAW);
            self.payload_len(head.len(), chunk.len())?;
            self.write_record(REC_PAGES, &head, chunk)?;
            page += u64::from(n);
        }
        Ok(())
    }

    /// Records that `count` pages of region `region` from `first_page` are
    /// all zero bytes (no data is written for them). A count of 0 writes
    /// nothing.
    pub fn write_zero_pages(
        &mut self,
        region: u32,
        first_page: u64,
        count: u64,
    ) -> Result<(), StreamError> {
        if count == 0 {
            return Ok(());
        }
        self.check_pages(region, first_page, count)?;
        let mut page = first_page;
        let mut left = count;
        while left > 0 {
            let n = left.min(u64::from(u32::MAX));
            // n <= u32::MAX by the line above.
            let head = pages_head(region, page, n as u32, ENC_ZERO);
            self.write_record(REC_PAGES, &head, &[])?;
            page += n;
            left -= n;
        }
        Ok(())
    }

    /// Writes a sync marker with sequence number `seq`.
    pub fn write_sync(&mut self, seq: u64) -> Result<(), StreamError> {
        self.write_record(REC_SYNC, &seq.to_le_bytes(), &[])
    }

    /// Writes the end record, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.write_record(REC_END, &[], &[])?;
        let offset = self.written;
        self.inner
            .flush()
            .map_err(|source| StreamError::Io { offset, source })?;
        Ok(self.inner)
    }

    fn check_pages(&self, region: u32, first_page: u64, count: u64) -> Result<(), StreamError> {
        let Some(layout) = &self.layout else {
            return Err(StreamError::PagesBeforeLayout {
                record: self.records,
                offset: self.written,
            });
        };
        check_pages(layout, self.page_size, region, first_page, count).map_err(|reason| {
            StreamError::PagesOutOfRange {
                record: self.records,
                offset: self.written,
                region,
                first_page,
                count,
                reason,
            }
        })
    }

    /// Checks that a payload of `a + b` bytes fits in a record and returns its length.
    fn payload_len(&self, a: usize, b: usize) -> Result<u32, StreamError> {
        let too_large = || StreamError::RecordTooLarge {
            record: self.records,
            offset: self.written,
            len: (a as u64).saturating_add(b as u64),
            max: MAX_PAYLOAD,
        };
        let len = a.checked_add(b).ok_or_else(too_large)?;
        match u32::try_from(len) {
            Ok(len) if len <= MAX_PAYLOAD => Ok(len),
            _ => Err(too_large()),
        }
    }

    /// Writes one record whose payload is `head` followed by `data`.
    fn write_record(
        &mut self,
        record_type: u16,
        head: &[u8],
        data: &[u8],
    ) -> Result<(), StreamError> {
        let len = self.payload_len(head.len(), data.len())?;
        let mut first = Vec::with_capacity(8 + head.len());
        first.extend_from_slice(&record_type.to_le_bytes());
        first.extend_from_slice(&0u16.to_le_bytes());
        first.extend_from_slice(&len.to_le_bytes());
        first.extend_from_slice(head);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&first), data);
        let offset = self.written;
        let io = |source| StreamError::Io { offset, source };
        self.inner.write_all(&first).map_err(io)?;
        self.inner.write_all(data).map_err(io)?;
        self.inner.write_all(&crc.to_le_bytes()).map_err(io)?;
        self.written += 12 + u64::from(len);
        self.records += 1;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let offset = self.written;
        self.inner
            .write_all(bytes)
            .map_err(|source| StreamError::Io { offset, source })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn pages_head(region: u32, first_page: u64, count: u32, encoding: u8) -> [u8; 17] {
    let mut h = [0u8; 17];
    h[0..4].copy_from_slice(&region.to_le_bytes());
    h[4..12].copy_from_slice(&first_page.to_le_bytes());
    h[12..16].copy_from_slice(&count.to_le_bytes());
    h[16] = encoding;
    h
}
