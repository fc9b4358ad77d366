//! Dirty logging under real KVM, with the test kernel as the oracle: in fill
//! mode each vCPU writes every data page of its share once, prints `FILLED`
//! with the page count, and halts. The bitmap must show exactly those pages
//! in the pool, and nothing once the guest is quiet.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use cryo_tests::{num, test_kernel, workdir};
use dirty_log::{DirtyBitmap, DirtyLog, PAGE_SIZE};
use microvm::{BootSource, MemoryBacking, MicroVm, SerialOutput, VmConfig};

const MIB: u64 = 1 << 20;
const MEM_MIB: u64 = 64;
const VCPUS: u8 = 2;
const SHARE_MIB: u64 = 8;

/// Reads the serial log until every vCPU printed FILLED; returns the pool
/// size in MiB and each vCPU's data page count.
fn wait_filled(log: &Path, timeout: Duration) -> (u64, Vec<u64>) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
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
