//! What a finished snapshot reports.

use std::time::Duration;

/// Distribution of fault latencies: from reading a write-protect fault event to
/// the un-protect that lets the writer continue (the copy is in between).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyStats {
    /// Number of samples (faults that copied pages or a block).
    pub count: u64,
    /// Smallest latency.
    pub min: Duration,
    /// Median latency.
    pub median: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Largest latency.
    pub max: Duration,
}

impl LatencyStats {
    pub(crate) fn from_samples(samples: &mut [Duration]) -> LatencyStats {
        if samples.is_empty() {
            return LatencyStats::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let at =
            |q_num: usize, q_den: usize| samples[((n * q_num).div_ceil(q_den)).clamp(1, n) - 1];
        LatencyStats {
            count: n as u64,
            min: samples[0],
            median: at(1, 2),
            p99: at(99, 100),
            max: samples[n - 1],
        }
    }
}

/// What protecting ahead of the writers' pause did
/// ([`Prepared::pre_arm`](crate::Prepared::pre_arm), then
/// [`PreArmed::arm`](crate::PreArmed::arm) in the pause).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreArmStats {
    /// Write-protecting every range while the writers ran.
    pub protect_time: Duration,
    /// Write-protect faults served before the pause (each un-protected one
    /// block and marked it written).
    pub faults: u64,
    /// Rounds that re-protected written blocks while the writers still ran.
    pub rounds: u32,
    /// Blocks re-protected in those rounds.
    pub blocks_reprotected_running: u64,
    /// Blocks re-protected in the pause (written since the last round).
    pub blocks_reprotected_paused: u64,
    /// In the pause: stopping the pre-arm fault thread.
    pub stop_time: Duration,
    /// In the pause: re-protecting the written blocks.
    pub reprotect_time: Duration,
}

/// What [`Armed::run`](crate::Armed::run) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Blocks copied by walker threads straight from protected memory.
    pub blocks_by_walkers: u64,
    /// Blocks the fault thread copied whole because a writer hit them while
    /// the pool of page copies was full (it then writes them to the sink
    /// itself); every other block is completed by a walker.
    pub blocks_by_faults: u64,
    /// Pages the fault thread copied (their T0 content) before
    /// un-protecting them for a writer, in runs of `fault_copy_bytes`;
    /// their blocks' walkers take these copies instead of memory.
    pub pages_by_faults: u64,
    /// Blocks a walker completed with page copies made by faults.
    pub blocks_with_fault_pages: u64,
    /// Most page copies held at once, waiting for their blocks' walkers.
    pub fault_pages_peak: u64,
    /// Bytes each fault copied and un-protected (`ArmOptions::fault_copy_bytes`).
    pub fault_copy_bytes: u64,
    /// Bytes given to the sink (the sum of all ranges' lengths).
    pub bytes: u64,
    /// Write-protect fault events read from the userfaultfd (including those
    /// for blocks already claimed, see the next two fields).
    pub faults: u64,
    /// Faults on a block a walker (or an earlier fault) had already claimed:
    /// the writer is woken by that claimer's un-protect.
    pub faults_on_claimed: u64,
    /// Faults on a block already copied: walkers leave the blocks they
    /// copy protected, so this is a writer's first write to such a block
    /// (or a race with an un-protect); answered by un-protecting the block.
    pub faults_on_done: u64,
    /// Faults on a run of pages copied and un-protected already (a second
    /// writer's event for it): answered by un-protecting it again, never by
    /// a second copy.
    pub faults_on_copied: u64,
    /// Blocks recorded as zeros without being read because they were never
    /// populated (private anonymous memory whose pages the writers had
    /// never touched at T0), found by the walkers and counted in
    /// `blocks_by_walkers` too.
    pub blocks_unpopulated: u64,
    /// Latency of the faults that copied something (a run of pages, or a
    /// block when the page pool was full).
    pub fault_latency: LatencyStats,
    /// Time `run` took, from its start to all protection removed.
    pub run_time: Duration,
    /// Time `arm` took (the writers' pause must cover it).
    pub arm_time: Duration,
    /// Whether `UFFD_FEATURE_WP_UNPOPULATED` protected never-touched memory
    /// (false: every page was pre-touched at arm time instead).
    pub wp_unpopulated: bool,
    /// What protecting ahead of the pause did, when it was used.
    pub pre_arm: Option<PreArmStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let s = LatencyStats::from_samples(&mut v);
        assert_eq!(s.count, 100);
        assert_eq!(s.min, Duration::from_micros(1));
        assert_eq!(s.median, Duration::from_micros(50));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        assert_eq!(LatencyStats::from_samples(&mut []), LatencyStats::default());
        let mut one = [Duration::from_micros(5)];
        assert_eq!(
            LatencyStats::from_samples(&mut one).p99,
            Duration::from_micros(5)
        );
    }
}
