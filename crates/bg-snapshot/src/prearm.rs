//! Protecting ahead of the writers' pause ("pre-arming"), so that the pause
//! re-protects only the blocks written since, not all of memory.
//!
//! [`Prepared::pre_arm`] starts a fault thread, then write-protects every
//! range while the writers run. A writer that hits a protected block is let
//! go at once: the fault thread un-protects the whole block and marks it
//! written (nothing is copied: the snapshot instant is still to come). A few
//! rounds re-protect the blocks written so far, each round shorter than the
//! last. In the pause, [`PreArmed::arm`] stops the fault thread and
//! re-protects the blocks written since the last round: from then on every
//! block is protected, with the content it has at the pause.
//!
//! Why the result is exact: a block is un-protected before the pause only by
//! the fault thread, which marks it written *after* its un-protect; a round
//! (or the pause) takes the marks first and re-protects after. So every
//! un-protect is followed by a re-protect, and the pause's re-protect comes
//! after the last un-protect (the fault thread has stopped). A block whose
//! protection was never lifted since it was applied has not changed since.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crate::blocks::{BlockSet, Blocks};
use crate::engine::{protect, protect_all, Armed, FaultCopy, Prepared, Protection};
use crate::report::PreArmStats;
use crate::sys::{self, Uffd, UffdMsg, Waker};
use crate::{MemRange, SnapshotError};

/// Re-protect rounds while the writers run, at most.
const MAX_ROUNDS: u32 = 4;
/// No further round once a round had at most this many blocks to re-protect.
const FEW_BLOCKS: usize = 32;
/// How long the fault thread waits in `poll` before checking for stop (it is
/// woken at once by its eventfd; this is a safety net).
const POLL_MS: libc::c_int = 100;

/// Ranges write-protected while their writers run, with a fault thread that
/// lets writers through and remembers what they wrote. [`arm`](Self::arm)
/// it in the writers' pause, or [`disarm`](Self::disarm) it. Dropping it
/// stops the fault thread and removes all protection.
#[derive(Debug)]
pub struct PreArmed {
    // Declared first: dropped (stopped) before the protection is released.
    server: Server,
    prot: Protection,
    ranges: Vec<MemRange>,
    block_size: usize,
    wp_unpopulated: bool,
    features: u64,
    skip: Vec<bool>,
    fault: FaultCopy,
    blocks: Arc<Blocks>,
    written: Arc<BlockSet>,
    stats: PreArmStats,
}

impl Prepared {
    /// Write-protects every range while the writers still run (the expensive
    /// part of arming, which grows with memory), serving their faults by
    /// un-protecting the block and remembering it; then re-protects the
    /// remembered blocks in a few rounds. Call [`PreArmed::arm`] in the
    /// writers' pause: that instant is the snapshot's.
    pub fn pre_arm(self) -> Result<PreArmed, SnapshotError> {
        let blocks = Arc::new(Blocks::new(&self.ranges, self.block_size));
        let written = Arc::new(BlockSet::new(blocks.total()));
        let server = Server::start(
            self.prot.shared_uffd()?,
            blocks.clone(),
            written.clone(),
            self.fault.run,
        )?;
        let mut pre = PreArmed {
            server,
            prot: self.prot,
            ranges: self.ranges,
            block_size: self.block_size,
            wp_unpopulated: self.wp_unpopulated,
            features: self.features,
            skip: self.skip,
            fault: self.fault,
            blocks,
            written,
            stats: PreArmStats::default(),
        };
        let start = Instant::now();
        // On error `pre` drops: the fault thread stops and protection goes.
        protect_all(pre.prot.uffd()?, &pre.ranges, pre.block_size)?;
        pre.stats.protect_time = start.elapsed();
        pre.converge()?;
        Ok(pre)
    }
}

impl PreArmed {
    /// Re-protects the blocks written so far, in rounds while each round
    /// has fewer blocks than the one before, so that few are left for the pause.
    fn converge(&mut self) -> Result<(), SnapshotError> {
        let mut last = usize::MAX;
        for _ in 0..MAX_ROUNDS {
            self.server.check()?;
            let written = self.written.take();
            if written.is_empty() {
                break;
            }
            protect(self.prot.uffd()?, &self.blocks.spans(&written))?;
            self.stats.rounds += 1;
            self.stats.blocks_reprotected_running += written.len() as u64;
            if written.len() <= FEW_BLOCKS || written.len() >= last {
                break;
            }
            last = written.len();
        }
        Ok(())
    }

    /// Completes the arming (call with the writers paused: from this instant,
    /// the snapshot is the memory as it is now): stops the fault thread and
    /// re-protects the blocks written since the last round.
    pub fn arm(mut self) -> Result<Armed, SnapshotError> {
        let start = Instant::now();
        self.stats.faults = self.server.stop()?;
        self.stats.stop_time = start.elapsed();
        let written = self.written.take();
        protect(self.prot.uffd()?, &self.blocks.spans(&written))?;
        self.stats.blocks_reprotected_paused = written.len() as u64;
        let arm_time = start.elapsed();
        self.stats.reprotect_time = arm_time.saturating_sub(self.stats.stop_time);
        Ok(Armed {
            prot: self.prot,
            ranges: self.ranges,
            block_size: self.block_size,
            arm_time,
            wp_unpopulated: self.wp_unpopulated,
            features: self.features,
            skip: self.skip,
            fault: self.fault,
            cancel: Arc::new(AtomicBool::new(false)),
            pre_arm: Some(self.stats),
        })
    }

    /// Drops the snapshot: stops the fault thread and removes all protection.
    /// Returns what happened until now (a run of this alone measures what
    /// protection and one fault per written block cost the writers).
    pub fn disarm(mut self) -> Result<PreArmStats, SnapshotError> {
        let served = self.server.stop();
        let released = self.prot.release();
        self.stats.faults = served?;
        released?;
        Ok(self.stats)
    }

    /// What protecting ahead of the pause has done so far (faults are
    /// counted once the fault thread stops).
    pub fn stats(&self) -> PreArmStats {
        self.stats
    }
}

/// The fault thread before the pause.
#[derive(Debug)]
struct Server {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<Result<u64, SnapshotError>>>,
}

impl Server {
    fn start(
        uffd: Arc<Uffd>,
        blocks: Arc<Blocks>,
        written: Arc<BlockSet>,
        run: usize,
    ) -> Result<Server, SnapshotError> {
        let waker = Arc::new(Waker::new().map_err(|e| SnapshotError::io("eventfd", e))?);
        let stop = Arc::new(AtomicBool::new(false));
        let serving = Serving {
            uffd,
            blocks,
            written,
            run,
            stop: stop.clone(),
            waker: waker.clone(),
        };
        let thread = thread::Builder::new()
            .name("bg-snap-prearm".into())
            .spawn(move || serving.serve())
            .map_err(|e| SnapshotError::io("spawning the pre-arm fault thread", e))?;
        Ok(Server {
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// An error if the thread has already ended (it ends only on error).
    fn check(&mut self) -> Result<(), SnapshotError> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            self.stop()?;
            return Err(SnapshotError::UnexpectedEvent(
                "the pre-arm fault thread ended early".into(),
            ));
        }
        Ok(())
    }

    /// Stops the thread; the faults it served, or its error.
    fn stop(&mut self) -> Result<u64, SnapshotError> {
        let Some(t) = self.thread.take() else {
            return Err(SnapshotError::UnexpectedEvent(
                "the pre-arm fault thread was already stopped".into(),
            ));
        };
        self.stop.store(true, Ordering::SeqCst);
        let woken = self.waker.wake();
        let joined = t.join().unwrap_or_else(|_| {
            Err(SnapshotError::UnexpectedEvent(
                "the pre-arm fault thread panicked".into(),
            ))
        });
        match (joined, woken) {
            (Ok(_), Err(e)) => Err(SnapshotError::io("waking the pre-arm fault thread", e)),
            (r, _) => r,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What the pre-arm fault thread works with.
struct Serving {
    uffd: Arc<Uffd>,
    blocks: Arc<Blocks>,
    written: Arc<BlockSet>,
    /// Bytes un-protected per fault: the aligned run holding the faulting
    /// page, as the snapshot's faults do ([`ArmOptions::fault_copy_bytes`](crate::ArmOptions::fault_copy_bytes)).
    run: usize,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Serving {
    /// Serves write faults until `stop`: un-protects the faulting block, then
    /// marks it written. Returns the number of faults served. On error it
    /// un-protects everything before returning, so no writer is left waiting.
    fn serve(&self) -> Result<u64, SnapshotError> {
        let result = self.serve_loop();
        if result.is_err() {
            for r in self.blocks.ranges() {
                let _ = self.uffd.writeprotect(r.addr(), r.len(), false);
            }
        }
        result
    }

    fn serve_loop(&self) -> Result<u64, SnapshotError> {
        let Serving {
            uffd,
            blocks,
            written,
            run,
            stop,
            waker,
        } = self;
        let mut msgs = [UffdMsg::default(); 64];
        let mut faults = 0;
        let page = sys::page_size();
        while !stop.load(Ordering::SeqCst) {
            let ready = uffd
                .poll_or(Some(waker), POLL_MS)
                .map_err(|e| SnapshotError::io("poll on the userfaultfd", e))?;
            if !ready {
                continue;
            }
            let n = uffd
                .read_msgs(&mut msgs)
                .map_err(|e| SnapshotError::io("reading the userfaultfd", e))?;
            for m in &msgs[..n] {
                let addr = usize::try_from(m.address).unwrap_or(usize::MAX);
                let block = if m.event == sys::EVENT_PAGEFAULT {
                    blocks.block_of(addr)
                } else {
                    None
                };
                let Some(g) = block else {
                    // Not a fault on our ranges (a WP-only registration gives no
                    // other): make sure nobody is left waiting on it.
                    uffd.wake(addr & !(page - 1), page)
                        .map_err(|e| SnapshotError::io("UFFDIO_WAKE", e))?;
                    continue;
                };
                let (start, len) = blocks.run_at(g, addr, *run);
                // Un-protect, then mark: whoever takes the mark re-protects
                // the whole block after.
                uffd.writeprotect(start, len, false)
                    .map_err(|e| SnapshotError::io("UFFDIO_WRITEPROTECT (un-protect run)", e))?;
                written.mark(g);
                faults += 1;
            }
        }
        Ok(faults)
    }
}
