//! File channels: round trips with 1, 2, 4 channels, buffered and O_DIRECT,
//! checksum mismatch detection, O_DIRECT refused on tmpfs.

mod common;

use std::path::{Path, PathBuf};

use common::{direct_io_works, fill, Anon, TestLayout, CHUNK, PAGE};
use multifd::{
    load_from_file, save_to_file, DirectIo, FileChannelOptions, MultifdError, TransferStats,
};

const SIZES: [u64; 2] = [8 << 20, 4 << 20];

fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("multifd-file-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn new_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
}

struct Saved {
    mems: Vec<Anon>,
    layout: TestLayout,
    stats: TransferStats,
}

fn save(path: &Path, sizes: &[u64], channels: usize, direct: DirectIo, seed: u64) -> Saved {
    let layout = TestLayout::new(sizes);
    new_file(path, layout.file_len);
    let mut mems: Vec<Anon> = sizes.iter().map(|&s| Anon::new(s as usize)).collect();
    let mut present = 0;
    for (i, m) in mems.iter_mut().enumerate() {
        present += fill(m.bytes_mut(), seed + i as u64);
    }
    let regions: Vec<_> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| m.region(i as u64 * (1 << 32)))
        .collect();
    let opts = FileChannelOptions {
        channels,
        direct_io: direct,
        prefault: true,
    };
    let stats = save_to_file(path, &regions, &layout, &opts).unwrap();
    let total_pages: u64 = sizes.iter().map(|s| s / PAGE).sum();
    assert_eq!(stats.present_pages, present);
    assert_eq!(stats.zero_pages, total_pages - present);
    assert_eq!(stats.bytes, present * PAGE);
    assert_eq!(stats.channels, channels);
    assert_eq!(
        *layout.saved_calls.lock().unwrap(),
        sizes.iter().map(|s| s.div_ceil(CHUNK)).sum::<u64>()
    );
    Saved {
        mems,
        layout,
        stats,
    }
}

fn check_file(path: &Path, s: &Saved) {
    let file = std::fs::read(path).unwrap();
    assert_eq!(file.len() as u64, s.layout.file_len);
    assert!(
        file[..CHUNK as usize].iter().all(|&b| b == 0),
        "header area untouched"
    );
    for (r, m) in s.mems.iter().enumerate() {
        let base = s.layout.bases[r] as usize;
        let mem = m.bytes();
        for p in 0..mem.len() / PAGE as usize {
            let want = &mem[p * PAGE as usize..(p + 1) * PAGE as usize];
            let got = &file[base + p * PAGE as usize..base + (p + 1) * PAGE as usize];
            assert_eq!(got, want, "region {r} page {p}");
            let nonzero = want.iter().any(|&b| b != 0);
            assert_eq!(
                s.layout.is_present(r, p as u64),
                nonzero,
                "region {r} page {p} bitmap"
            );
        }
        // The CRCs are those of the memory.
        let crcs = s.layout.crcs.lock().unwrap();
        for (c, crc) in crcs[r].iter().enumerate() {
            let start = c * CHUNK as usize;
            let end = (start + CHUNK as usize).min(mem.len());
            assert_eq!(
                crc.unwrap(),
                crc32c::crc32c(&mem[start..end]),
                "region {r} chunk {c}"
            );
        }
    }
}

fn load(
    path: &Path,
    s: &Saved,
    channels: usize,
    direct: DirectIo,
) -> Result<(Vec<Anon>, TransferStats), MultifdError> {
    let mems: Vec<Anon> = s
        .layout
        .sizes
        .iter()
        .map(|&sz| Anon::new(sz as usize))
        .collect();
    let regions: Vec<_> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| m.region(i as u64 * (1 << 32)))
        .collect();
    let opts = FileChannelOptions {
        channels,
        direct_io: direct,
        prefault: true,
    };
    let stats = load_from_file(path, &regions, &s.layout, &opts)?;
    Ok((mems, stats))
}

fn round_trip(dir: &Path, channels: usize, direct: DirectIo) {
    let path = dir.join(format!("img-{channels}-{direct:?}"));
    let s = save(&path, &SIZES, channels, direct, 42 + channels as u64);
    assert_eq!(s.stats.direct_io, direct == DirectIo::On);
    check_file(&path, &s);
    for load_channels in [1, channels, 3] {
        let (mems, stats) = load(&path, &s, load_channels, direct).unwrap();
        assert_eq!(stats.present_pages, s.stats.present_pages);
        assert_eq!(stats.zero_pages, s.stats.zero_pages);
        assert_eq!(stats.bytes, s.stats.bytes);
        for (a, b) in mems.iter().zip(&s.mems) {
            assert!(a.bytes() == b.bytes(), "restored memory differs");
        }
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn round_trip_buffered() {
    let dir = tmp_dir("buffered");
    for ch in [1, 2, 4] {
        round_trip(&dir, ch, DirectIo::Off);
    }
}

#[test]
fn round_trip_direct() {
    let dir = tmp_dir("direct");
    if !direct_io_works(&dir) {
        eprintln!("skipping: {} does not support O_DIRECT", dir.display());
        return;
    }
    for ch in [1, 2, 4] {
        round_trip(&dir, ch, DirectIo::On);
    }
}

#[test]
fn odd_region_sizes() {
    // A region that is not a whole number of chunks, one of a single page,
    // and all-zero memory.
    let dir = tmp_dir("odd");
    let path = dir.join("img");
    let sizes = [CHUNK * 3 + 5 * PAGE, PAGE, 2 * CHUNK];
    let s = save(&path, &sizes, 3, DirectIo::Auto, 7);
    check_file(&path, &s);
    let (mems, _) = load(&path, &s, 2, DirectIo::Auto).unwrap();
    for (a, b) in mems.iter().zip(&s.mems) {
        assert!(a.bytes() == b.bytes());
    }
}

/// Flips a bit of the first present page of `region`'s chunk `chunk` in the file.
fn corrupt_chunk(path: &Path, s: &Saved, region: usize, chunk: u64) {
    let page = (chunk * CHUNK / PAGE..(chunk + 1) * CHUNK / PAGE)
        .find(|&p| s.layout.is_present(region, p))
        .unwrap();
    let off = s.layout.bases[region] + page * PAGE + 100;
    let mut data = std::fs::read(path).unwrap();
    data[off as usize] ^= 0x10;
    std::fs::write(path, &data).unwrap();
}

#[test]
fn checksum_mismatch_names_the_chunk() {
    let dir = tmp_dir("corrupt");
    let path = dir.join("img");
    let s = save(&path, &SIZES, 2, DirectIo::Off, 99);
    corrupt_chunk(&path, &s, 1, 2);
    for ch in [1, 4] {
        let err = load(&path, &s, ch, DirectIo::Off)
            .err()
            .expect("corruption detected");
        let msg = err.to_string();
        assert!(matches!(err, MultifdError::ChunkRejected { .. }), "{msg}");
        assert!(msg.contains("region 1 chunk 2"), "{msg}");
    }
}

#[test]
fn an_early_bad_chunk_stops_a_long_load() {
    // The first chunk is bad and many units follow it: the channel's prep
    // thread, blocked on a full queue, must stop too, and the load return.
    let dir = tmp_dir("early-bad");
    let path = dir.join("img");
    let s = save(&path, &[48 * CHUNK], 1, DirectIo::Off, 5);
    corrupt_chunk(&path, &s, 0, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let err = load(&path, &s, 1, DirectIo::Off).err();
        let _ = tx.send(err.map(|e| e.to_string()));
    });
    let msg = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the load hung after a rejected chunk")
        .expect("corruption detected");
    assert!(msg.contains("region 0 chunk 0"), "{msg}");
    worker.join().unwrap();
}

#[test]
fn short_file_is_an_error() {
    let dir = tmp_dir("short");
    let path = dir.join("img");
    let s = save(&path, &SIZES, 1, DirectIo::Off, 5);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(s.layout.file_len - CHUNK - 1).unwrap();
    let err = load(&path, &s, 2, DirectIo::Off).err().expect("short file");
    assert!(matches!(err, MultifdError::Io { .. }), "{err}");
}

#[test]
fn tmpfs_refuses_direct_io() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() || direct_io_works(shm) {
        eprintln!("skipping: /dev/shm is missing or supports O_DIRECT");
        return;
    }
    let path = shm.join(format!("multifd-test-{}", std::process::id()));
    let layout = TestLayout::new(&[CHUNK]);
    new_file(&path, layout.file_len);
    let mut mem = Anon::new(CHUNK as usize);
    fill(mem.bytes_mut(), 3);
    let regions = [mem.region(0)];
    let on = FileChannelOptions {
        channels: 2,
        direct_io: DirectIo::On,
        prefault: true,
    };
    let err = save_to_file(&path, &regions, &layout, &on).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, MultifdError::DirectIoUnsupported { fs_type, .. } if fs_type == "tmpfs"),
        "{msg}"
    );
    assert!(msg.contains("tmpfs") && msg.contains("O_DIRECT"), "{msg}");
    let auto = FileChannelOptions {
        channels: 2,
        direct_io: DirectIo::Auto,
        prefault: true,
    };
    let stats = save_to_file(&path, &regions, &layout, &auto).unwrap();
    assert!(!stats.direct_io);
    let target = Anon::new(CHUNK as usize);
    let stats = load_from_file(&path, &[target.region(0)], &layout, &auto).unwrap();
    assert!(!stats.direct_io);
    assert!(target.bytes() == mem.bytes());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_arguments() {
    let dir = tmp_dir("args");
    let path = dir.join("img");
    let layout = TestLayout::new(&[CHUNK]);
    new_file(&path, layout.file_len);
    let mem = Anon::new(2 * CHUNK as usize);
    let opts = |channels| FileChannelOptions {
        channels,
        direct_io: DirectIo::Off,
        prefault: true,
    };
    let r = [mem.region(0)];
    assert!(matches!(
        save_to_file(&path, &r, &layout, &opts(0)),
        Err(MultifdError::InvalidArgument(_))
    ));
    // SAFETY: inside the mapping; deliberately misaligned.
    let bad = unsafe { multifd::MemRegion::new(0, mem.ptr.add(8), CHUNK) };
    assert!(matches!(
        save_to_file(&path, &[bad], &layout, &opts(1)),
        Err(MultifdError::Layout(_))
    ));
    // Missing file.
    let err = save_to_file(&dir.join("missing"), &r, &layout, &opts(1)).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

/// Each region at its own 4 GiB of guest space.
fn regions_of(mems: &[Anon]) -> Vec<multifd::MemRegion> {
    mems.iter()
        .enumerate()
        .map(|(i, m)| m.region(i as u64 * (1 << 32)))
        .collect()
}

/// One live dirty pass of `maps` over `mems` into `path` (no O_DIRECT).
fn dirty_pass(
    path: &std::path::Path,
    mems: &[Anon],
    layout: &TestLayout,
    maps: &[&[u64]],
    channels: usize,
    max_bytes_per_s: Option<u64>,
) -> multifd::TransferStats {
    let never = std::sync::atomic::AtomicBool::new(false);
    let pass = multifd::FilePass {
        pages: multifd::PageSet::Dirty(maps),
        max_bytes_per_s,
        stop: &never,
        // As a live save's rounds: the threads yield to others.
        background: true,
    };
    let opts = FileChannelOptions {
        channels,
        direct_io: DirectIo::Off,
        prefault: false,
    };
    multifd::save_pass_to_file(path, &regions_of(mems), layout, &opts, &pass).unwrap()
}

/// A live save's later pass writes only the dirty pages, and records the
/// bitmaps and CRCs of the chunks holding them anew, computed over the
/// whole chunk.
#[test]
fn a_dirty_pass_writes_the_dirty_pages_and_records_their_chunks() {
    let dir = tmp_dir("dirty-pass");
    let path = dir.join("img");
    let mut s = save(&path, &SIZES, 2, DirectIo::Off, 7);
    let pages0 = (SIZES[0] / PAGE) as usize;
    let ps = PAGE as usize;
    // Page 3 (chunk 0) changes; page 300 (chunk 1) becomes zero; page 10
    // changes too but is not marked dirty (in a live save the next pass
    // would find it).
    let old10 = s.mems[0].bytes()[10 * ps..11 * ps].to_vec();
    s.mems[0].bytes_mut()[3 * ps..4 * ps].fill(0xa5);
    s.mems[0].bytes_mut()[300 * ps..301 * ps].fill(0);
    s.mems[0].bytes_mut()[10 * ps..11 * ps].fill(0x5a);
    let mut map0 = vec![0u64; pages0.div_ceil(64)];
    map0[0] |= 1 << 3;
    map0[300 / 64] |= 1 << (300 % 64);
    let map1 = vec![0u64; (SIZES[1] / PAGE).div_ceil(64) as usize];
    let maps: Vec<&[u64]> = vec![&map0, &map1];
    let again = TestLayout::new(&SIZES);
    let stats = dirty_pass(&path, &s.mems, &again, &maps, 2, Some(1 << 30));
    assert_eq!(*again.saved_calls.lock().unwrap(), 2, "chunks 0 and 1");
    assert_eq!(
        (stats.present_pages, stats.zero_pages),
        (1, 1),
        "pages 3 and 300"
    );
    assert_eq!(stats.bytes, PAGE);
    let crcs = again.crcs.lock().unwrap();
    let mem = s.mems[0].bytes();
    for c in 0..2usize {
        let want = crc32c::crc32c(&mem[c * CHUNK as usize..(c + 1) * CHUNK as usize]);
        assert_eq!(crcs[0][c], Some(want), "chunk {c}");
    }
    assert!(crcs[0][2].is_none() && crcs[1].iter().all(Option::is_none));
    assert!(again.is_present(0, 3) && !again.is_present(0, 300));
    let file = std::fs::read(&path).unwrap();
    let at = again.bases[0] as usize + 3 * ps;
    assert!(file[at..at + ps].iter().all(|&b| b == 0xa5));
    let at = again.bases[0] as usize + 10 * ps;
    assert!(
        file[at..at + ps] == old10[..],
        "a page not dirty is not written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dirty pages close together in a chunk go out as one write that covers
/// the pages between them, from the pass's copy (so the file holds the
/// bytes the chunk's CRC covers); pages farther apart are written apart.
#[test]
fn a_dirty_pass_joins_close_dirty_pages_into_one_write() {
    let dir = tmp_dir("dirty-join");
    let path = dir.join("img");
    let mut s = save(&path, &SIZES, 1, DirectIo::Off, 9);
    let ps = PAGE as usize;
    // Pages 20 and 30 are dirty (9 clean pages apart), page 25 changed
    // without being marked; page 100 is dirty, far from the others.
    for (p, b) in [(20, 0x20u8), (25, 0x25), (30, 0x30), (100, 0x64)] {
        s.mems[0].bytes_mut()[p * ps..(p + 1) * ps].fill(b);
    }
    let mut map0 = vec![0u64; (SIZES[0] / PAGE).div_ceil(64) as usize];
    for p in [20, 30, 100] {
        map0[p / 64] |= 1 << (p % 64);
    }
    let map1 = vec![0u64; (SIZES[1] / PAGE).div_ceil(64) as usize];
    let maps: Vec<&[u64]> = vec![&map0, &map1];
    let again = TestLayout::new(&SIZES);
    let stats = dirty_pass(&path, &s.mems, &again, &maps, 1, None);
    assert_eq!(stats.present_pages, 3);
    assert_eq!(
        stats.bytes,
        12 * PAGE,
        "pages 20..=30 as one write, then 100"
    );
    let file = std::fs::read(&path).unwrap();
    let mem = s.mems[0].bytes();
    let base = again.bases[0] as usize;
    assert!(file[base + 20 * ps..base + 31 * ps] == mem[20 * ps..31 * ps]);
    assert!(file[base + 100 * ps..base + 101 * ps] == mem[100 * ps..101 * ps]);
    let crcs = again.crcs.lock().unwrap();
    assert_eq!(crcs[0][0], Some(crc32c::crc32c(&mem[..CHUNK as usize])));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stopped_pass_ends_with_aborted() {
    let dir = tmp_dir("stopped-pass");
    let path = dir.join("img");
    let s = save(&path, &SIZES, 1, DirectIo::Off, 9);
    let regions = regions_of(&s.mems);
    let stop = std::sync::atomic::AtomicBool::new(true);
    let pass = multifd::FilePass {
        pages: multifd::PageSet::AllNonZero,
        max_bytes_per_s: None,
        stop: &stop,
        background: false,
    };
    let opts = FileChannelOptions {
        channels: 2,
        direct_io: DirectIo::Off,
        prefault: false,
    };
    let layout = TestLayout::new(&SIZES);
    let r = multifd::save_pass_to_file(&path, &regions, &layout, &opts, &pass);
    assert!(matches!(r, Err(MultifdError::Aborted(_))), "{r:?}");
    // A page set that does not fit the regions is refused up front.
    let short: Vec<&[u64]> = vec![&[]];
    let bad = multifd::FilePass {
        pages: multifd::PageSet::Dirty(&short),
        ..pass
    };
    let r = multifd::save_pass_to_file(&path, &regions, &layout, &opts, &bad);
    assert!(matches!(r, Err(MultifdError::InvalidArgument(_))), "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn never_populated_memory_is_saved_as_zeros_without_being_read() {
    let dir = tmp_dir("unpopulated");
    let path = dir.join("img");
    let sizes = [4 * CHUNK + 3 * PAGE];
    let layout = TestLayout::new(&sizes);
    new_file(&path, layout.file_len);
    let mut mem = Anon::new(sizes[0] as usize);
    // 4 KiB pages, so that one write populates one page.
    // SAFETY: advice on the test's own mapping; it changes no contents.
    unsafe { libc::madvise(mem.ptr.cast(), mem.len, libc::MADV_NOHUGEPAGE) };
    // Data in some pages of chunks 0 and 2 and in the last, partial chunk;
    // a page written with zeros (populated, zero); chunks 1 and 3 untouched.
    let written = [0u64, 5, 2 * (CHUNK / PAGE) + 7, 4 * (CHUNK / PAGE) + 1];
    for &p in &written {
        mem.bytes_mut()[(p * PAGE) as usize + 9] = 0xa5;
    }
    let zero_written = 2 * (CHUNK / PAGE) + 8;
    mem.bytes_mut()[(zero_written * PAGE) as usize..((zero_written + 1) * PAGE) as usize].fill(0);
    let opts = FileChannelOptions {
        channels: 2,
        direct_io: DirectIo::Auto,
        prefault: true,
    };
    let stats = save_to_file(&path, &[mem.region(0)], &layout, &opts).unwrap();
    assert_eq!(stats.present_pages, written.len() as u64);
    assert_eq!(stats.zero_pages, sizes[0] / PAGE - written.len() as u64);
    // The save did not touch the pages it was never given (this process
    // may read its own pagemap; where it cannot, nothing was skipped).
    if let Some(pagemap) = page_runs::populated::Pagemap::open() {
        let mut untouched = Vec::new();
        pagemap.unpopulated_pages(mem.ptr as usize, mem.len, PAGE as usize, &mut untouched);
        let expected_populated = written.len() + 1;
        assert_eq!(
            untouched.iter().filter(|u| !**u).count(),
            expected_populated,
            "pages populated after the save"
        );
    }
    // The image is that of the memory: data, bitmaps and CRCs (zeros
    // included), and it loads back.
    let saved = Saved {
        mems: vec![mem],
        layout,
        stats,
    };
    check_file(&path, &saved);
    let (mems, _) = load(&path, &saved, 1, DirectIo::Auto).unwrap();
    assert!(mems[0].bytes() == saved.mems[0].bytes());
    std::fs::remove_file(&path).unwrap();
}

/// A live save's first pass also takes never-populated memory for zeros
/// without reading it; a page the guest populates afterwards is written by
/// the dirty pass that finds it, and the chunk's CRC then covers it.
#[test]
fn a_live_first_pass_leaves_never_populated_memory_unread() {
    let dir = tmp_dir("unpopulated-live");
    let path = dir.join("img");
    let sizes = [4 * CHUNK];
    let layout = TestLayout::new(&sizes);
    new_file(&path, layout.file_len);
    let mut mem = Anon::new(sizes[0] as usize);
    // SAFETY: advice on the test's own mapping; it changes no contents.
    unsafe { libc::madvise(mem.ptr.cast(), mem.len, libc::MADV_NOHUGEPAGE) };
    let written = [1u64, 2 * (CHUNK / PAGE) + 3];
    for &p in &written {
        mem.bytes_mut()[(p * PAGE) as usize + 17] = 0x3c;
    }
    let populated_now = |mem: &Anon| {
        page_runs::populated::Pagemap::open().map(|pagemap| {
            let mut untouched = Vec::new();
            pagemap.unpopulated_pages(mem.ptr as usize, mem.len, PAGE as usize, &mut untouched);
            untouched.iter().filter(|u| !**u).count()
        })
    };
    let before = populated_now(&mem);
    let never = std::sync::atomic::AtomicBool::new(false);
    let pass = multifd::FilePass {
        pages: multifd::PageSet::AllNonZero,
        max_bytes_per_s: None,
        stop: &never,
        background: false,
    };
    let opts = FileChannelOptions {
        channels: 2,
        direct_io: DirectIo::Off,
        prefault: false,
    };
    let regions = [mem.region(0)];
    let stats = multifd::save_pass_to_file(&path, &regions, &layout, &opts, &pass).unwrap();
    assert_eq!(stats.present_pages, written.len() as u64);
    assert_eq!(populated_now(&mem), before, "the pass populated memory");
    let chunk_crc = |mem: &Anon, c: u64| {
        crc32c::crc32c(&mem.bytes()[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize])
    };
    for c in 0..4 {
        let crcs = layout.crcs.lock().unwrap();
        assert_eq!(crcs[0][c as usize], Some(chunk_crc(&mem, c)), "chunk {c}");
    }
    // The guest populates a page of an untouched chunk after the pass.
    let late = 3 * (CHUNK / PAGE) + 9;
    mem.bytes_mut()[(late * PAGE) as usize] = 0x77;
    let mut map = vec![0u64; (sizes[0] / PAGE).div_ceil(64) as usize];
    map[(late / 64) as usize] |= 1 << (late % 64);
    let maps: Vec<&[u64]> = vec![&map];
    let again = TestLayout::new(&sizes);
    let stats = dirty_pass(&path, std::slice::from_ref(&mem), &again, &maps, 1, None);
    assert_eq!(stats.present_pages, 1);
    assert_eq!(again.crcs.lock().unwrap()[0][3], Some(chunk_crc(&mem, 3)));
    let file = std::fs::read(&path).unwrap();
    let base = layout.bases[0] as usize;
    let bytes = mem.bytes();
    for p in written.iter().chain([&late]) {
        let at = (*p * PAGE) as usize;
        assert!(file[base + at..base + at + PAGE as usize] == bytes[at..at + PAGE as usize]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
