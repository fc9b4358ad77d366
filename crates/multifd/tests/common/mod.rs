//! Helpers shared by the integration tests: anonymous memory, page filling,
//! and a simple in-memory FileLayout.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use multifd::{CallerError, FileLayout, MemRegion};

pub mod wire;

pub const PAGE: u64 = 4096;
pub const CHUNK: u64 = 1 << 20;

/// An anonymous private mapping, unmapped on drop.
pub struct Anon {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain memory owned by this value.
unsafe impl Send for Anon {}
// SAFETY: as above.
unsafe impl Sync for Anon {}

impl Anon {
    pub fn new(len: usize) -> Anon {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {len} bytes");
        Anon {
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is len bytes, readable.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is len bytes, writable, and borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn region(&self, guest_addr: u64) -> MemRegion {
        // SAFETY: the mapping is page aligned and lives as long as the test uses it.
        unsafe { MemRegion::new(guest_addr, self.ptr, self.len as u64) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: ptr/len are our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// xorshift64*
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Fills `mem` with a mix of random pages, zero pages, runs of both, and
/// pages that are zero except for their last byte. Returns the number of
/// non-zero pages.
pub fn fill(mem: &mut [u8], seed: u64) -> u64 {
    let mut rng = Rng(seed | 1);
    let pages = mem.len() / PAGE as usize;
    let mut present = 0;
    let mut p = 0;
    while p < pages {
        let kind = rng.next() % 8;
        let run = 1 + (rng.next() % 40) as usize;
        for q in p..(p + run).min(pages) {
            let page = &mut mem[q * PAGE as usize..(q + 1) * PAGE as usize];
            match kind {
                0..=2 => page.fill(0),
                3 => {
                    page.fill(0);
                    page[PAGE as usize - 1] = 0x5a;
                    present += 1;
                }
                4 => {
                    page.fill(0);
                    page[q % 4096] = 1;
                    present += 1;
                }
                _ => {
                    for w in page.chunks_exact_mut(8) {
                        w.copy_from_slice(&rng.next().to_le_bytes());
                    }
                    present += 1;
                }
            }
        }
        p += run;
    }
    present as u64
}

/// Regions back to back at 1 MiB aligned offsets after a 1 MiB "header".
pub struct TestLayout {
    pub sizes: Vec<u64>,
    pub bases: Vec<u64>,
    pub file_len: u64,
    /// Per region, a bitmap of present pages.
    pub present: Mutex<Vec<Vec<u64>>>,
    /// Per region, per chunk, the CRC (None: not saved).
    pub crcs: Mutex<Vec<Vec<Option<u32>>>>,
    pub saved_calls: Mutex<u64>,
}

impl TestLayout {
    pub fn new(sizes: &[u64]) -> TestLayout {
        let mut bases = Vec::new();
        let mut off = CHUNK;
        for &s in sizes {
            bases.push(off);
            off += s.div_ceil(CHUNK) * CHUNK;
        }
        TestLayout {
            sizes: sizes.to_vec(),
            bases,
            file_len: off,
            present: Mutex::new(
                sizes
                    .iter()
                    .map(|s| vec![0; (s / PAGE).div_ceil(64) as usize])
                    .collect(),
            ),
            crcs: Mutex::new(
                sizes
                    .iter()
                    .map(|s| vec![None; s.div_ceil(CHUNK) as usize])
                    .collect(),
            ),
            saved_calls: Mutex::new(0),
        }
    }

    pub fn is_present(&self, region: usize, page: u64) -> bool {
        self.present.lock().unwrap()[region][(page / 64) as usize] & (1 << (page % 64)) != 0
    }
}

impl FileLayout for TestLayout {
    fn page_size(&self) -> u64 {
        PAGE
    }
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn chunks(&self, region: usize) -> u64 {
        self.sizes[region].div_ceil(CHUNK)
    }
    fn chunk_range(&self, region: usize, chunk: u64) -> (u64, u64) {
        let off = chunk * CHUNK;
        (off, CHUNK.min(self.sizes[region] - off))
    }
    fn page_file_offset(&self, region: usize, page: u64) -> u64 {
        self.bases[region] + page * PAGE
    }
    fn chunk_saved(
        &self,
        region: usize,
        chunk: u64,
        present: &[u64],
        crc: u32,
    ) -> Result<(), CallerError> {
        let first_word = (chunk * CHUNK / PAGE / 64) as usize;
        let mut p = self.present.lock().unwrap();
        for (i, w) in present.iter().enumerate() {
            p[region][first_word + i] |= w;
        }
        let mut c = self.crcs.lock().unwrap();
        if c[region][chunk as usize].replace(crc).is_some() {
            return Err(format!("chunk {chunk} saved twice").into());
        }
        *self.saved_calls.lock().unwrap() += 1;
        Ok(())
    }
    fn page_present(&self, region: usize, page: u64) -> bool {
        self.is_present(region, page)
    }
    fn chunk_loaded(&self, region: usize, chunk: u64, data: &[u8]) -> Result<(), CallerError> {
        let expected = self.crcs.lock().unwrap()[region][chunk as usize]
            .ok_or_else(|| format!("chunk {chunk} has no checksum"))?;
        let found = crc32c::crc32c(data);
        if found != expected {
            return Err(format!("CRC32C {found:#010x}, expected {expected:#010x}").into());
        }
        Ok(())
    }
}

/// Whether O_DIRECT opens work in `dir`.
pub fn direct_io_works(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(".odirect-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// Regions of the given sizes filled with a pattern of `seed`.
pub fn filled_regions(sizes: &[u64], seed: u64) -> Vec<Anon> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let mut a = Anon::new(s as usize);
            fill(a.bytes_mut(), seed + i as u64);
            a
        })
        .collect()
}

/// An allocator for `receive` that keeps the memory it hands out.
pub fn allocator(
    keep: Arc<Mutex<Vec<Anon>>>,
) -> impl FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError> {
    move |layout: &[(u64, u64)]| {
        let mut k = keep.lock().unwrap();
        let mut out = Vec::new();
        for &(g, s) in layout {
            let a = Anon::new(s as usize);
            out.push(a.region(g));
            k.push(a);
        }
        Ok(out)
    }
}

/// What `receive` returned.
pub type RecvResult = Result<(Vec<u8>, multifd::TransferStats), multifd::MultifdError>;

/// Runs `send` against a receiving thread: `send` gets the channel through
/// which it hands the receiver the other end of each connection it makes.
/// Returns `send`'s result, the receiver's and the received memory.
pub fn with_receiver<S: std::io::Read + std::io::Write + Send, T>(
    send: impl FnOnce(&std::sync::mpsc::Sender<S>) -> T,
) -> (T, RecvResult, Vec<Anon>) {
    let (tx, rx) = std::sync::mpsc::channel::<S>();
    let keep = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        let k = keep.clone();
        let receiver = s.spawn(move || {
            let mut alloc = allocator(k);
            multifd::receive(
                &mut || {
                    rx.recv_timeout(std::time::Duration::from_secs(20))
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "no more connections")
                        })
                },
                &mut alloc,
            )
        });
        let sent = send(&tx);
        drop(tx);
        let received = receiver.join().unwrap();
        let mems = std::mem::take(&mut *keep.lock().unwrap());
        (sent, received, mems)
    })
}
