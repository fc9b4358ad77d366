//! Tracing for `cryo bench migrate`: where a heartbeat gap of the source
//! guest came from. A sampler thread reads the vCPU threads' scheduler
//! accounting (`/proc/self/task/<tid>/schedstat`: time on a CPU, time
//! runnable but waiting for one) every few ms, stamped with the TSC, so a
//! gap splits into the vCPU running (guest code or KVM work such as page
//! faults), waiting for a CPU (starved by other threads) and neither
//! (blocked or sleeping in the kernel); and the pre-copy's steps
//! (`precopy::Step`) say what cryo was doing meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::bench_snapshot::rdtsc;
use crate::image::precopy::Step;

/// How often the sampler looks.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// One look at every vCPU thread: (tsc, per vCPU (ns on a CPU, ns waiting
/// for one)).
type Sample = (u64, Vec<(u64, u64)>);

/// The vCPU threads of this process (`vcpu<N>`), as (N, tid), sorted.
fn vcpu_threads() -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let n = comm.trim().strip_prefix("vcpu")?.parse().ok()?;
            Some((n, tid))
        })
        .collect();
    out.sort();
    out
}

/// (ns on a CPU, ns runnable and waiting) of thread `tid` of this process.
fn schedstat(tid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut f = s.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// Samples the vCPU threads' scheduler accounting until dropped.
pub(crate) struct Sampler {
    done: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling the vCPU threads there are now.
    pub(crate) fn start() -> Sampler {
        let done = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (d, s) = (done.clone(), samples.clone());
        let threads = vcpu_threads();
        let thread = std::thread::Builder::new()
            .name("bench-sched".into())
            .spawn(move || {
                while !d.load(Ordering::Acquire) {
                    let now = rdtsc();
                    let per: Vec<(u64, u64)> = threads
                        .iter()
                        .map(|(_, tid)| schedstat(tid).unwrap_or_default())
                        .collect();
                    if let Ok(mut v) = s.lock() {
                        v.push((now, per));
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
            .ok();
        Sampler {
            done,
            samples,
            thread,
        }
    }

    /// Stops sampling; the samples taken.
    pub(crate) fn finish(mut self) -> Vec<Sample> {
        self.stop();
        self.samples
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one vCPU thread did over a stretch of time, ms.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub(crate) struct ThreadTime {
    /// The stretch the samples cover (the gap, widened to the samples
    /// around it).
    pub window_ms: f64,
    /// On a CPU: guest code, or KVM's work for it (faults, exits).
    pub ran_ms: f64,
    /// Runnable, waiting for a CPU.
    pub waited_ms: f64,
    /// Neither: blocked or sleeping (the rest of the window).
    pub blocked_ms: f64,
}

/// What vCPU `cpu` did between TSC `from` and `to`, from the samples
/// around that stretch (None: no samples cover it).
pub(crate) fn thread_time(
    samples: &[Sample],
    cpu: usize,
    from: u64,
    to: u64,
    tsc_hz: f64,
) -> Option<ThreadTime> {
    let before = samples.iter().rev().find(|s| s.0 <= from)?;
    let after = samples.iter().find(|s| s.0 >= to)?;
    let (a, b) = (before.1.get(cpu)?, after.1.get(cpu)?);
    let ms = |ns: u64| ns as f64 / 1e6;
    let window_ms = (after.0 - before.0) as f64 / tsc_hz * 1e3;
    let ran_ms = ms(b.0.saturating_sub(a.0));
    let waited_ms = ms(b.1.saturating_sub(a.1));
    Some(ThreadTime {
        window_ms,
        ran_ms,
        waited_ms,
        blocked_ms: (window_ms - ran_ms - waited_ms).max(0.0),
    })
}

/// The pre-copy steps that overlap `[from_ms, to_ms]` (ms after its start),
/// in words: "round 0 (sending a round), 1 (fetching the dirty log)".
pub(crate) fn steps_during(steps: &[Step], from_ms: f64, to_ms: f64) -> String {
    let hit: Vec<String> = steps
        .iter()
        .filter(|s| s.start_ms <= to_ms && s.start_ms + s.ms >= from_ms)
        .map(|s| format!("round {} ({})", s.round, s.kind.describe()))
        .collect();
    if hit.is_empty() {
        "none (before the pre-copy started, or between its steps)".into()
    } else {
        hit.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::precopy::StepKind;

    #[test]
    fn thread_time_splits_a_stretch_by_the_samples_around_it() {
        // tsc at 1 GHz: 1 tick = 1 ns.
        let samples = vec![
            (0, vec![(0, 0)]),
            (10_000_000, vec![(2_000_000, 1_000_000)]),
            (30_000_000, vec![(4_000_000, 15_000_000)]),
        ];
        let t = thread_time(&samples, 0, 10_000_000, 30_000_000, 1e9).unwrap();
        assert_eq!(t.window_ms, 20.0);
        assert_eq!(t.ran_ms, 2.0);
        assert_eq!(t.waited_ms, 14.0);
        assert_eq!(t.blocked_ms, 4.0);
        // Widened to the samples around it; none after: nothing to say.
        assert_eq!(
            thread_time(&samples, 0, 5, 29_000_000, 1e9)
                .unwrap()
                .window_ms,
            30.0
        );
        assert!(thread_time(&samples, 0, 5, 31_000_000, 1e9).is_none());
        assert!(thread_time(&samples, 1, 0, 10, 1e9).is_none());
    }

    #[test]
    fn steps_during_names_the_overlapping_steps() {
        let step = |kind, round, start_ms, ms| Step {
            kind,
            round,
            start_ms,
            ms,
            pages: 0,
        };
        let steps = [
            step(StepKind::Round, 0, 10.0, 100.0),
            step(StepKind::Fetch, 0, 110.0, 5.0),
            step(StepKind::Round, 1, 115.0, 20.0),
        ];
        assert_eq!(
            steps_during(&steps, 105.0, 112.0),
            "round 0 (sending a round), round 0 (fetching the dirty log)"
        );
        assert!(steps_during(&steps, 0.0, 5.0).starts_with("none"));
    }

    #[test]
    fn a_thread_of_this_process_reads_its_schedstat() {
        let tid = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .file_name();
        assert!(schedstat(&tid.to_string_lossy()).is_some());
    }
}
