//! Real userfaultfd tests: anonymous memory written by threads during the snapshot.

use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bg_snapshot::{
    arm, arm_with, check_support, prepare, prepare_with, ArmOptions, BlockSink, MemRange,
    SinkError, SnapshotError, SnapshotReport,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// An mmap'd region, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the test threads only touch the mapping through raw pointers while it is alive.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn anon(len: usize) -> Mapping {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> Mapping {
        // SAFETY: a fresh mapping at an address of the kernel's choosing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn range(&self) -> MemRange {
        // SAFETY: the mapping outlives every snapshot in these tests and is never unmapped early.
        unsafe { MemRange::new(self.ptr, self.len) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped for `len` bytes; only read when no writer runs.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Writes every page (would hang if any protection were left).
    fn write_every_page(&self, val: u8) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: inside the mapping.
            unsafe { self.ptr.add(off).write_volatile(val) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// T0 content of byte `off` of range `r` for the touched part.
fn pattern_page(r: usize, page: usize, out: &mut [u8]) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = ((r as u64) << 48) ^ ((page as u64) << 16) ^ (i as u64) ^ 0x5a5a_0000_0000_0000;
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

/// Fills the first `touched` bytes of `m` with the pattern; the rest stays never-touched.
fn fill(m: &Mapping, r: usize, touched: usize) {
    for page in 0..touched / PAGE {
        // SAFETY: inside the mapping; no other thread runs yet.
        let p = unsafe { std::slice::from_raw_parts_mut(m.ptr.add(page * PAGE), PAGE) };
        pattern_page(r, page, p);
    }
}

fn expected(r: usize, len: usize, touched: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for page in 0..touched / PAGE {
        pattern_page(r, page, &mut v[page * PAGE..(page + 1) * PAGE]);
    }
    v
}

/// Stores blocks into per-range images and counts writes per block.
struct VecSink {
    bs: usize,
    images: Vec<Mutex<Vec<u8>>>,
    counts: Vec<Vec<AtomicU32>>,
    delay: Duration,
    fail_at: Option<(usize, u64)>,
    /// Blocks handed over as never populated (`write_zero_block`).
    zeros: Mutex<Vec<(usize, u64)>>,
}

impl VecSink {
    fn new(bs: usize, lens: &[usize], delay: Duration) -> VecSink {
        VecSink {
            bs,
            images: lens.iter().map(|&l| Mutex::new(vec![0xcc; l])).collect(),
            counts: lens
                .iter()
                .map(|&l| (0..l.div_ceil(bs)).map(|_| AtomicU32::new(0)).collect())
                .collect(),
            delay,
            fail_at: None,
            zeros: Mutex::new(Vec::new()),
        }
    }

    fn assert_each_block_once(&self) {
        for (r, c) in self.counts.iter().enumerate() {
            for (b, n) in c.iter().enumerate() {
                assert_eq!(n.load(Ordering::SeqCst), 1, "range {r} block {b}");
            }
        }
    }
}

impl BlockSink for VecSink {
    fn block_size(&self) -> usize {
        self.bs
    }

    fn write_block(&self, range: usize, block: u64, data: &[u8]) -> Result<(), SinkError> {
        if self.fail_at == Some((range, block)) {
            return Err("disk full (test)".into());
        }
        let off = block as usize * self.bs;
        self.images[range].lock().unwrap()[off..off + data.len()].copy_from_slice(data);
        self.counts[range][block as usize].fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            thread::sleep(self.delay);
        }
        Ok(())
    }

    fn write_zero_block(&self, range: usize, block: u64, len: usize) -> Result<(), SinkError> {
        self.zeros.lock().unwrap().push((range, block));
        self.write_block(range, block, &vec![0u8; len])
    }
}

/// Writer threads: each writes `n` random whole pages with a new pattern.
struct Writers {
    rx: mpsc::Receiver<usize>,
    count: usize,
}

fn start_writers(maps: &[&Mapping], count: usize, n: usize) -> Writers {
    let targets: Vec<(usize, usize)> = maps.iter().map(|m| (m.ptr as usize, m.len)).collect();
    let (tx, rx) = mpsc::channel();
    for w in 0..count {
        let targets = targets.clone();
        let tx = tx.clone();
        thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (base, len) = targets[(x >> 60) as usize % targets.len()];
                let page = (x as usize >> 8) % (len / PAGE);
                // SAFETY: inside a live mapping; the test keeps it mapped until the
                // writers are done.
                unsafe {
                    std::ptr::write_bytes((base + page * PAGE) as *mut u8, 0xe0 | w as u8, PAGE)
                };
            }
            let _ = tx.send(n);
        });
    }
    Writers { rx, count }
}

impl Writers {
    /// Panics if the writers do not all finish in time (one was stuck).
    fn wait(self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..self.count {
            let left = deadline.saturating_duration_since(Instant::now());
            let done = self
                .rx
                .recv_timeout(left)
                .expect("a writer is stuck on write-protected memory");
            assert_eq!(done, n);
        }
    }
}

/// Number of pages of `m` whose page table entry carries the uffd-wp bit
/// (/proc/self/pagemap bit 57).
fn wp_pages(m: &Mapping) -> usize {
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start((m.ptr as u64 / PAGE as u64) * 8))
        .unwrap();
    let mut buf = vec![0u8; m.len / PAGE * 8];
    f.read_exact(&mut buf).unwrap();
    buf.chunks(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (1 << 57) != 0)
        .count()
}

fn exact_snapshot(walkers: usize, opts: ArmOptions) {
    let bs = 256 * 1024;
    let (len0, len1) = (32 * MIB, 32 * MIB);
    let (m0, m1) = (Mapping::anon(len0), Mapping::anon(len1));
    fill(&m0, 0, len0);
    fill(&m1, 1, len1 / 2); // second half never touched
    let armed = arm_with(&[m0.range(), m1.range()], bs, opts).unwrap();
    assert_eq!(
        wp_pages(&m0) + wp_pages(&m1),
        if armed.used_wp_unpopulated() {
            (len0 + len1) / PAGE
        } else {
            wp_pages(&m0) + wp_pages(&m1)
        }
    );
    assert!(wp_pages(&m0) > 0);
    // Writers resume after arm (they block on their first fault until run serves it).
    let n = 4000;
    let writers = start_writers(&[&m0, &m1], 2, n);
    let sink = VecSink::new(bs, &[len0, len1], Duration::from_micros(100));
    let report = armed.run(&sink, walkers).unwrap();
    eprintln!("walkers={walkers} opts={opts:?}: {report:#?}");
    writers.wait(n);
    sink.assert_each_block_once();
    assert!(
        sink.images[0].lock().unwrap()[..] == expected(0, len0, len0)[..],
        "range 0 differs from T0"
    );
    assert!(
        sink.images[1].lock().unwrap()[..] == expected(1, len1, len1 / 2)[..],
        "range 1 differs from T0"
    );
    let total = ((len0 + len1) / bs) as u64;
    assert_eq!(report.blocks_by_walkers + report.blocks_by_faults, total);
    assert!(report.pages_by_faults > 0, "no page was copied by a fault");
    assert!(report.faults >= report.pages_by_faults + report.blocks_by_faults);
    // One page per copying fault (the default run), or a block when the
    // pool was full.
    assert_eq!(
        report.fault_latency.count,
        report.pages_by_faults + report.blocks_by_faults
    );
    assert_eq!(report.wp_unpopulated, opts.use_wp_unpopulated);
    assert_eq!(
        (wp_pages(&m0), wp_pages(&m1)),
        (0, 0),
        "protection left after run"
    );
    // The writers' new data is in memory (the snapshot did not lose their writes).
    assert!(m0
        .bytes()
        .chunks(PAGE)
        .chain(m1.bytes().chunks(PAGE))
        .any(|p| p[0] & 0xf0 == 0xe0));
    m0.write_every_page(1);
    m1.write_every_page(1);
}

#[test]
fn support_is_reported() {
    let s = check_support().unwrap();
    eprintln!("{s:#?}");
    assert!(s.wp);
}

#[test]
fn exact_with_one_walker() {
    exact_snapshot(1, ArmOptions::default());
}

#[test]
fn exact_with_four_walkers() {
    exact_snapshot(4, ArmOptions::default());
}

#[test]
fn exact_with_pre_touch_instead_of_wp_unpopulated() {
    exact_snapshot(
        2,
        ArmOptions {
            use_wp_unpopulated: false,
            ..ArmOptions::default()
        },
    );
}

#[test]
fn shmem_is_exact_too() {
    let len = 8 * MIB;
    let m = Mapping::map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
    fill(&m, 0, len / 2);
    let armed = arm(&[m.range()], MIB).unwrap();
    let writers = start_writers(&[&m], 2, 2000);
    let sink = VecSink::new(MIB, &[len], Duration::from_micros(200));
    let report = armed.run(&sink, 2).unwrap();
    writers.wait(2000);
    eprintln!("shmem: {report:#?}");
    sink.assert_each_block_once();
    assert!(sink.images[0].lock().unwrap()[..] == expected(0, len, len / 2)[..]);
    assert_eq!(wp_pages(&m), 0);
}

fn assert_unprotected(maps: &[&Mapping]) {
    for m in maps {
        assert_eq!(wp_pages(m), 0, "protection left");
        m.write_every_page(2);
    }
}

#[test]
fn cancel_mid_run_releases_writers() {
    let bs = 256 * 1024;
    let len = 32 * MIB;
    let m = Mapping::anon(len);
    fill(&m, 0, len);
    let armed = arm(&[m.range()], bs).unwrap();
    let cancel = armed.cancel_handle();
    let n = 3000;
    let writers = start_writers(&[&m], 2, n);
    let sink = VecSink::new(bs, &[len], Duration::from_millis(5)); // ~640 ms to walk
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(40));
        cancel.cancel();
    });
    let res = armed.run(&sink, 1);
    canceller.join().unwrap();
    assert!(matches!(res, Err(SnapshotError::Cancelled)), "{res:?}");
    // The walk stopped early (a count, not a time: speed is for benchmarks).
    let copied: u32 = sink.counts[0]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum();
    assert!(
        (copied as usize) < len / bs,
        "{copied} blocks copied: no early stop"
    );
    writers.wait(n);
    assert_unprotected(&[&m]);
}

#[test]
fn sink_error_removes_protection() {
    let bs = 256 * 1024;
    let len = 16 * MIB;
    let (m0, m1) = (Mapping::anon(len), Mapping::anon(len));
    fill(&m0, 0, len);
    let armed = arm(&[m0.range(), m1.range()], bs).unwrap();
    let n = 2000;
    let writers = start_writers(&[&m0, &m1], 2, n);
    let mut sink = VecSink::new(bs, &[len, len], Duration::from_micros(200));
    sink.fail_at = Some((1, 20));
    let res = armed.run(&sink, 2);
    match res {
        Err(SnapshotError::Sink {
            range: 1,
            block: 20,
            ref source,
        }) => {
            assert!(source.to_string().contains("disk full"))
        }
        other => panic!("expected the sink error, got {other:?}"),
    }
    writers.wait(n);
    assert_unprotected(&[&m0, &m1]);
}

#[test]
fn disarm_and_drop_release_writers() {
    let m = Mapping::anon(4 * MIB);
    fill(&m, 0, MIB);
    let armed = arm(&[m.range()], MIB).unwrap();
    assert!(wp_pages(&m) > 0);
    let writers = start_writers(&[&m], 1, 100); // blocks on its first write
    thread::sleep(Duration::from_millis(20));
    armed.disarm().unwrap();
    writers.wait(100);
    assert_unprotected(&[&m]);

    let armed = arm(&[m.range()], MIB).unwrap();
    let writers = start_writers(&[&m], 1, 100);
    thread::sleep(Duration::from_millis(20));
    drop(armed);
    writers.wait(100);
    assert_unprotected(&[&m]);
}

#[test]
fn private_file_mapping_cannot_be_write_protected() {
    let path = std::env::temp_dir().join(format!("bg-snapshot-test-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(MIB as u64).unwrap();
    std::fs::remove_file(&path).unwrap();
    use std::os::fd::AsRawFd;
    let fm = Mapping::map(MIB, libc::MAP_PRIVATE, file.as_raw_fd());
    fm.write_every_page(3);
    let anon = Mapping::anon(MIB);
    let res = arm(&[anon.range(), fm.range()], MIB);
    match res {
        Err(SnapshotError::UnsupportedMemory { region, ref reason }) => {
            eprintln!("{}", res.as_ref().unwrap_err());
            assert_eq!(region, 1);
            assert!(reason.contains("cannot be write-protected"), "{reason}");
        }
        other => panic!("expected UnsupportedMemory, got {other:?}"),
    }
    // Nothing stays registered or protected after the failed arm.
    assert_unprotected(&[&anon, &fm]);
    // The anonymous range alone arms fine.
    arm(&[anon.range()], MIB).unwrap().disarm().unwrap();
}

#[test]
fn invalid_arguments_are_refused() {
    let m = Mapping::anon(2 * MIB);
    // SAFETY: inside the mapping.
    let unaligned = unsafe { MemRange::new(m.ptr.add(1), PAGE) };
    assert!(matches!(
        arm(&[unaligned], MIB),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        arm(&[m.range()], 3 * PAGE),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert!(matches!(
        arm(&[], MIB),
        Err(SnapshotError::InvalidArgument(_))
    ));
    // SAFETY: inside the mapping.
    let half = unsafe { MemRange::new(m.ptr.add(MIB), MIB) };
    assert!(matches!(
        arm(&[m.range(), half], MIB),
        Err(SnapshotError::InvalidArgument(_))
    ));
    // A sink with another block size is refused, and protection is removed.
    let armed = arm(&[m.range()], MIB).unwrap();
    let sink = VecSink::new(2 * MIB, &[2 * MIB], Duration::ZERO);
    assert!(matches!(
        armed.run(&sink, 1),
        Err(SnapshotError::InvalidArgument(_))
    ));
    assert_unprotected(&[&m]);
}

#[test]
fn tail_block_is_shorter() {
    let len = MIB + 3 * PAGE;
    let m = Mapping::anon(len);
    fill(&m, 0, len);
    let armed = arm(&[m.range()], MIB).unwrap();
    let sink = VecSink::new(MIB, &[len], Duration::ZERO);
    let report = armed.run(&sink, 3).unwrap();
    assert_eq!(report.blocks_by_walkers, 2);
    assert!(sink.images[0].lock().unwrap()[..] == expected(0, len, len)[..]);
    sink.assert_each_block_once();
}

#[test]
fn cancel_handle_is_shareable() {
    let flag = Arc::new(AtomicBool::new(false));
    let m = Mapping::anon(MIB);
    let armed = arm(&[m.range()], MIB).unwrap();
    let h = armed.cancel_handle();
    assert!(!h.is_cancelled());
    let h2 = h.clone();
    h2.cancel();
    assert!(h.is_cancelled());
    flag.store(true, Ordering::SeqCst);
    // Cancelled before it started: nothing is copied, protection is removed.
    let sink = VecSink::new(MIB, &[MIB], Duration::ZERO);
    assert!(matches!(armed.run(&sink, 1), Err(SnapshotError::Cancelled)));
    assert_unprotected(&[&m]);
}

#[test]
fn armed_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<bg_snapshot::Armed>();
    assert_send::<MemRange>();
    let m = Mapping::anon(MIB);
    let armed = arm(&[m.range()], MIB).unwrap();
    let sink = VecSink::new(MIB, &[MIB], Duration::ZERO);
    let report = thread::scope(|s| s.spawn(|| armed.run(&sink, 1)).join().unwrap()).unwrap();
    assert_eq!(report.blocks_by_walkers + report.blocks_by_faults, 1);
}

struct PanickingSink;

impl BlockSink for PanickingSink {
    fn block_size(&self) -> usize {
        256 * 1024
    }
    fn write_block(&self, _range: usize, block: u64, _data: &[u8]) -> Result<(), SinkError> {
        if block == 5 {
            panic!("sink panics (test)");
        }
        thread::sleep(Duration::from_micros(200));
        Ok(())
    }
}

#[test]
fn panicking_sink_still_removes_protection() {
    let len = 8 * MIB;
    let m = Mapping::anon(len);
    fill(&m, 0, len);
    let armed = arm(&[m.range()], 256 * 1024).unwrap();
    let writers = start_writers(&[&m], 2, 1000);
    let res = thread::spawn(move || armed.run(&PanickingSink, 2)).join();
    assert!(res.is_err(), "the sink's panic is propagated");
    writers.wait(1000);
    assert_unprotected(&[&m]);
}

/// Writers that keep writing whole pages (each stamped with its writer and
/// a sequence number) until told to stop, and that can be paused between two
/// pages: the pause a VMM makes by stopping its vCPUs.
struct PausableWriters {
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<u64>>,
}

impl PausableWriters {
    fn start(m: &Mapping, count: usize) -> PausableWriters {
        Self::start_with(m, count, false, Duration::ZERO)
    }

    /// Writers that start paused (`paused`) or writing, and rest `pace`
    /// after each page.
    fn start_with(m: &Mapping, count: usize, paused: bool, pace: Duration) -> PausableWriters {
        let (pause, paused, stop) = (
            Arc::new(AtomicBool::new(paused)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (base, pages) = (m.ptr as usize, m.len / PAGE);
        let handles = (0..count)
            .map(|w| {
                let (pause, paused, stop) = (pause.clone(), paused.clone(), stop.clone());
                thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (w as u64 + 7);
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if pause.load(Ordering::SeqCst) {
                            paused.fetch_add(1, Ordering::SeqCst);
                            while pause.load(Ordering::SeqCst) {
                                thread::yield_now();
                            }
                            paused.fetch_sub(1, Ordering::SeqCst);
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        seq += 1;
                        let page = (x as usize >> 8) % pages;
                        let stamp = ((w as u64) << 56) | seq;
                        for off in (0..PAGE).step_by(8) {
                            // SAFETY: inside the mapping, which outlives the writers.
                            unsafe {
                                ((base + page * PAGE + off) as *mut u64).write_volatile(stamp)
                            };
                        }
                        if !pace.is_zero() {
                            thread::sleep(pace);
                        }
                    }
                    seq
                })
            })
            .collect();
        PausableWriters {
            pause,
            paused,
            stop,
            handles,
        }
    }

    /// Returns once every writer sits between two pages.
    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) as usize != self.handles.len() {
            thread::yield_now();
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Stops the writers; the pages each wrote (panics if one is stuck).
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    }
}

/// Writers write hard while protection is applied ahead of the pause; the
/// snapshot must be exactly the memory at the pause, which the test copies
/// while the writers are paused.
fn pre_armed_snapshot_is_the_pause_instant(bs: usize, writers: usize) {
    pre_armed_exact(64 * MIB, bs, writers, ArmOptions::default(), Duration::ZERO);
}

/// The pre-armed snapshot of `len` bytes (half of them filled, half never
/// touched before the writers) with `writers` writing random pages all
/// along, against the memory copied in the pause: exact, every block once.
fn pre_armed_exact(
    len: usize,
    bs: usize,
    writers: usize,
    opts: ArmOptions,
    sink_delay: Duration,
) -> SnapshotReport {
    let m = Mapping::anon(len);
    fill(&m, 0, len / 2); // the second half is never touched before the writers
    let w = PausableWriters::start(&m, writers);
    thread::sleep(Duration::from_millis(20));
    let pre = prepare_with(&[m.range()], bs, opts)
        .unwrap()
        .pre_arm()
        .unwrap();
    // More writes between arming and the pause (they fault and go on).
    thread::sleep(Duration::from_millis(30));
    w.pause();
    let at_pause = m.bytes().to_vec();
    let armed = pre.arm().unwrap();
    assert_eq!(
        wp_pages(&m),
        len / PAGE,
        "not all memory protected at the pause"
    );
    w.resume();
    let sink = VecSink::new(bs, &[len], sink_delay);
    let report = armed.run(&sink, 2).unwrap();
    let written = w.finish();
    eprintln!("bs={bs} writers={writers} {opts:?}: {report:#?}; pages written {written:?}");
    let pre_arm = report.pre_arm.unwrap();
    assert!(pre_arm.faults > 0, "no write hit the pre-arm window");
    assert!(pre_arm.blocks_reprotected_running + pre_arm.blocks_reprotected_paused > 0);
    sink.assert_each_block_once();
    let image = sink.images[0].lock().unwrap();
    if let Some(p) =
        (0..len / PAGE).find(|&p| image[p * PAGE..][..PAGE] != at_pause[p * PAGE..][..PAGE])
    {
        panic!("page {p} differs from the pause instant");
    }
    assert!(written.iter().all(|&n| n > 0));
    assert_eq!(report.fault_copy_bytes, opts.fault_copy_bytes as u64);
    assert_unprotected(&[&m]);
    report
}

#[test]
fn pre_armed_exact_with_small_blocks() {
    pre_armed_snapshot_is_the_pause_instant(64 * 1024, 2);
}

#[test]
fn pre_armed_exact_with_large_blocks_and_four_writers() {
    pre_armed_snapshot_is_the_pause_instant(MIB, 4);
}

/// Few blocks, many writers and a slow sink: writers fault on page after
/// page of blocks the walkers have not reached, on the same pages as each
/// other, and on blocks a walker holds. Each fault copies only its page
/// and un-protects only that page; the walker completes the block from
/// those copies and the still-protected rest. The image is still exactly
/// the memory at the pause, page by page.
#[test]
fn page_copies_by_faults_are_the_pause_content() {
    let report = pre_armed_exact(
        4 * MIB,
        MIB,
        4,
        ArmOptions::default(),
        Duration::from_millis(30),
    );
    assert!(report.pages_by_faults > 0, "{report:?}");
    assert!(report.blocks_with_fault_pages > 0, "{report:?}");
    assert_eq!(report.blocks_by_faults, 0, "the pool was never full");
    assert!(report.fault_pages_peak <= report.pages_by_faults);
}

/// The same with faults copying aligned runs of 16 KiB.
#[test]
fn run_copies_by_faults_are_the_pause_content() {
    let opts = ArmOptions {
        fault_copy_bytes: 16 * 1024,
        ..ArmOptions::default()
    };
    let report = pre_armed_exact(4 * MIB, MIB, 4, opts, Duration::from_millis(30));
    assert!(report.pages_by_faults > 0, "{report:?}");
    assert_eq!(report.pages_by_faults % 4, 0, "whole runs of 4 pages");
}

/// A pool of two pages: once it is full, a fault copies its whole block
/// (with the pages copied before) and writes it itself. Still exact.
#[test]
fn a_full_page_pool_falls_back_to_whole_blocks() {
    let opts = ArmOptions {
        fault_pool_bytes: 2 * PAGE,
        ..ArmOptions::default()
    };
    let report = pre_armed_exact(8 * MIB, 256 * 1024, 2, opts, Duration::from_millis(5));
    assert!(report.blocks_by_faults > 0, "{report:?}");
    assert!(report.fault_pages_peak <= 2, "{report:?}");
}

#[test]
fn fault_copy_size_is_checked() {
    let m = Mapping::anon(MIB);
    for bad in [0, 1000, 3 * PAGE, 512 * 1024] {
        let opts = ArmOptions {
            fault_copy_bytes: bad,
            ..ArmOptions::default()
        };
        assert!(
            matches!(
                prepare_with(&[m.range()], 256 * 1024, opts),
                Err(SnapshotError::InvalidArgument(_))
            ),
            "fault copy size {bad} accepted"
        );
    }
}

#[test]
fn pre_armed_disarm_and_drop_release_writers() {
    let m = Mapping::anon(16 * MIB);
    fill(&m, 0, 16 * MIB);
    let w = PausableWriters::start(&m, 2);
    let pre = prepare(&[m.range()], 256 * 1024)
        .unwrap()
        .pre_arm()
        .unwrap();
    thread::sleep(Duration::from_millis(20));
    let stats = pre.disarm().unwrap();
    assert!(
        stats.faults > 0 && stats.protect_time > Duration::ZERO,
        "{stats:?}"
    );
    let pre = prepare(&[m.range()], 256 * 1024)
        .unwrap()
        .pre_arm()
        .unwrap();
    thread::sleep(Duration::from_millis(20));
    drop(pre);
    w.finish();
    assert_unprotected(&[&m]);
}

/// Whether this process sees uffd-wp markers in `/proc/self/pagemap` (the
/// swap type and offset are shown only with CAP_SYS_ADMIN).
fn sees_markers() -> bool {
    let m = Mapping::anon(16 * PAGE);
    let armed = arm(&[m.range()], 16 * PAGE).unwrap();
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start(m.ptr as u64 / PAGE as u64 * 8))
        .unwrap();
    let mut e = [0u8; 8];
    f.read_exact(&mut e).unwrap();
    armed.disarm().unwrap();
    u64::from_le_bytes(e) & ((1 << 55) - 1) != 0
}

/// A mostly never-touched memory (blocks fully written, blocks with one
/// written page, blocks only read, blocks never touched), written by
/// writers during the snapshot, including pages of never-touched blocks:
/// the image is the memory at the pause, the never-touched blocks (and only
/// they) reach the sink as zero blocks, unread, and the writers' first writes
/// to them did not leak in.
#[test]
fn never_populated_blocks_are_zeros_and_first_writes_stay_out() {
    if !sees_markers() {
        eprintln!(
            "SKIPPED never_populated_blocks_are_zeros_and_first_writes_stay_out: \
             /proc/self/pagemap hides swap types here (needs CAP_SYS_ADMIN)"
        );
        return;
    }
    let (bs, len) = (256 * 1024, 64 * MIB);
    let m = Mapping::anon(len);
    let blocks = len / bs;
    let mut untouched = Vec::new();
    let mut at_pause = vec![0u8; len];
    let mut put = |p: usize| {
        let page = &mut at_pause[p * PAGE..][..PAGE];
        pattern_page(0, p, page);
        // SAFETY: inside the mapping; no other thread runs yet.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), m.ptr.add(p * PAGE), PAGE) };
    };
    for b in 0..blocks {
        let base = b * bs;
        match b % 8 {
            0 => (0..bs / PAGE).for_each(|p| put(base / PAGE + p)),
            1 => put(base / PAGE + 3),
            // SAFETY: as above; a read maps the shared zero page.
            2 => assert_eq!(unsafe { m.ptr.add(base + 5 * PAGE).read_volatile() }, 0),
            _ => untouched.push((0, b as u64)),
        }
    }
    // The writers start only after the pause: reading the memory to
    // compare would populate it, so the content at the pause is known.
    // They are paced: a fault lets a writer go after copying one page, so
    // flat-out writers would reach every block before the walkers do.
    let w = PausableWriters::start_with(&m, 2, true, Duration::from_millis(1));
    w.pause();
    let pre = prepare(&[m.range()], bs).unwrap().pre_arm().unwrap();
    let armed = pre.arm().unwrap();
    w.resume();
    // A fast sink: paced writers reach some blocks before the walkers do,
    // not all of them (each fault holds a writer for one page's copy only).
    let sink = VecSink::new(bs, &[len], Duration::ZERO);
    let report = armed.run(&sink, 2).unwrap();
    let written = w.finish();
    eprintln!("{report:#?}; pages written {written:?}");
    sink.assert_each_block_once();
    let image = sink.images[0].lock().unwrap();
    if let Some(p) =
        (0..len / PAGE).find(|&p| image[p * PAGE..][..PAGE] != at_pause[p * PAGE..][..PAGE])
    {
        panic!("page {p} differs from the pause instant");
    }
    let mut zeros = sink.zeros.lock().unwrap().clone();
    zeros.sort_unstable();
    assert_eq!(report.blocks_unpopulated, zeros.len() as u64);
    assert!(zeros.len() >= 8, "{} zero blocks", zeros.len());
    // Only never-touched blocks are zero blocks. A never-touched block that
    // is not one was written during the snapshot before a walker took it
    // (a write fault gives the page a fresh zeroed page before the fault
    // thread sees it, so it was copied, as zeros).
    let now = m.bytes();
    let written_now = |b: u64| now[b as usize * bs..][..bs].iter().any(|&x| x != 0);
    for z in &zeros {
        assert!(
            untouched.contains(z),
            "block {z:?} was populated at the pause"
        );
    }
    for &(r, b) in untouched.iter().filter(|u| !zeros.contains(u)) {
        assert!(
            written_now(b),
            "block {b} of range {r}: never touched, not a zero block"
        );
    }
    // The writers' first writes into zero blocks stayed out of the image.
    let first_writes = zeros.iter().filter(|&&(_, b)| written_now(b)).count();
    assert!(first_writes > 0, "no writer wrote a never-touched block");
    assert!(report.pages_by_faults > 0, "no page was copied by a fault");
    assert_unprotected(&[&m]);
}
