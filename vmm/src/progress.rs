//! Progress of long operations (save, snapshot, restore): shared counters
//! that the workers advance and that the API and the CLI read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Progress of one operation.
#[derive(Debug)]
pub struct Progress {
    operation: &'static str,
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
    started: Instant,
    migration: Mutex<Option<MigrationProgress>>,
}

/// Where a live migration stands (in [`ProgressInfo::migration`]).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// The round under way (0 = the first pass over all RAM).
    pub round: u32,
    /// How fast the guest dirtied memory during the last round, MB/s.
    pub dirty_rate_mb_s: f64,
    /// Dirty bytes still to send.
    pub remaining_bytes: u64,
    /// The pause those bytes would take at the measured bandwidth, ms.
    pub expected_downtime_ms: f64,
    /// The auto-converge throttle, percent of the vCPUs' time held paused.
    pub throttle_percent: u32,
}

/// A point-in-time copy of [`Progress`], as the API reports it (and as the
/// CLI reads it back from progress events).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressInfo {
    /// "save", "snapshot", "managed-save", "restore".
    pub operation: String,
    /// What is happening now, e.g. "pausing", "writing", "committing".
    pub phase: String,
    /// Bytes of guest RAM processed so far.
    pub bytes_done: u64,
    /// Bytes of guest RAM in all.
    pub bytes_total: u64,
    /// Seconds since the operation started.
    pub elapsed_s: f64,
    /// Average throughput so far, MB/s (10^6 bytes).
    pub throughput_mb_s: f64,
    /// Estimated seconds left at that throughput (null when unknown).
    pub eta_s: Option<f64>,
    /// A live migration's rounds (absent for other operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}

impl Progress {
    /// A new operation of `total` bytes.
    pub fn new(operation: &'static str, total: u64) -> Progress {
        Progress {
            operation,
            phase: Mutex::new("starting"),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            started: Instant::now(),
            migration: Mutex::new(None),
        }
    }

    /// Enters a phase.
    pub fn phase(&self, phase: &'static str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    /// Sets the total.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Records where a live migration stands.
    pub fn set_migration(&self, m: MigrationProgress) {
        if let Ok(mut g) = self.migration.lock() {
            *g = Some(m);
        }
    }

    /// Counts `bytes` more as done.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The current state.
    pub fn info(&self) -> ProgressInfo {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = (rate > 0.0 && total >= done).then(|| (total - done) as f64 / rate);
        ProgressInfo {
            operation: self.operation.to_string(),
            phase: self
                .phase
                .lock()
                .map(|p| *p)
                .unwrap_or("unknown")
                .to_string(),
            bytes_done: done,
            bytes_total: total,
            elapsed_s: elapsed,
            throughput_mb_s: rate / 1e6,
            eta_s: eta,
            migration: self.migration.lock().ok().and_then(|m| *m),
        }
    }
}

/// Shows progress on stderr while an operation runs in this process: a bar
/// when stderr is a terminal, a plain line every second otherwise.
pub struct Display {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

impl Display {
    /// A display for `what`.
    pub fn new(what: &str, total: u64) -> Display {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        Display {
            bar,
            last_line: Instant::now(),
        }
    }

    /// Shows `info`.
    pub fn update(&mut self, info: &ProgressInfo) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(info.bytes_total);
                bar.set_position(info.bytes_done);
                bar.set_message(info.phase.clone());
            }
            None => {
                if self.last_line.elapsed().as_secs_f64() >= 1.0 {
                    self.last_line = Instant::now();
                    eprintln!("{}", plain_line(info));
                }
            }
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One line of progress for logs and non-terminals.
pub fn plain_line(info: &ProgressInfo) -> String {
    let mib = |b: u64| b >> 20;
    let eta = info
        .eta_s
        .map(|e| format!(", ETA {e:.1} s"))
        .unwrap_or_default();
    format!(
        "cryo: {} {}: {}/{} MiB, {:.0} MB/s{eta}",
        info.operation,
        info.phase,
        mib(info.bytes_done),
        mib(info.bytes_total),
        info.throughput_mb_s
    )
}
