//! Dirty logging under real KVM, with the test kernel as the oracle: in fill
//! mode each vCPU writes every data page of its share once, prints `FILLED`
//! with the page count, and halts. The bitmap must show exactly those pages
//! in the pool, and nothing once the guest is quiet. With its disk reader
//! (`cryo.blk`) the device writes guest memory all the time: those pages
//! show only through the VMM's own bitmap, never in KVM's.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryo_tests::blk_reader::{write_reader_disk, BlkReport};
use cryo_tests::{field, num, test_kernel, workdir};
use dirty_log::{DirtyBitmap, DirtyLog, VmmDirty, PAGE_SIZE};
use microvm::devices::virtio::block::DiskConfig;
use microvm::{
    observe_writes, BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig, VmController,
    WriteObserver,
};

const MIB: u64 = 1 << 20;
const MEM_MIB: u64 = 64;
const VCPUS: u8 = 2;
const SHARE_MIB: u64 = 8;

/// The serial log's whole lines (the guest may be writing the last one).
fn whole_lines(log: &Path) -> String {
    let mut text = std::fs::read_to_string(log).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    text
}

/// Reads the serial log until every vCPU printed FILLED; returns the pool
/// size in MiB and each vCPU's data page count.
fn wait_filled(log: &Path, timeout: Duration) -> (u64, Vec<u64>) {
    let start = Instant::now();
    loop {
        let text = whole_lines(log);
        let mut pool = None;
        let mut pages = vec![None; usize::from(VCPUS)];
        for line in BufReader::new(text.as_bytes())
            .lines()
            .map_while(Result::ok)
        {
            assert!(
                !line.starts_with("PANIC") && !line.starts_with("ERROR"),
                "guest failed: {line}\n{text}"
            );
            if line.starts_with("pool_mib=") {
                pool = num(&line, "pool_mib");
            }
            if line.starts_with("FILLED") {
                let cpu = num(&line, "cpu").expect("cpu") as usize;
                pages[cpu] = num(&line, "pages");
            }
        }
        if let (Some(pool), true) = (pool, pages.iter().all(Option::is_some)) {
            return (pool, pages.into_iter().flatten().collect());
        }
        assert!(start.elapsed() < timeout, "no FILLED in time\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Dirty pages of `maps` in guest-physical `[lo, hi)`.
fn dirty_in(maps: &[DirtyBitmap], lo: u64, hi: u64) -> u64 {
    maps.iter()
        .flat_map(|m| m.iter_dirty().map(|p| m.guest_phys_addr() + p * PAGE_SIZE))
        .filter(|a| (lo..hi).contains(a))
        .count() as u64
}

#[test]
fn bitmap_matches_the_pages_the_guest_wrote() {
    let dir = workdir("dirty-log");
    let serial = dir.join("serial.log");
    let mut vm = MicroVm::new(VmConfig {
        vcpus: VCPUS,
        mem_mib: MEM_MIB,
        backing: MemoryBacking::Anonymous,
        boot: BootSource {
            kernel: test_kernel().to_path_buf(),
            cmdline: format!("cryo.mem={SHARE_MIB} cryo.mode=fill cryo.hb_ms=60000"),
            ..Default::default()
        },
        serial: SerialOutput::File(std::fs::File::create(&serial).expect("serial log")),
        serial_input: false,
        disks: Vec::new(),
        nets: Vec::new(),
    })
    .expect("build the VM");
    let slots = vm.memory_slots().expect("slots");
    // SAFETY: the VM's own slots as registered; `vm` owns their mappings
    // and outlives the log.
    let mut log = unsafe { DirtyLog::start(vm.vm_fd(), &slots) }.expect("start dirty logging");
    vm.start().expect("start the VM");
    let (pool_mib, pages) = wait_filled(&serial, Duration::from_secs(60));
    let maps = log.fetch_and_clear(vm.vm_fd()).expect("fetch");

    // The pool is the top of RAM (one region below 3 GiB), shares back to back.
    let pool = (MEM_MIB - pool_mib) * MIB;
    let share = SHARE_MIB * MIB;
    for (cpu, &data_pages) in pages.iter().enumerate() {
        let end = pool + (cpu as u64 + 1) * share;
        let data = end - data_pages * PAGE_SIZE;
        assert_eq!(
            dirty_in(&maps, data, end),
            data_pages,
            "cpu {cpu}: every data page it filled is dirty"
        );
    }
    let used_end = pool + u64::from(VCPUS) * share;
    assert_eq!(
        dirty_in(&maps, used_end, MEM_MIB * MIB),
        0,
        "the pool past the shares was never written"
    );

    // Every vCPU has halted: the pool stays clean from now on.
    std::thread::sleep(Duration::from_millis(200));
    let quiet = log.fetch_and_clear(vm.vm_fd()).expect("fetch again");
    assert_eq!(dirty_in(&quiet, pool, MEM_MIB * MIB), 0, "cleared");

    // The VMM's own writes join the guest's.
    log.vmm_writes().mark(used_end + 3 * PAGE_SIZE, 1);
    let marked = log.fetch_and_clear(vm.vm_fd()).expect("fetch marked");
    assert_eq!(dirty_in(&marked, pool, MEM_MIB * MIB), 1);

    log.stop(vm.vm_fd()).expect("stop dirty logging");
    assert!(vm
        .vm_fd()
        .get_dirty_log(slots[0].slot, slots[0].memory_size as usize)
        .is_err());
    vm.shutdown();
}

/// Device writes marked in the log's VMM bitmap (as `cryo` does).
struct DeviceWrites(VmmDirty);

impl WriteObserver for DeviceWrites {
    fn wrote(&self, addr: u64, len: u64) {
        self.0.mark(addr, len);
    }
}

/// The reader's area base (from `BLK ready`) and its latest read count.
fn reader_state(log: &Path) -> (Option<u64>, u64) {
    let text = whole_lines(log);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("MISMATCH") || l.starts_with("ERROR")),
        "{text}"
    );
    let base = text
        .lines()
        .find(|l| l.starts_with("BLK ready"))
        .and_then(|l| field(l, "base"))
        .and_then(|b| u64::from_str_radix(b.trim_start_matches("0x"), 16).ok());
    let reads = text
        .lines()
        .rev()
        .find_map(BlkReport::parse)
        .map_or(0, |r| r.reads);
    (base, reads)
}

/// Waits until the reader has read `reads` blocks; returns its area base.
fn wait_reads(log: &Path, reads: u64) -> u64 {
    let start = Instant::now();
    loop {
        if let (Some(base), n) = reader_state(log) {
            if n >= reads {
                return base;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "reader stalled");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fetches (merging) until `enough` holds of the merged maps or the
/// reader has read `reads` more blocks; returns the merged maps.
fn watch_log(
    c: &VmController,
    log: &mut Option<DirtyLog>,
    serial: &Path,
    reads: u64,
    enough: impl Fn(&[DirtyBitmap]) -> bool,
) -> Vec<DirtyBitmap> {
    let fetch = |log: &mut Option<DirtyLog>| {
        let mut l = log.take().expect("log");
        let (l, maps) = c
            .call(move |vm| {
                let m = l.fetch_and_clear(vm.vm_fd());
                (l, m)
            })
            .expect("call");
        *log = Some(l);
        maps.expect("fetch")
    };
    let _ = fetch(log);
    let target = reader_state(serial).1 + reads;
    let mut all = fetch(log);
    while !enough(&all) && reader_state(serial).1 < target {
        std::thread::sleep(Duration::from_millis(20));
        for (a, b) in all.iter_mut().zip(fetch(log)) {
            a.merge(&b);
        }
    }
    all
}

#[test]
fn device_writes_show_only_through_the_vmm_bitmap() {
    const SLOTS: u64 = 64;
    let dir = workdir("dirty-log-dev");
    let disk = dir.join("reader.raw");
    write_reader_disk(&disk, 256);
    let serial = dir.join("serial.log");
    let mut vm = MicroVm::new(VmConfig {
        vcpus: 1,
        mem_mib: 64,
        backing: MemoryBacking::Anonymous,
        boot: BootSource {
            kernel: test_kernel().to_path_buf(),
            cmdline: format!("cryo.mem=4 cryo.hb_ms=100 cryo.blk={SLOTS}"),
            ..Default::default()
        },
        serial: SerialOutput::File(std::fs::File::create(&serial).expect("serial log")),
        serial_input: false,
        disks: vec![DiskConfig {
            path: disk,
            read_only: true,
            direct: false,
        }],
        nets: Vec::new(),
    })
    .expect("build the VM");
    let c = vm.controller().expect("controller");
    let runner = std::thread::spawn(move || vm.run(Vec::new()));
    let base = wait_reads(&serial, SLOTS);
    let (state, slots) = (base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE);
    let slots_end = slots + SLOTS * PAGE_SIZE;
    let mut log = Some(
        c.call(|vm| {
            let slots = vm.memory_slots().expect("slots");
            // SAFETY: the VM's own slots as registered; the VM owns their
            // mappings and outlives the log (stopped below).
            unsafe { DirtyLog::start(vm.vm_fd(), &slots) }.expect("start")
        })
        .expect("call"),
    );

    // KVM's log alone, over two whole passes of the reader (the device
    // wrote every slot twice): the vCPU's slot table, but not the slots.
    // KVM was once seen to report 3 of the 64 slots here (under heavy
    // load): pages the guest only reads, probably mapped writable on a read
    // fault by this shadow-paging (PVM) host, which KVM logs as a write.
    // Harmless for a copy (one page too many), so only "most are missed"
    // is asserted.
    let kvm_only = watch_log(&c, &mut log, &serial, 2 * SLOTS, |_| false);
    assert_eq!(dirty_in(&kvm_only, state, state + PAGE_SIZE), 1);
    let seen_by_kvm = dirty_in(&kvm_only, slots, slots_end);
    eprintln!("KVM's log alone reported {seen_by_kvm} of {SLOTS} slots the device wrote");
    assert!(
        seen_by_kvm < SLOTS / 2,
        "KVM's log reported {seen_by_kvm} slots"
    );

    // With the device writes observed: every slot the reader filled.
    let writes = log.as_ref().expect("log").vmm_writes();
    c.call(move |vm| observe_writes(vm.memory(), Some(Arc::new(DeviceWrites(writes)))))
        .expect("call");
    let all = |m: &[DirtyBitmap]| dirty_in(m, slots, slots_end) == SLOTS;
    let observed = watch_log(&c, &mut log, &serial, 2 * SLOTS, all);
    assert_eq!(dirty_in(&observed, slots, slots_end), SLOTS);

    let log = log.take().expect("log");
    c.call(move |vm| {
        observe_writes(vm.memory(), None);
        log.stop(vm.vm_fd())
    })
    .expect("call")
    .expect("stop dirty logging");
    c.stop().expect("stop the VM");
    let _ = runner.join();
    let _ = std::fs::remove_dir_all(&dir);
}
