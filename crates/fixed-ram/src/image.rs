//! [`Image`]: opens, validates, reads, verifies and maps an image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::header::header_len;
use crate::io::read_exact_at;
use crate::{FixedRamError, Header, Layout, FORMAT_VERSION, MAX_REGIONS};

/// What [`Image::verify`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: u64,
    /// Bytes read and checked: every page area (holes included) and the
    /// device state.
    pub bytes_checked: u64,
    /// Pages present in the bitmaps.
    pub present_pages: u64,
}

/// The validated header of the image in `file`, and the file's length.
fn read_header_and_len(file: &File) -> Result<(Header, u64), FixedRamError> {
    let file_len = file
        .metadata()
        .map_err(|e| FixedRamError::io("reading the image's metadata", e))?
        .len();
    let max_header = header_len(FORMAT_VERSION, MAX_REGIONS as usize) as u64;
    let mut bytes = vec![0u8; file_len.min(max_header) as usize];
    read_exact_at(file, &mut bytes, 0, &|| "the header".to_string())?;
    Ok((Header::parse(&bytes, file_len)?, file_len))
}

/// A committed, validated image opened for reading. `Send + Sync`: chunks
/// may be read from many threads at once.
#[derive(Debug)]
pub struct Image {
    file: File,
    header: Header,
    layout: Layout,
    /// One bitmap per region, 64 pages per word.
    bitmaps: Vec<Vec<u64>>,
    present: Vec<u64>,
    /// CRC32C per chunk, in checksum-table order.
    checksums: Vec<u32>,
    file_len: u64,
}

impl Image {
    /// Opens `path` read-only and validates it (see [`from_file`](Self::from_file)).
    pub fn open(path: &Path) -> Result<Image, FixedRamError> {
        let file = File::open(path)
            .map_err(|e| FixedRamError::io(format!("opening {}", path.display()), e))?;
        Image::from_file(file)
    }

    /// Validates the image in `file` (header, every area against the real
    /// file length) and reads its bitmaps and checksum table. `file` must be
    /// an ordinary (not `O_DIRECT`) descriptor; pass an `O_DIRECT` one to
    /// [`read_chunk_via`](Self::read_chunk_via) instead.
    pub fn from_file(file: File) -> Result<Image, FixedRamError> {
        let (header, file_len) = read_header_and_len(&file)?;
        let layout = header.layout()?;
        let ps = u64::from(header.page_size);
        // Bitmap and checksum-table lengths were bounded by the file length.
        let mut raw_bitmaps = Vec::with_capacity(header.regions.len());
        for (i, r) in header.regions.iter().enumerate() {
            let mut raw = vec![0u8; r.bitmap_len as usize];
            read_exact_at(&file, &mut raw, r.bitmap_offset, &|| {
                format!("the bitmap of region {i}")
            })?;
            raw_bitmaps.push(raw);
        }
        let mut raw_table = vec![0u8; header.checksum_table_len as usize];
        read_exact_at(&file, &mut raw_table, header.checksum_table_offset, &|| {
            "the checksum table".to_string()
        })?;
        // 12. The metadata CRC (version 2 on), before anything is read from
        // the bitmaps or the table.
        if let Some(stored) = header.metadata_crc {
            let computed = raw_bitmaps
                .iter()
                .chain(std::iter::once(&raw_table))
                .fold(0, |crc, b| crc32c::crc32c_append(crc, b));
            if stored != computed {
                return Err(FixedRamError::MetadataChecksum { stored, computed });
            }
        }
        let mut bitmaps = Vec::with_capacity(header.regions.len());
        let mut present = Vec::with_capacity(header.regions.len());
        for (i, (r, raw)) in header.regions.iter().zip(&raw_bitmaps).enumerate() {
            let words: Vec<u64> = raw
                .chunks_exact(8)
                .map(|w| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(w);
                    u64::from_le_bytes(b)
                })
                .collect();
            let pages = r.size / ps;
            if pages % 64 != 0 {
                if let Some(&last) = words.last() {
                    if last >> (pages % 64) != 0 {
                        return Err(FixedRamError::BadBitmap {
                            region: i,
                            reason: format!("bits are set past its last page {}", pages - 1),
                        });
                    }
                }
            }
            present.push(words.iter().map(|w| u64::from(w.count_ones())).sum());
            bitmaps.push(words);
        }
        let checksums = raw_table
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        Ok(Image {
            file,
            header,
            layout,
            bitmaps,
            present,
            checksums,
            file_len,
        })
    }

    /// Reads and validates only the header of the image in `file` (one
    /// small read): enough to map the page areas, or to register them with
    /// a hypervisor, while [`from_file`](Self::from_file) reads and checks
    /// the rest. A header alone proves little: use nothing from the pages
    /// before `from_file` has accepted the same file.
    pub fn read_header(file: &File) -> Result<Header, FixedRamError> {
        read_header_and_len(file).map(|(header, _)| header)
    }

    /// Validates a header (the first bytes of a file, at least the whole
    /// header) against a file length, without touching any file. For fuzzing
    /// and inspection; [`from_file`](Self::from_file) does the same checks.
    pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, FixedRamError> {
        Header::parse(bytes, file_len)
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The layout described by the header.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether page `page` of `region` has data in the file (false for a
    /// zero page, and for a region or page that does not exist).
    pub fn is_present(&self, region: usize, page: u64) -> bool {
        self.bitmaps
            .get(region)
            .and_then(|words| words.get((page / 64) as usize))
            .is_some_and(|w| (w >> (page % 64)) & 1 == 1)
    }

    /// The number of present pages in `region` (0 for a region that does
    /// not exist).
    pub fn present_pages(&self, region: usize) -> u64 {
        self.present.get(region).copied().unwrap_or(0)
    }

    /// The stored CRC32C of a chunk (0 for a chunk that does not exist).
    pub fn chunk_checksum(&self, region: usize, chunk: u64) -> u32 {
        self.layout
            .global_chunk(region, chunk)
            .map_or(0, |g| self.checksums[g])
    }

    /// Reads chunk `chunk` of `region` into `dst` (exactly the chunk's
    /// length, e.g. guest memory): each run of present pages with one
    /// `pread` straight into `dst`, absent pages zero-filled (skipped when
    /// `dst_is_zeroed`, e.g. fresh anonymous memory), then checks the chunk's
    /// CRC32C ([`FixedRamError::ChunkChecksum`]).
    pub fn read_chunk_into(
        &self,
        region: usize,
        chunk: u64,
        dst: &mut [u8],
        dst_is_zeroed: bool,
    ) -> Result<(), FixedRamError> {
        self.read_chunk_impl(&self.file, region, chunk, dst, dst_is_zeroed)
    }

    /// The same as [`read_chunk_into`](Self::read_chunk_into) through the
    /// caller's descriptor for the same file (e.g. opened with `O_DIRECT`;
    /// then `dst` must be page aligned).
    pub fn read_chunk_via(
        &self,
        fd: &File,
        region: usize,
        chunk: u64,
        dst: &mut [u8],
        dst_is_zeroed: bool,
    ) -> Result<(), FixedRamError> {
        self.read_chunk_impl(fd, region, chunk, dst, dst_is_zeroed)
    }

    fn read_chunk_impl(
        &self,
        fd: &File,
        region: usize,
        chunk: u64,
        dst: &mut [u8],
        dst_is_zeroed: bool,
    ) -> Result<(), FixedRamError> {
        let g = self.layout.global_chunk(region, chunk)?;
        let (start, len) = self.layout.chunk_range(region, chunk);
        if dst.len() as u64 != len {
            return Err(FixedRamError::BadArgument(format!(
                "chunk {chunk} of region {region} is {len} bytes, the buffer is {} bytes",
                dst.len()
            )));
        }
        let r = self.layout.regions()[region];
        let ps = self.layout.page_size() as usize;
        let pages = dst.len() / ps;
        let first_page = start / ps as u64;
        let present = |p: u64| self.is_present(region, first_page + p);
        for (run, run_present) in page_runs::spans(pages as u64, present) {
            let (from, to) = (run.start as usize * ps, run.end as usize * ps);
            let buf = &mut dst[from..to];
            if run_present {
                let offset = r.pages_offset + start + from as u64;
                read_exact_at(fd, buf, offset, &|| {
                    format!("pages of chunk {chunk} of region {region}")
                })?;
            } else if !dst_is_zeroed {
                buf.fill(0);
            }
        }
        self.check_chunk(region, chunk, g, dst)
    }

    fn check_chunk(
        &self,
        region: usize,
        chunk: u64,
        g: usize,
        data: &[u8],
    ) -> Result<(), FixedRamError> {
        let found = crc32c::crc32c(data);
        let expected = self.checksums[g];
        if found == expected {
            return Ok(());
        }
        let (start, len) = self.layout.chunk_range(region, chunk);
        let guest_start = self.layout.regions()[region].guest_addr + start;
        Err(FixedRamError::ChunkChecksum {
            region,
            chunk,
            expected,
            found,
            guest_start,
            guest_end: guest_start + len,
        })
    }

    /// Reads the device-state blob and checks its CRC32C
    /// ([`FixedRamError::DeviceStateChecksum`]).
    pub fn device_state(&self) -> Result<Vec<u8>, FixedRamError> {
        let h = &self.header;
        // Bounded by the file length (validated).
        let mut buf = vec![0u8; h.device_state_len as usize];
        read_exact_at(&self.file, &mut buf, h.device_state_offset, &|| {
            "the device state".to_string()
        })?;
        let found = crc32c::crc32c(&buf);
        if found != h.device_state_crc {
            return Err(FixedRamError::DeviceStateChecksum {
                offset: h.device_state_offset,
                len: h.device_state_len,
                expected: h.device_state_crc,
                found,
            });
        }
        Ok(buf)
    }

    /// Checks every chunk's CRC32C, reading each page area as it is in the
    /// file (holes read as zeros, so data under a clear bitmap bit is caught
    /// too), then the device state. Returns the first bad chunk as
    /// [`FixedRamError::ChunkChecksum`].
    pub fn verify(&self) -> Result<VerifyReport, FixedRamError> {
        let max_chunk = self
            .layout
            .regions()
            .iter()
            .map(|r| r.size.min(self.layout.chunk_size()))
            .max()
            .unwrap_or(0);
        // Bounded by a region size, which is bounded by the file length.
        let mut buf = vec![0u8; max_chunk as usize];
        let mut report = VerifyReport::default();
        for (region, r) in self.layout.regions().iter().enumerate() {
            for chunk in 0..self.layout.chunks(region) {
                let g = self.layout.global_chunk(region, chunk)?;
                let (start, len) = self.layout.chunk_range(region, chunk);
                let data = &mut buf[..len as usize];
                read_exact_at(&self.file, data, r.pages_offset + start, &|| {
                    format!("chunk {chunk} of region {region}")
                })?;
                self.check_chunk(region, chunk, g, data)?;
                report.chunks += 1;
                report.bytes_checked += len;
            }
            report.present_pages += self.present_pages(region);
        }
        report.bytes_checked += self.device_state()?.len() as u64;
        Ok(report)
    }

    /// Maps the page area of `region` from the file: `private` gives a
    /// copy-on-write `MAP_PRIVATE` mapping with `PROT_READ|PROT_WRITE`
    /// (usable as guest memory; writes never reach the file), otherwise a
    /// shared read-only mapping. Holes read as zeros. The mapping stays valid
    /// after the `Image` is dropped; the file must not be truncated while it
    /// is mapped.
    pub fn map_page_area(
        &self,
        region: usize,
        private: bool,
    ) -> Result<PageAreaMapping, FixedRamError> {
        let r = self.layout.regions().get(region).ok_or_else(|| {
            FixedRamError::BadArgument(format!(
                "region {region} does not exist (the image has {})",
                self.layout.regions().len()
            ))
        })?;
        let (Ok(len), Ok(offset)) = (
            usize::try_from(r.size),
            libc::off_t::try_from(r.pages_offset),
        ) else {
            return Err(FixedRamError::BadArgument(format!(
                "region {region} is too large to map"
            )));
        };
        let (prot, flags) = if private {
            (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        } else {
            (libc::PROT_READ, libc::MAP_SHARED)
        };
        // SAFETY: a new mapping at an address the kernel chooses (no
        // MAP_FIXED), so no existing memory is affected; the fd is valid for
        // the call, and the kernel keeps its own reference to the file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FixedRamError::io(
                format!("mapping the page area of region {region} ({len:#x} bytes at offset {offset:#x})"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(PageAreaMapping {
            addr: ptr as usize,
            len,
        })
    }

    /// The file's length (its apparent size).
    pub fn apparent_size(&self) -> u64 {
        self.file_len
    }

    /// The bytes the file occupies on disk (`st_blocks * 512`; 0 if it
    /// cannot be read). Holes take no space.
    pub fn allocated_size(&self) -> u64 {
        page_runs::allocated_bytes(&self.file)
    }
}

/// A region's page area mapped from the image (see
/// [`Image::map_page_area`]); unmapped on drop. `Send + Sync`: it is plain
/// memory, and what is done through the pointer is the user's business.
#[derive(Debug)]
pub struct PageAreaMapping {
    addr: usize,
    len: usize,
}

impl PageAreaMapping {
    /// The first byte of the mapping (page i of the region is at
    /// `as_ptr() + i * page_size`).
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The mapping's length in bytes (the region size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: regions are nonzero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives up ownership without unmapping: returns (address, length); the
    /// caller must `munmap` it (or keep it for the life of the process, e.g.
    /// as guest memory).
    pub fn into_raw(self) -> (*mut u8, usize) {
        let raw = (self.as_ptr(), self.len);
        std::mem::forget(self);
        raw
    }
}

impl Drop for PageAreaMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly a mapping made by `mmap` in
        // `Image::map_page_area` and owned by this value, unmapped only here.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}
