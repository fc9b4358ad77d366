//! `cryo-workload`: the user-space workload of cryo's Linux test guest.
//!
//! It is the Linux counterpart of the test kernel's ring-3 workload: a
//! guest that proves, from the inside, that a save, restore, migration or
//! snapshot lost nothing.
//!
//! - **Workers** (`--workers N` processes, each `--mib M`): every pass first
//!   verifies each page of the worker's memory against the pattern of the
//!   previous pass, then writes the pattern of this pass. A page that does
//!   not hold what was written is reported with a `MISMATCH` line.
//! - **Heartbeats** (the parent, every `--hb-ms` ms): a line with a sequence
//!   number and the CLOCK_MONOTONIC, CLOCK_REALTIME and CLOCK_BOOTTIME
//!   readings. Each one checks that monotonic time never goes back, that a
//!   sleep never ends early, that across a long gap (a pause, a save) the
//!   realtime and monotonic clocks moved together, that the workers are
//!   alive, and that its files in `--dir` (tmpfs) hold what it wrote.
//!
//! Output lines (one `write` each, so that processes do not interleave
//! within a line) are described in `docs/linux-guest.md`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

/// 4 KiB pages of 512 words.
const WORDS_PER_PAGE: usize = 512;
/// Bytes of one record appended to the log file per heartbeat.
const LOG_RECORD: usize = 64;
/// A gap between heartbeats this many periods long is reported as a pause.
const PAUSE_PERIODS: u64 = 4;
/// Largest difference between the realtime and monotonic gaps across a pause.
const MAX_CLOCK_SKEW_MS: i64 = 1000;
/// Workers print a SWEEP line at most this often.
const SWEEP_REPORT_EVERY: Duration = Duration::from_secs(2);

struct Options {
    workers: u32,
    mib: usize,
    hb_ms: u64,
    dir: PathBuf,
    worker: Option<u32>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        workers: 2,
        mib: 8,
        hb_ms: 500,
        dir: PathBuf::from("/tmp/cryo-workload"),
        worker: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--workers" => o.workers = value.parse().map_err(bad)?,
            "--mib" => o.mib = value.parse().map_err(bad)?,
            "--hb-ms" => o.hb_ms = value.parse().map_err(bad)?,
            "--dir" => o.dir = PathBuf::from(value),
            "--worker" => o.worker = Some(value.parse().map_err(bad)?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if o.hb_ms == 0 || o.mib == 0 {
        return Err("--hb-ms and --mib must be above 0".into());
    }
    Ok(o)
}

/// Prints one whole line with a single write.
fn say(line: String) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// Nanoseconds on `clock`.
fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// The word a worker writes at `word` of `page` in `pass`.
fn pattern(worker: u32, pass: u64, page: usize, word: usize) -> u64 {
    let x = (u64::from(worker) << 56) ^ (pass << 32) ^ ((page as u64) << 9) ^ word as u64;
    // A multiply spreads the fields so that a stale or shifted page differs
    // in many bits, not one.
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pass
}

fn run_worker(worker: u32, mib: usize) -> ExitCode {
    let pages = mib * 256;
    let mut memory = vec![0u64; pages * WORDS_PER_PAGE];
    let mut last_report = Instant::now();
    let mut mismatches = 0u64;
    for pass in 1u64.. {
        for page in 0..pages {
            let words = &mut memory[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE];
            for (word, slot) in words.iter_mut().enumerate() {
                // Volatile, so that the compiler can neither skip the check
                // nor keep the value in a register instead of guest RAM.
                let ptr: *mut u64 = slot;
                if pass > 1 {
                    // SAFETY: `ptr` points into `memory`, which we own.
                    let found = unsafe { std::ptr::read_volatile(ptr) };
                    let expected = pattern(worker, pass - 1, page, word);
                    if found != expected && mismatches < 16 {
                        mismatches += 1;
                        say(format!(
                            "MISMATCH what=memory worker={worker} pass={pass} page={page} word={word} expected={expected:#018x} found={found:#018x}"
                        ));
                    }
                }
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile(ptr, pattern(worker, pass, page, word)) };
            }
        }
        if last_report.elapsed() >= SWEEP_REPORT_EVERY {
            last_report = Instant::now();
            say(format!(
                "SWEEP worker={worker} pass={pass} pages={pages} mismatches={mismatches}"
            ));
        }
    }
    ExitCode::SUCCESS
}

/// The heartbeat's files: a small file rewritten through a rename, and a
/// log that grows by one record per heartbeat.
struct Files {
    dir: PathBuf,
    log: File,
}

impl Files {
    fn open(dir: &Path) -> io::Result<Files> {
        fs::create_dir_all(dir)?;
        let log = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("log"))?;
        Ok(Files {
            dir: dir.to_path_buf(),
            log,
        })
    }

    fn record(seq: u64) -> Vec<u8> {
        let mut r = format!("seq={seq}").into_bytes();
        r.resize(LOG_RECORD - 1, b' ');
        r.push(b'\n');
        r
    }

    /// Checks what the previous heartbeat left, then writes this one's.
    fn beat(&mut self, seq: u64) -> Result<(), String> {
        let last = self.dir.join("last");
        if seq > 1 {
            let text = fs::read_to_string(&last).map_err(|e| format!("read last: {e}"))?;
            if text.trim() != (seq - 1).to_string() {
                return Err(format!(
                    "last holds {:?}, expected {}",
                    text.trim(),
                    seq - 1
                ));
            }
            let len = self.log.metadata().map_err(|e| e.to_string())?.len();
            if len != (seq - 1) * LOG_RECORD as u64 {
                return Err(format!("log is {len} bytes after {} records", seq - 1));
            }
            let mut prev = vec![0u8; LOG_RECORD];
            self.log
                .seek(SeekFrom::Start(len - LOG_RECORD as u64))
                .and_then(|_| self.log.read_exact(&mut prev))
                .map_err(|e| format!("read log: {e}"))?;
            if prev != Self::record(seq - 1) {
                return Err("log record differs".into());
            }
        }
        let tmp = self.dir.join("last.tmp");
        let mut f = File::create(&tmp).map_err(|e| format!("create: {e}"))?;
        f.write_all(seq.to_string().as_bytes())
            .and_then(|_| f.sync_all())
            .and_then(|_| fs::rename(&tmp, &last))
            .map_err(|e| format!("write last: {e}"))?;
        self.log
            .seek(SeekFrom::End(0))
            .and_then(|_| self.log.write_all(&Self::record(seq)))
            .map_err(|e| format!("append log: {e}"))
    }
}

/// One reading of the three clocks.
#[derive(Clone, Copy)]
struct Clocks {
    mono: i128,
    real: i128,
    boot: i128,
}

impl Clocks {
    fn now() -> Clocks {
        Clocks {
            mono: clock_ns(libc::CLOCK_MONOTONIC),
            real: clock_ns(libc::CLOCK_REALTIME),
            boot: clock_ns(libc::CLOCK_BOOTTIME),
        }
    }
}

/// Checks one heartbeat's clocks against the previous ones.
fn check_clocks(seq: u64, prev: Clocks, now: Clocks, hb_ms: u64) {
    let mono_gap_ms = (now.mono - prev.mono) / 1_000_000;
    let real_gap_ms = (now.real - prev.real) / 1_000_000;
    if now.mono < prev.mono {
        say(format!(
            "MISMATCH what=monotonic-backwards seq={seq} prev_ns={} now_ns={}",
            prev.mono, now.mono
        ));
    }
    if now.real < prev.real {
        say(format!(
            "MISMATCH what=realtime-backwards seq={seq} prev_ns={} now_ns={}",
            prev.real, now.real
        ));
    }
    if mono_gap_ms < i128::from(hb_ms) {
        say(format!(
            "MISMATCH what=timer-early seq={seq} slept_ms={mono_gap_ms} asked_ms={hb_ms}"
        ));
    }
    if mono_gap_ms >= i128::from(PAUSE_PERIODS * hb_ms) {
        say(format!(
            "PAUSE seq={seq} mono_gap_ms={mono_gap_ms} real_gap_ms={real_gap_ms} boot_gap_ms={}",
            (now.boot - prev.boot) / 1_000_000
        ));
        if (real_gap_ms - mono_gap_ms).abs() > i128::from(MAX_CLOCK_SKEW_MS) {
            say(format!(
                "MISMATCH what=clock-skew seq={seq} mono_gap_ms={mono_gap_ms} real_gap_ms={real_gap_ms}"
            ));
        }
    }
}

fn run_parent(o: &Options) -> ExitCode {
    say(format!(
        "WORKLOAD start workers={} mib={} hb_ms={} pid={}",
        o.workers,
        o.mib,
        o.hb_ms,
        std::process::id()
    ));
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut workers: Vec<(u32, Option<Child>)> = Vec::new();
    for k in 0..o.workers {
        let child = Command::new(&exe)
            .args(["--worker", &k.to_string(), "--mib", &o.mib.to_string()])
            .spawn();
        match child {
            Ok(c) => workers.push((k, Some(c))),
            Err(e) => say(format!("MISMATCH what=worker-spawn worker={k} error={e}")),
        }
    }
    let mut files = match Files::open(&o.dir) {
        Ok(f) => Some(f),
        Err(e) => {
            say(format!("MISMATCH what=file-open error={e}"));
            None
        }
    };
    let period = Duration::from_millis(o.hb_ms);
    let mut prev = Clocks::now();
    for seq in 1u64.. {
        std::thread::sleep(period);
        let now = Clocks::now();
        check_clocks(seq, prev, now, o.hb_ms);
        prev = now;
        let file = match files.as_mut().map(|f| f.beat(seq)) {
            Some(Ok(())) => "ok".to_string(),
            Some(Err(e)) => {
                say(format!("MISMATCH what=file seq={seq} error={e}"));
                "bad".to_string()
            }
            None => "none".to_string(),
        };
        let mut alive = 0;
        for (k, slot) in workers.iter_mut() {
            if let Some(child) = slot {
                match child.try_wait() {
                    Ok(None) => alive += 1,
                    Ok(Some(status)) => {
                        say(format!(
                            "MISMATCH what=worker-exited worker={k} status={status}"
                        ));
                        *slot = None;
                    }
                    Err(e) => say(format!("MISMATCH what=worker-wait worker={k} error={e}")),
                }
            }
        }
        say(format!(
            "HB seq={seq} mono_ns={} real_ns={} boot_ns={} workers={alive}/{} file={file}",
            now.mono, now.real, now.boot, o.workers
        ));
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(o) => match o.worker {
            Some(k) => run_worker(k, o.mib),
            None => run_parent(&o),
        },
        Err(e) => {
            eprintln!("cryo-workload: {e}");
            ExitCode::from(2)
        }
    }
}
