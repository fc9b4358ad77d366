//! Unit tests: layout arithmetic, round trips from several threads, sparse
//! files, rewrites, corruption found by `verify`, uncommitted files, hostile
//! headers, mappings, misuse.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::layout::{HEADER_FIXED_LEN, REGION_ENTRY_LEN};
use crate::*;

const PS: u32 = 4096;
const MIB: u64 = 1 << 20;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fixed-ram-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Two regions like a 4 GiB guest's ([0, 3 GiB) and [4 GiB, 5 GiB)), small:
/// 8 MiB at 0 and 4 MiB + 3 pages at 4 GiB (a short last chunk).
fn specs() -> Vec<RegionSpec> {
    vec![
        RegionSpec {
            guest_addr: 0,
            size: 8 * MIB,
        },
        RegionSpec {
            guest_addr: 4 << 30,
            size: 4 * MIB + 3 * u64::from(PS),
        },
    ]
}

/// Guest memory for `specs`: `percent` of the pages random, the rest zero.
fn guest_memory(specs: &[RegionSpec], percent: u64, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    specs
        .iter()
        .map(|s| {
            let mut mem = vec![0u8; s.size as usize];
            for page in mem.chunks_exact_mut(PS as usize) {
                if rng.below(100) < percent {
                    // Sometimes only the last byte is nonzero: the scan must see it.
                    if rng.below(4) == 0 {
                        page[PS as usize - 1] = 1 + rng.below(255) as u8;
                    } else {
                        for w in page.chunks_exact_mut(8) {
                            w.copy_from_slice(&rng.next().to_le_bytes());
                        }
                    }
                }
            }
            mem
        })
        .collect()
}

fn chunk_of<'a>(layout: &Layout, mem: &'a [Vec<u8>], region: usize, chunk: u64) -> &'a [u8] {
    let (off, len) = layout.chunk_range(region, chunk);
    &mem[region][off as usize..(off + len) as usize]
}

fn all_chunks(layout: &Layout) -> Vec<(usize, u64)> {
    (0..layout.regions().len())
        .flat_map(|r| (0..layout.chunks(r)).map(move |c| (r, c)))
        .collect()
}

/// Writes `mem` from 4 threads in shuffled chunk order and commits.
fn write_image(path: &Path, layout: Layout, mem: &[Vec<u8>], device_state: &[u8]) -> ChunkStats {
    let writer = ImageWriter::create(path, layout).unwrap();
    let mut chunks = all_chunks(writer.layout());
    Rng(7).shuffle(&mut chunks);
    let next = AtomicUsize::new(0);
    let totals = std::sync::Mutex::new(ChunkStats::default());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(r, c)) = chunks.get(i) else { return };
                let st = writer
                    .write_chunk(r, c, chunk_of(writer.layout(), mem, r, c))
                    .unwrap();
                let mut t = totals.lock().unwrap();
                t.present_pages += st.present_pages;
                t.zero_pages += st.zero_pages;
                t.bytes_written += st.bytes_written;
            });
        }
    });
    writer.commit(device_state).unwrap();
    totals.into_inner().unwrap()
}

fn read_all(image: &Image, zeroed: bool) -> Vec<Vec<u8>> {
    let layout = image.layout();
    (0..layout.regions().len())
        .map(|r| {
            let fill = if zeroed { 0 } else { 0xa5 };
            let mut mem = vec![fill; layout.regions()[r].size as usize];
            for c in 0..layout.chunks(r) {
                let (off, len) = layout.chunk_range(r, c);
                image
                    .read_chunk_into(r, c, &mut mem[off as usize..(off + len) as usize], zeroed)
                    .unwrap();
            }
            mem
        })
        .collect()
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

fn first_present_page(image: &Image, region: usize) -> u64 {
    (0..image.layout().pages(region))
        .find(|&p| image.is_present(region, p))
        .unwrap()
}

#[test]
fn send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ImageWriter>();
    check::<Image>();
    check::<PageAreaMapping>();
    check::<FixedRamError>();
}

#[test]
fn layout_arithmetic() {
    let l = Layout::new(PS, &specs()).unwrap();
    assert_eq!(
        (l.page_size(), l.alignment(), l.chunk_size()),
        (PS, MIB, MIB)
    );
    let r = l.regions();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].bitmap_offset, MIB);
    assert_eq!(r[0].bitmap_len, 2048 / 8);
    assert_eq!(r[0].pages_offset, 2 * MIB);
    assert_eq!(r[1].guest_addr, 4 << 30);
    assert_eq!(r[1].bitmap_offset, 10 * MIB);
    assert_eq!(r[1].bitmap_len, 8 * 17); // 1027 pages -> 17 words
    assert_eq!(r[1].pages_offset, 11 * MIB);
    assert_eq!(l.chunks(0), 8);
    assert_eq!(l.chunks(1), 5);
    assert_eq!(l.chunks(2), 0);
    assert_eq!(l.total_chunks(), 13);
    assert_eq!(l.chunk_range(0, 7), (7 * MIB, MIB));
    assert_eq!(l.chunk_range(1, 4), (4 * MIB, 3 * u64::from(PS)));
    assert_eq!(l.chunk_range(1, 5), (0, 0));
    assert_eq!(l.checksum_table_offset(), 16 * MIB);
    assert_eq!(l.checksum_table_len(), 13 * 4);
    assert_eq!(l.device_state_offset(), 17 * MIB);
    // Every area aligned, in order, not overlapping.
    let mut areas = vec![(0, MIB)];
    for r in r {
        areas.push((r.bitmap_offset, r.bitmap_len));
        areas.push((r.pages_offset, r.size));
    }
    areas.push((l.checksum_table_offset(), l.checksum_table_len()));
    for w in areas.windows(2) {
        assert_eq!(w[1].0 % MIB, 0);
        assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?}");
    }
    assert!(l.checksum_table_offset() + l.checksum_table_len() <= l.device_state_offset());

    // 2 MiB pages raise alignment and chunk size.
    let l = Layout::new(
        2 << 20,
        &[RegionSpec {
            guest_addr: 0,
            size: 8 * MIB,
        }],
    )
    .unwrap();
    assert_eq!((l.alignment(), l.chunk_size()), (2 * MIB, 2 * MIB));
    assert_eq!(l.regions()[0].pages_offset % (2 * MIB), 0);

    // A big guest: 3 GiB + 1 GiB above 4 GiB, default params.
    let l = Layout::new(
        PS,
        &[
            RegionSpec {
                guest_addr: 0,
                size: 3 << 30,
            },
            RegionSpec {
                guest_addr: 4 << 30,
                size: 1 << 30,
            },
        ],
    )
    .unwrap();
    assert_eq!(l.total_chunks(), 4096);
    assert_eq!(l.regions()[1].pages_offset, MIB + MIB + (3 << 30) + MIB);
}

#[test]
fn layout_refuses_bad_input() {
    let one = |guest_addr, size| RegionSpec { guest_addr, size };
    let err = |ps, r: &[RegionSpec]| Layout::new(ps, r).unwrap_err();
    assert!(matches!(err(PS, &[]), FixedRamError::RegionCount(0)));
    assert!(matches!(
        err(12288, &[one(0, MIB)]),
        FixedRamError::BadPageSize(12288)
    ));
    assert!(matches!(
        err(2048, &[one(0, MIB)]),
        FixedRamError::BadPageSize(2048)
    ));
    assert!(matches!(
        err(PS, &[one(0, 0)]),
        FixedRamError::BadRegion { region: 0, .. }
    ));
    assert!(matches!(
        err(PS, &[one(0, 100)]),
        FixedRamError::BadRegion { region: 0, .. }
    ));
    assert!(matches!(
        err(PS, &[one(1, MIB)]),
        FixedRamError::BadRegion { region: 0, .. }
    ));
    assert!(matches!(
        err(PS, &[one(MIB, MIB), one(0, MIB)]),
        FixedRamError::BadRegion { region: 1, .. }
    ));
    assert!(matches!(
        err(PS, &[one(0, 2 * MIB), one(MIB, MIB)]),
        FixedRamError::BadRegion { region: 1, .. }
    ));
    assert!(matches!(
        err(PS, &[one(u64::MAX - 4095, 8192)]),
        FixedRamError::BadRegion { region: 0, .. }
    ));
    let many: Vec<_> = (0..1025).map(|i| one(i * MIB, MIB)).collect();
    assert!(matches!(err(PS, &many), FixedRamError::RegionCount(1025)));
    // A layout that would not fit in 64 bits.
    let huge = [
        one(0, 1 << 62),
        one(1 << 62, 1 << 62),
        one(2 << 62, 1 << 62),
        one(3 << 62, (1 << 62) - 4096),
    ];
    assert!(Layout::new(PS, &huge).is_err());
    // Small alignment: the header of many regions must fit.
    let many: Vec<_> = (0..200).map(|i| one(i * MIB, MIB)).collect();
    assert!(matches!(
        Layout::with_params(PS, 4096, 4096, &many).unwrap_err(),
        FixedRamError::BadAlignment { .. }
    ));
    assert!(matches!(
        Layout::with_params(PS, 3 * 4096, 4096, &[one(0, MIB)]).unwrap_err(),
        FixedRamError::BadAlignment { .. }
    ));
    assert!(matches!(
        Layout::with_params(PS, 4096, 2048, &[one(0, MIB)]).unwrap_err(),
        FixedRamError::BadChunkSize { .. }
    ));
}

#[test]
fn round_trip_four_threads_sparse() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = specs();
    let mem = guest_memory(&specs, 10, 1);
    let layout = Layout::new(PS, &specs).unwrap();
    let device_state: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let stats = write_image(&path, layout.clone(), &mem, &device_state);
    let total_pages: u64 = specs.iter().map(|s| s.size / u64::from(PS)).sum();
    assert_eq!(stats.present_pages + stats.zero_pages, total_pages);
    assert_eq!(stats.bytes_written, stats.present_pages * u64::from(PS));

    let image = Image::open(&path).unwrap();
    assert_eq!(image.layout(), &layout);
    assert_eq!(image.header().format_version, FORMAT_VERSION);
    // The header alone, as a lazy restore reads it first: the same header.
    let header = Image::read_header(&File::open(&path).unwrap()).unwrap();
    assert_eq!(&header, image.header());
    assert_eq!(image.header().device_state_len, device_state.len() as u64);
    assert_eq!(read_all(&image, true), mem);
    assert_eq!(read_all(&image, false), mem);
    let mut present = 0;
    for (r, m) in mem.iter().enumerate() {
        let mut n = 0;
        for (p, page) in m.chunks_exact(PS as usize).enumerate() {
            let nonzero = page.iter().any(|&b| b != 0);
            assert_eq!(
                image.is_present(r, p as u64),
                nonzero,
                "region {r} page {p}"
            );
            n += u64::from(nonzero);
        }
        assert_eq!(image.present_pages(r), n);
        present += n;
        for c in 0..layout.chunks(r) {
            assert_eq!(
                image.chunk_checksum(r, c),
                crc32c::crc32c(chunk_of(&layout, &mem, r, c))
            );
        }
    }
    assert_eq!(present, stats.present_pages);
    assert!(!image.is_present(0, 1 << 40));
    assert!(!image.is_present(9, 0));
    assert_eq!(image.present_pages(9), 0);
    assert_eq!(image.device_state().unwrap(), device_state);
    let report = image.verify().unwrap();
    assert_eq!(report.chunks, 13);
    assert_eq!(report.present_pages, present);
    assert_eq!(
        report.bytes_checked,
        specs.iter().map(|s| s.size).sum::<u64>() + device_state.len() as u64
    );

    // Sparse: the file is as long as the layout says, but occupies about
    // the non-zero data (10% of the pages) plus metadata.
    let apparent = image.apparent_size();
    assert_eq!(
        apparent,
        layout.device_state_offset() + device_state.len() as u64
    );
    assert_eq!(apparent, std::fs::metadata(&path).unwrap().len());
    let allocated = image.allocated_size();
    assert!(allocated > 0);
    assert!(
        allocated < apparent / 2,
        "allocated {allocated} of {apparent}"
    );
}

#[test]
fn huge_pages_and_small_params_round_trip() {
    let dir = TempDir::new();
    // 2 MiB pages.
    let specs2 = [RegionSpec {
        guest_addr: 0,
        size: 6 * MIB,
    }];
    let mut mem = vec![vec![0u8; 6 * MIB as usize]];
    mem[0][2 * MIB as usize + 5] = 9;
    let layout = Layout::new(2 << 20, &specs2).unwrap();
    write_image(&dir.path("huge.img"), layout, &mem, b"");
    let image = Image::open(&dir.path("huge.img")).unwrap();
    assert_eq!(image.present_pages(0), 1);
    assert!(image.is_present(0, 1));
    assert_eq!(read_all(&image, false), mem);
    assert_eq!(image.device_state().unwrap(), b"");
    image.verify().unwrap();

    // 4 KiB alignment and chunks: chunks share bitmap words across threads.
    let specs = specs();
    let mem = guest_memory(&specs, 50, 3);
    let layout = Layout::with_params(PS, 4096, 8192, &specs).unwrap();
    write_image(&dir.path("small.img"), layout.clone(), &mem, b"state");
    let image = Image::open(&dir.path("small.img")).unwrap();
    assert_eq!(image.layout(), &layout);
    assert_eq!(read_all(&image, true), mem);
    image.verify().unwrap();
}

#[test]
fn timed_commit_writes_the_same_image_and_reports_its_steps() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = [RegionSpec {
        guest_addr: 0,
        size: 2 * MIB,
    }];
    let mem = guest_memory(&specs, 100, 5);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    for c in 0..layout.chunks(0) {
        writer
            .write_chunk(0, c, chunk_of(&layout, &mem, 0, c))
            .unwrap();
    }
    let (file, times) = writer.commit_timed(b"state").unwrap();
    drop(file);
    // Every step did its work: a sync never takes zero time.
    assert!(times.data_sync > std::time::Duration::ZERO);
    assert!(times.header_sync > std::time::Duration::ZERO);
    let image = Image::open(&path).unwrap();
    image.verify().unwrap();
    assert_eq!(image.device_state().unwrap(), b"state");
    assert_eq!(read_all(&image, true), mem);
}

#[test]
fn rewritten_chunk_last_wins() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = [RegionSpec {
        guest_addr: 0,
        size: 2 * MIB,
    }];
    let mut mem = guest_memory(&specs, 100, 5);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    for c in 0..2 {
        let st = writer
            .write_chunk(0, c, chunk_of(&layout, &mem, 0, c))
            .unwrap();
        assert_eq!(st.present_pages, 256);
    }
    // Pages 3, 4 and 300 become zero, page 5 changes.
    let ps = PS as usize;
    for p in [3, 4, 300] {
        mem[0][p * ps..(p + 1) * ps].fill(0);
    }
    mem[0][5 * ps] ^= 1;
    assert_eq!(writer.present_pages(), 512);
    for c in 0..2 {
        writer
            .write_chunk(0, c, chunk_of(&layout, &mem, 0, c))
            .unwrap();
    }
    assert_eq!(
        writer.present_pages(),
        509,
        "the bits of the zeroed pages cleared"
    );
    writer.commit(b"").unwrap();
    let image = Image::open(&path).unwrap();
    for p in [3, 4, 300] {
        assert!(!image.is_present(0, p));
        // Punched: the file's bytes there are zero.
        let mut buf = vec![1u8; ps];
        image
            .file()
            .read_exact_at(
                &mut buf,
                layout.regions()[0].pages_offset + p * u64::from(PS),
            )
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    assert_eq!(image.present_pages(0), 512 - 3);
    assert_eq!(read_all(&image, false), mem);
    image.verify().unwrap();
}

#[test]
fn record_chunk_and_write_via_other_fd() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = specs();
    let mem = guest_memory(&specs, 30, 11);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    let ps = PS as usize;
    // Region 0 through a second descriptor (O_DIRECT where the file system
    // has it, with a page-aligned copy of the data).
    let direct = OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .or_else(|_| OpenOptions::new().write(true).read(true).open(&path))
        .unwrap();
    let mut backing = vec![0u8; MIB as usize + ps];
    let shift = backing.as_ptr().align_offset(ps);
    for c in 0..layout.chunks(0) {
        let src = chunk_of(&layout, &mem, 0, c);
        let buf = &mut backing[shift..shift + src.len()];
        buf.copy_from_slice(src);
        writer.write_chunk_via(&direct, 0, c, buf).unwrap();
    }
    // Region 1: the caller writes the pages itself and records the chunks.
    for c in 0..layout.chunks(1) {
        let (off, _) = layout.chunk_range(1, c);
        let data = chunk_of(&layout, &mem, 1, c);
        let present: Vec<bool> = data
            .chunks_exact(ps)
            .map(|p| p.iter().any(|&b| b != 0))
            .collect();
        for (i, page) in data.chunks_exact(ps).enumerate() {
            if present[i] {
                writer
                    .file()
                    .write_all_at(
                        page,
                        layout.regions()[1].pages_offset + off + (i * ps) as u64,
                    )
                    .unwrap();
            }
        }
        writer
            .record_chunk(1, c, &|p| present[p as usize], crc32c::crc32c(data))
            .unwrap();
    }
    assert!(writer.is_chunk_written(1, 4));
    writer.commit(b"x").unwrap();

    let image = Image::open(&path).unwrap();
    image.verify().unwrap();
    assert_eq!(read_all(&image, true), mem);
    // Read region 0 back through the direct descriptor too.
    for c in 0..layout.chunks(0) {
        let src = chunk_of(&layout, &mem, 0, c);
        let buf = &mut backing[shift..shift + src.len()];
        buf.fill(0x11);
        image.read_chunk_via(&direct, 0, c, buf, false).unwrap();
        assert_eq!(buf, src);
    }
}

/// Chunks recorded as zeros (the whole-chunk CRC cached, the short last
/// chunk's computed) verify and read back as zeros; recording a written
/// chunk as zeros punches its pages back to holes.
#[test]
fn zero_chunks_recorded_without_data() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = specs();
    let mut mem = guest_memory(&specs, 30, 5);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    for r in 0..2 {
        for c in 0..layout.chunks(r) {
            writer
                .write_chunk(r, c, chunk_of(&layout, &mem, r, c))
                .unwrap();
        }
    }
    let zeroed = [(0, 1), (0, 6), (1, 0), (1, layout.chunks(1) - 1)];
    for &(r, c) in &zeroed {
        writer.record_zero_chunk(r, c).unwrap();
        let (off, len) = layout.chunk_range(r, c);
        mem[r][off as usize..(off + len) as usize].fill(0);
    }
    writer.commit(b"z").unwrap();
    let image = Image::open(&path).unwrap();
    image.verify().unwrap();
    assert_eq!(read_all(&image, true), mem);
    for &(r, c) in &zeroed {
        let pages = layout.chunk_range(r, c).1 / u64::from(PS);
        let first = layout.chunk_range(r, c).0 / u64::from(PS);
        assert!((first..first + pages).all(|p| !image.is_present(r, p)));
    }
}

#[test]
fn verify_finds_corruption() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = specs();
    let mem = guest_memory(&specs, 10, 2);
    let layout = Layout::new(PS, &specs).unwrap();
    write_image(&path, layout.clone(), &mem, b"the device state");

    // A flipped byte in a present page of region 1.
    let image = Image::open(&path).unwrap();
    let page = first_present_page(&image, 1);
    drop(image);
    let r1 = layout.regions()[1];
    flip_byte(&path, r1.pages_offset + page * u64::from(PS) + 17);
    let image = Image::open(&path).unwrap();
    let chunk = page * u64::from(PS) / MIB;
    let err = image.verify().unwrap_err();
    match &err {
        FixedRamError::ChunkChecksum {
            region,
            chunk: c,
            guest_start,
            guest_end,
            ..
        } => {
            assert_eq!((*region, *c), (1, chunk));
            assert_eq!(*guest_start, (4 << 30) + chunk * MIB);
            assert!(*guest_end > *guest_start);
        }
        other => panic!("wrong error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!("chunk {chunk} of region 1")), "{msg}");
    assert!(
        msg.contains(&format!("{:#x}", (4u64 << 30) + chunk * MIB)),
        "{msg}"
    );
    let (off, len) = layout.chunk_range(1, chunk);
    let mut buf = vec![0u8; len as usize];
    assert!(matches!(
        image.read_chunk_into(1, chunk, &mut buf, true),
        Err(FixedRamError::ChunkChecksum { region: 1, .. })
    ));
    let _ = off;
    flip_byte(&path, r1.pages_offset + page * u64::from(PS) + 17);
    Image::open(&path).unwrap().verify().unwrap();

    // A nonzero byte where the bitmap says the page is absent (a hole).
    let image = Image::open(&path).unwrap();
    let hole = (0..layout.pages(0))
        .find(|&p| !image.is_present(0, p))
        .unwrap();
    drop(image);
    flip_byte(
        &path,
        layout.regions()[0].pages_offset + hole * u64::from(PS) + 100,
    );
    let image = Image::open(&path).unwrap();
    match image.verify().unwrap_err() {
        FixedRamError::ChunkChecksum {
            region: 0, chunk, ..
        } => {
            assert_eq!(chunk, hole * u64::from(PS) / MIB)
        }
        other => panic!("wrong error {other:?}"),
    }
    // Reading by bitmap still gives the right (zero) page.
    assert_eq!(read_all(&image, false), mem);
    flip_byte(
        &path,
        layout.regions()[0].pages_offset + hole * u64::from(PS) + 100,
    );

    // A flipped byte in the device state.
    flip_byte(&path, layout.device_state_offset() + 3);
    let image = Image::open(&path).unwrap();
    let err = image.verify().unwrap_err();
    assert!(
        matches!(err, FixedRamError::DeviceStateChecksum { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("device state"));
    assert!(matches!(
        image.device_state(),
        Err(FixedRamError::DeviceStateChecksum { .. })
    ));

    // A flipped byte in the header.
    flip_byte(&path, 40);
    assert!(matches!(
        Image::open(&path),
        Err(FixedRamError::HeaderChecksum { .. })
    ));
}

/// Rewrites the header of the image at `path` in the version-1 layout (no
/// metadata CRC), as cryo 0.1.0 wrote it.
fn rewrite_as_v1(path: &Path) {
    let h = Image::open(path).unwrap().header().clone();
    let v1 = Header {
        format_version: 1,
        metadata_crc: None,
        ..h.clone()
    };
    let f = OpenOptions::new().write(true).open(path).unwrap();
    // Zero the whole version-2 header first: the version-1 one is 4 bytes shorter.
    f.write_all_at(&vec![0u8; h.encoded_len()], 0).unwrap();
    f.write_all_at(&v1.to_bytes(), 0).unwrap();
}

#[test]
fn version_1_images_are_read() {
    let dir = TempDir::new();
    let path = dir.path("v1.img");
    let specs = specs();
    let mem = guest_memory(&specs, 20, 5);
    write_image(&path, Layout::new(PS, &specs).unwrap(), &mem, b"state");
    assert_eq!(Image::open(&path).unwrap().header().format_version, 2);
    rewrite_as_v1(&path);
    let image = Image::open(&path).unwrap();
    assert_eq!(image.header().format_version, 1);
    assert_eq!(image.header().metadata_crc, None);
    image.verify().unwrap();
    assert_eq!(read_all(&image, true), mem);
    assert_eq!(image.device_state().unwrap(), b"state");
}

/// Opens, verifies and reads the device state: what every restore and
/// `cryo verify` do before trusting an image.
fn open_and_check(path: &Path) -> Result<(), FixedRamError> {
    let image = Image::open(path)?;
    image.verify()?;
    image.device_state().map(|_| ())
}

/// Every byte of metadata (header, bitmaps, checksum table, device state) is
/// covered by a checksum: any single-byte change is refused.
#[test]
fn every_metadata_byte_is_checked() {
    let dir = TempDir::new();
    let path = dir.path("meta.img");
    let specs = specs();
    let mem = guest_memory(&specs, 30, 11);
    let layout = Layout::new(PS, &specs).unwrap();
    write_image(&path, layout.clone(), &mem, b"some device state");
    open_and_check(&path).unwrap();
    let h = Image::open(&path).unwrap().header().clone();
    let mut areas: Vec<(u64, u64)> = vec![(0, h.encoded_len() as u64)];
    areas.extend(h.regions.iter().map(|r| (r.bitmap_offset, r.bitmap_len)));
    areas.push((h.checksum_table_offset, h.checksum_table_len));
    areas.push((h.device_state_offset, h.device_state_len));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut checked = 0;
    for (start, len) in areas {
        for offset in start..start + len {
            let mut orig = [0u8; 1];
            f.read_exact_at(&mut orig, offset).unwrap();
            for mask in [0x01u8, 0x80, 0xff] {
                f.write_all_at(&[orig[0] ^ mask], offset).unwrap();
                assert!(
                    open_and_check(&path).is_err(),
                    "byte {offset:#x} ^ {mask:#x} was not noticed"
                );
                checked += 1;
            }
            f.write_all_at(&orig, offset).unwrap();
        }
    }
    assert!(checked > 3 * 500, "{checked}");
    open_and_check(&path).unwrap();
    // The error for a bitmap byte names the metadata.
    let b = h.regions[0].bitmap_offset + 5;
    flip_byte(&path, b);
    let err = Image::open(&path).unwrap_err();
    assert!(
        matches!(err, FixedRamError::MetadataChecksum { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("bitmaps"), "{err}");
}

#[test]
fn uncommitted_and_empty_files() {
    let dir = TempDir::new();
    let path = dir.path("crashed.img");
    let specs = specs();
    let mem = guest_memory(&specs, 10, 4);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    for (r, c) in all_chunks(&layout) {
        writer
            .write_chunk(r, c, chunk_of(&layout, &mem, r, c))
            .unwrap();
    }
    drop(writer); // "crash" before commit
    let err = Image::open(&path).unwrap_err();
    assert!(matches!(err, FixedRamError::NotCommitted), "{err}");
    assert!(err.to_string().contains("never written"));
    assert!(matches!(
        Image::read_header(&File::open(&path).unwrap()),
        Err(FixedRamError::NotCommitted)
    ));

    let empty = dir.path("empty.img");
    File::create(&empty).unwrap();
    assert!(matches!(
        Image::open(&empty),
        Err(FixedRamError::NotCommitted)
    ));

    let junk = dir.path("junk.img");
    std::fs::write(&junk, b"hello, world, this is not an image").unwrap();
    assert!(matches!(Image::open(&junk), Err(FixedRamError::BadMagic)));
    std::fs::write(&junk, b"CRYOFRAM\x01\0\0\0").unwrap();
    assert!(matches!(
        Image::open(&junk),
        Err(FixedRamError::OutOfFile { .. })
    ));
}

#[test]
fn commit_refuses_missing_chunk() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let layout = Layout::new(PS, &specs()).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    let zeros = vec![0u8; MIB as usize];
    for (r, c) in all_chunks(&layout) {
        if (r, c) != (1, 2) && (r, c) != (1, 3) {
            let (_, len) = layout.chunk_range(r, c);
            writer.write_chunk(r, c, &zeros[..len as usize]).unwrap();
        }
    }
    assert!(!writer.is_chunk_written(1, 2));
    let err = writer.commit(b"").unwrap_err();
    assert!(
        matches!(
            err,
            FixedRamError::MissingChunk {
                region: 1,
                chunk: 2
            }
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "chunk 2 of region 1 was never written");
}

#[test]
fn misuse_is_an_error() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let layout = Layout::new(PS, &specs()).unwrap();
    let writer = ImageWriter::create(&path, layout.clone()).unwrap();
    let err = ImageWriter::create(&path, layout.clone()).unwrap_err();
    assert!(
        matches!(&err, FixedRamError::Exists(p) if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("already exists"));
    let data = vec![0u8; MIB as usize];
    assert!(matches!(
        writer.write_chunk(0, 8, &data),
        Err(FixedRamError::BadArgument(_))
    ));
    assert!(matches!(
        writer.write_chunk(2, 0, &data),
        Err(FixedRamError::BadArgument(_))
    ));
    assert!(matches!(
        writer.write_chunk(0, 0, &data[..4096]),
        Err(FixedRamError::BadArgument(_))
    ));
    assert!(matches!(
        writer.write_chunk(1, 4, &data),
        Err(FixedRamError::BadArgument(_))
    ));
    assert!(matches!(
        writer.record_chunk(1, 5, &|_| true, 0),
        Err(FixedRamError::BadArgument(_))
    ));
    // from_file needs an empty file.
    let other = dir.path("other.img");
    std::fs::write(&other, b"x").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&other)
        .unwrap();
    assert!(matches!(
        ImageWriter::from_file(f, layout),
        Err(FixedRamError::BadArgument(_))
    ));
}

#[test]
fn map_page_area_private_and_shared() {
    let dir = TempDir::new();
    let path = dir.path("vm.img");
    let specs = specs();
    let mem = guest_memory(&specs, 20, 9);
    let layout = Layout::new(PS, &specs).unwrap();
    write_image(&path, layout, &mem, b"");
    let image = Image::open(&path).unwrap();
    for (r, m) in mem.iter().enumerate() {
        for private in [false, true] {
            let map = image.map_page_area(r, private).unwrap();
            assert_eq!(map.len(), m.len());
            assert!(!map.is_empty());
            // SAFETY: the mapping is live for `map`'s lifetime and `len` long.
            let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) };
            assert!(bytes == m.as_slice(), "region {r} private {private}");
            if private {
                // SAFETY: a private writable mapping, `len` > 0.
                unsafe { *map.as_ptr() ^= 0xff };
            }
        }
    }
    // Private writes never reach the file.
    image.verify().unwrap();
    assert!(matches!(
        image.map_page_area(2, true),
        Err(FixedRamError::BadArgument(_))
    ));
}

/// A valid header for a small file, and its file length.
/// Its metadata CRC is that of all-zero bitmaps and checksum table.
fn valid_header() -> (Header, u64) {
    let layout = Layout::with_params(PS, 4096, 8192, &specs()).unwrap();
    let zeros =
        layout.regions().iter().map(|r| r.bitmap_len).sum::<u64>() + layout.checksum_table_len();
    let metadata_crc = crc32c::crc32c(&vec![0u8; zeros as usize]);
    let h = Header::from_layout(&layout, 100, 0, metadata_crc);
    let len = h.file_len();
    (h, len)
}

fn parse(h: &Header, file_len: u64) -> Result<Header, FixedRamError> {
    Image::parse_header(&h.to_bytes(), file_len)
}

/// Encodes `h` with a raw u32 patched at `at`, CRC fixed.
fn patched(h: &Header, at: usize, value: u32) -> Vec<u8> {
    let mut b = h.to_bytes();
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    fix_crc(&mut b);
    b
}

fn fix_crc(b: &mut [u8]) {
    let n = b.len();
    let crc = crc32c::crc32c(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn hostile_headers() {
    let (h, len) = valid_header();
    assert_eq!(parse(&h, len).unwrap(), h);
    assert_eq!(h.to_bytes().len(), h.encoded_len());
    assert_eq!(h.encoded_len(), HEADER_FIXED_LEN + 2 * REGION_ENTRY_LEN + 8);
    // The version-1 layout (no metadata CRC) is still read.
    let v1 = Header {
        format_version: 1,
        metadata_crc: None,
        ..h.clone()
    };
    assert_eq!(
        v1.encoded_len(),
        HEADER_FIXED_LEN + 2 * REGION_ENTRY_LEN + 4
    );
    assert_eq!(parse(&v1, len).unwrap(), v1);

    let expect = |h2: &Header, file_len: u64, check: &dyn Fn(&FixedRamError) -> bool| {
        let err = parse(h2, file_len).unwrap_err();
        assert!(check(&err), "unexpected error: {err}");
        assert!(!err.to_string().is_empty());
        err
    };
    // Wrong file lengths.
    expect(&h, len + 1, &|e| {
        matches!(e, FixedRamError::FileLength { .. })
    });
    expect(&h, len - 1, &|e| {
        matches!(e, FixedRamError::OutOfFile { .. })
    });
    expect(&h, 5000, &|e| matches!(e, FixedRamError::OutOfFile { .. }));
    // Offsets past EOF and huge lengths (no overflow).
    let mut h2 = h.clone();
    h2.device_state_len = u64::MAX;
    expect(
        &h2,
        len,
        &|e| matches!(e, FixedRamError::OutOfFile { what, .. } if what.contains("device state")),
    );
    let mut h2 = h.clone();
    h2.regions[1].pages_offset = u64::MAX - 4095;
    let e = expect(&h2, len, &|e| matches!(e, FixedRamError::OutOfFile { .. }));
    assert!(e.to_string().contains("page area of region 1"), "{e}");
    let mut h2 = h.clone();
    h2.checksum_table_offset = 1 << 40;
    expect(&h2, len, &|e| matches!(e, FixedRamError::OutOfFile { .. }));
    let mut h2 = h.clone();
    h2.regions[0].size = 1 << 50;
    h2.regions[0].bitmap_len = (1 << 50) / 4096 / 8;
    expect(&h2, len, &|e| {
        matches!(
            e,
            FixedRamError::BadRegion { .. } | FixedRamError::OutOfFile { .. }
        )
    });
    // Misaligned offsets.
    let mut h2 = h.clone();
    h2.regions[0].bitmap_offset += 8;
    expect(&h2, len, &|e| matches!(e, FixedRamError::Misaligned { .. }));
    // Overlapping areas.
    let mut h2 = h.clone();
    h2.regions[1].bitmap_offset = h.regions[0].pages_offset;
    let e = expect(&h2, len, &|e| matches!(e, FixedRamError::Overlap { .. }));
    assert!(e.to_string().contains("bitmap of region 1"), "{e}");
    let mut h2 = h.clone();
    h2.regions[0].bitmap_offset = 0;
    expect(
        &h2,
        len,
        &|e| matches!(e, FixedRamError::Overlap { a, .. } if a.contains("header")),
    );
    let mut h2 = h.clone();
    h2.device_state_offset = h.checksum_table_offset;
    h2.device_state_len = len - h.checksum_table_offset;
    expect(&h2, len, &|e| matches!(e, FixedRamError::Overlap { .. }));
    // Regions overlapping in guest space, unsorted, not page multiples.
    let mut h2 = h.clone();
    h2.regions[1].guest_addr = 4096;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadRegion { region: 1, .. })
    });
    let mut h2 = h.clone();
    h2.regions[0].size = 1000;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadRegion { region: 0, .. })
    });
    let mut h2 = h.clone();
    h2.regions[0].size = 0;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadRegion { region: 0, .. })
    });
    // Bitmap larger (or smaller) than its region.
    let mut h2 = h.clone();
    h2.regions[0].bitmap_len += 8;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadBitmap { region: 0, .. })
    });
    let mut h2 = h.clone();
    h2.regions[1].bitmap_len = 1 << 60;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadBitmap { region: 1, .. })
    });
    // Checksum table length.
    let mut h2 = h.clone();
    h2.checksum_table_len += 4;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadChecksumTable { .. })
    });
    // Page size, alignment, chunk size.
    let mut h2 = h.clone();
    h2.page_size = 12288;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadPageSize(12288))
    });
    let mut h2 = h.clone();
    h2.page_size = 0;
    expect(&h2, len, &|e| matches!(e, FixedRamError::BadPageSize(0)));
    let mut h2 = h.clone();
    h2.alignment = 4095;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadAlignment { .. })
    });
    let mut h2 = h.clone();
    h2.alignment = 1 << 31;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadAlignment { .. })
    });
    let mut h2 = h.clone();
    h2.chunk_size = 0;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadChunkSize { .. })
    });
    let mut h2 = h.clone();
    h2.chunk_size = 6000;
    expect(&h2, len, &|e| {
        matches!(e, FixedRamError::BadChunkSize { .. })
    });
    // Version.
    let mut h2 = h.clone();
    h2.format_version = 3;
    expect(&h2, len, &|e| {
        matches!(
            e,
            FixedRamError::UnsupportedVersion {
                found: 3,
                supported: 2
            }
        )
    });
    // Raw fields: flags, region count.
    let e = Image::parse_header(&patched(&h, 12, 1), len).unwrap_err();
    assert!(matches!(e, FixedRamError::UnknownFlags(1)), "{e}");
    let e = Image::parse_header(&patched(&h, 28, 1_000_000), len).unwrap_err();
    assert!(matches!(e, FixedRamError::RegionCount(1_000_000)), "{e}");
    let e = Image::parse_header(&patched(&h, 28, 0), len).unwrap_err();
    assert!(matches!(e, FixedRamError::RegionCount(0)), "{e}");
    // Region count larger than the bytes given.
    let e = Image::parse_header(&patched(&h, 28, 3), len).unwrap_err();
    assert!(
        matches!(
            e,
            FixedRamError::OutOfFile { .. } | FixedRamError::HeaderChecksum { .. }
        ),
        "{e}"
    );
    // CRC and magic.
    let mut b = h.to_bytes();
    b[70] ^= 1;
    assert!(matches!(
        Image::parse_header(&b, len),
        Err(FixedRamError::HeaderChecksum { .. })
    ));
    let mut b = h.to_bytes();
    b[0] = b'X';
    assert!(matches!(
        Image::parse_header(&b, len),
        Err(FixedRamError::BadMagic)
    ));
    b[..8].fill(0);
    assert!(matches!(
        Image::parse_header(&b, len),
        Err(FixedRamError::NotCommitted)
    ));
    assert!(matches!(
        Image::parse_header(&[0; 4096], 1 << 30),
        Err(FixedRamError::NotCommitted)
    ));
    assert!(matches!(
        Image::parse_header(&[], 0),
        Err(FixedRamError::NotCommitted)
    ));
    assert!(matches!(
        Image::parse_header(&[], 100),
        Err(FixedRamError::BadMagic)
    ));
    // Every truncation is an error, never a panic.
    let b = h.to_bytes();
    for n in 0..b.len() {
        assert!(Image::parse_header(&b[..n], len).is_err());
        assert!(Image::parse_header(&b, n as u64).is_err());
    }
}

#[test]
fn mutated_headers_never_panic() {
    let (h, len) = valid_header();
    let base = h.to_bytes();
    let mut rng = Rng(99);
    for i in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(b.len() as u64) as usize;
            match rng.below(3) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = 0xff,
                _ => b[at] = 0,
            }
        }
        if i % 2 == 0 {
            fix_crc(&mut b);
        }
        let file_len = match rng.below(3) {
            0 => len,
            1 => rng.next(),
            _ => rng.below(len * 2),
        };
        let _ = Image::parse_header(&b, file_len);
    }
}

#[test]
fn hostile_files_fail_cleanly() {
    let dir = TempDir::new();
    let (h, len) = valid_header();
    let path = dir.path("hostile.img");
    let write = |bytes: &[u8], file_len: u64| {
        let _ = std::fs::remove_file(&path);
        let f = File::create(&path).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.set_len(file_len).unwrap();
    };
    // A valid header over an all-zero body: the checksums do not match, but
    // opening works (bitmaps empty) and verify names the first chunk.
    write(&h.to_bytes(), len);
    let image = Image::open(&path).unwrap();
    assert_eq!(image.present_pages(0), 0);
    let err = image.verify().unwrap_err();
    assert!(
        matches!(
            err,
            FixedRamError::ChunkChecksum {
                region: 0,
                chunk: 0,
                ..
            }
        ),
        "{err}"
    );
    // A bitmap with bits past the last page of region 1 (1027 pages): the
    // metadata CRC refuses it, and so does the bitmap check (version 1,
    // which has no metadata CRC).
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let last_word = h.regions[1].bitmap_offset + h.regions[1].bitmap_len - 8;
    f.write_all_at(&(1u64 << 3).to_le_bytes(), last_word)
        .unwrap();
    let err = Image::open(&path).unwrap_err();
    assert!(
        matches!(err, FixedRamError::MetadataChecksum { .. }),
        "{err}"
    );
    let v1 = Header {
        format_version: 1,
        metadata_crc: None,
        ..h.clone()
    };
    f.write_all_at(&v1.to_bytes(), 0).unwrap();
    let err = Image::open(&path).unwrap_err();
    assert!(
        matches!(err, FixedRamError::BadBitmap { region: 1, .. }),
        "{err}"
    );
    // A huge claimed region on a small (sparse) file: refused before any
    // allocation.
    let mut h2 = h.clone();
    h2.regions[1].size = 1 << 40;
    h2.regions[1].bitmap_len = (1 << 40) / 4096 / 8;
    write(&h2.to_bytes(), len);
    assert!(Image::open(&path).is_err());
    // Region count 1_000_000.
    write(&patched(&h, 28, 1_000_000), len);
    assert!(matches!(
        Image::open(&path),
        Err(FixedRamError::RegionCount(1_000_000))
    ));
}

#[test]
fn error_messages_are_one_line() {
    let errors = [
        FixedRamError::NotCommitted,
        FixedRamError::BadMagic,
        FixedRamError::UnsupportedVersion {
            found: 9,
            supported: 2,
        },
        FixedRamError::MetadataChecksum {
            stored: 1,
            computed: 2,
        },
        FixedRamError::ChunkChecksum {
            region: 1,
            chunk: 2,
            expected: 0xdead_beef,
            found: 1,
            guest_start: 0x1_0020_0000,
            guest_end: 0x1_0030_0000,
        },
        FixedRamError::OutOfFile {
            what: "the checksum table".into(),
            offset: 0x100000,
            len: 52,
            file_len: 4096,
        },
    ];
    for e in &errors {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
    }
    assert_eq!(
        errors[4].to_string(),
        "chunk 2 of region 1 (guest 0x100200000..0x100300000) is corrupt: CRC32C 0x00000001, expected 0xdeadbeef"
    );
}

#[test]
fn writer_over_an_o_direct_file() {
    let dir = TempDir::new();
    let path = dir.path("direct.img");
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    else {
        eprintln!("no O_DIRECT on this file system; skipped");
        return;
    };
    let specs = specs();
    let mem = guest_memory(&specs, 40, 21);
    let layout = Layout::new(PS, &specs).unwrap();
    let writer = ImageWriter::from_file(file, layout.clone()).unwrap();
    let ps = PS as usize;
    let mut backing = vec![0u8; MIB as usize + ps];
    let shift = backing.as_ptr().align_offset(ps);
    // Write everything, then rewrite chunk 0 with a page gone to zero (the
    // punch goes through the O_DIRECT file too).
    let mut mem2 = mem.clone();
    mem2[0][..ps].fill(0);
    for (m, chunks) in [(&mem, all_chunks(&layout)), (&mem2, vec![(0, 0)])] {
        for (r, c) in chunks {
            let src = chunk_of(&layout, m, r, c);
            let buf = &mut backing[shift..shift + src.len()];
            buf.copy_from_slice(src);
            writer.write_chunk(r, c, buf).unwrap();
        }
    }
    let state: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    writer.commit(&state).unwrap();
    let image = Image::open(&path).unwrap();
    assert_eq!(image.apparent_size(), layout.device_state_offset() + 5000);
    image.verify().unwrap();
    assert_eq!(read_all(&image, false), mem2);
    assert_eq!(image.device_state().unwrap(), state);
}
