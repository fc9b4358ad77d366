//! The MMIO transport and virtio-blk driven as a guest driver would, with
//! well-behaved and hostile requests.

use std::path::PathBuf;

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::block::{check_identity, Block, DiskConfig, DiskError, SECTOR_SIZE};
use super::state::MmioTransportState;
use super::MmioTransport;
use crate::memory::{anonymous_memory, GuestMemory, RamRange};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const NEEDS_RESET: u32 = 64;

struct TempDisk(PathBuf);

impl TempDisk {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("microvm-virtio-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        TempDisk(p)
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A guest driver over a transport: queue `q` has its descriptor table,
/// available and used rings at `DESC`, `AVAIL`, `USED` + `q * QUEUE_STRIDE`.
struct Driver {
    t: MmioTransport,
    mem: GuestMemory,
    irq: EventFd,
    queues: usize,
    /// The next available-ring index of each queue.
    next_avail: Vec<u16>,
}

/// Distance between the ring areas of consecutive queues.
const QUEUE_STRIDE: u64 = 0x3000;

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    fn new(disk: &TempDisk, read_only: bool) -> Self {
        let dev = Block::open(DiskConfig {
            path: disk.0.clone(),
            read_only,
            direct: false,
        })
        .unwrap();
        Driver::with_device(Box::new(dev))
    }

    /// A driver that has brought `dev` up, all its queues ready.
    fn with_device(dev: Box<dyn super::VirtioDevice>) -> Self {
        let queues = dev.queue_max_sizes().len();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev, irq.try_clone().unwrap()).unwrap();
        let mem = anonymous_memory(&[RamRange {
            start: 0,
            len: 1 << 20,
        }])
        .unwrap();
        let mut d = Driver {
            t,
            mem,
            irq,
            queues,
            next_avail: vec![0; queues],
        };
        d.bring_up();
        d
    }

    fn bring_up(&mut self) {
        let t = &mut self.t;
        assert_eq!(r32(t, 0), 0x7472_6976);
        assert_eq!(r32(t, 4), 2);
        w32(t, 0x70, 1);
        w32(t, 0x70, 3);
        w32(t, 0x14, 1);
        let high = r32(t, 0x10);
        w32(t, 0x14, 0);
        let low = r32(t, 0x10);
        w32(t, 0x24, 1);
        w32(t, 0x20, high);
        w32(t, 0x24, 0);
        w32(t, 0x20, low);
        w32(t, 0x70, 0xb);
        assert_eq!(r32(t, 0x70), 0xb, "FEATURES_OK must stick");
        for q in 0..self.queues {
            let shift = q as u64 * QUEUE_STRIDE;
            w32(t, 0x30, q as u32);
            assert_eq!(r32(t, 0x34), 256);
            w32(t, 0x38, u32::from(QSIZE));
            w32(t, 0x80, (DESC + shift) as u32);
            w32(t, 0x84, 0);
            w32(t, 0x90, (AVAIL + shift) as u32);
            w32(t, 0x94, 0);
            w32(t, 0xa0, (USED + shift) as u32);
            w32(t, 0xa4, 0);
            w32(t, 0x44, 1);
        }
        w32(t, 0x70, 0xf);
        assert!(t.is_running());
    }

    /// Writes descriptors `descs` (addr, len, flags; chained in order from
    /// index `first`), publishes the head and serves the queue.
    fn submit_at(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        self.submit_on(0, first, descs);
    }

    /// [`Driver::submit_at`] on queue `q`.
    fn submit_on(&mut self, q: usize, first: u16, descs: &[(u64, u32, u16)]) {
        let shift = q as u64 * QUEUE_STRIDE;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let next = if i + 1 < descs.len() { idx + 1 } else { 0 };
            let flags = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                flags
            };
            let base = GuestAddress(DESC + shift + u64::from(idx) * 16);
            self.mem.write_obj(addr, base).unwrap();
            self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
        }
        let slot = u64::from(self.next_avail[q] % QSIZE);
        self.mem
            .write_obj(first, GuestAddress(AVAIL + shift + 4 + slot * 2))
            .unwrap();
        self.next_avail[q] = self.next_avail[q].wrapping_add(1);
        self.publish_on(q, self.next_avail[q]);
    }

    fn publish(&mut self, avail_idx: u16) {
        self.publish_on(0, avail_idx);
    }

    /// Sets queue `q`'s available index and serves the queue.
    fn publish_on(&mut self, q: usize, avail_idx: u16) {
        let shift = q as u64 * QUEUE_STRIDE;
        self.mem
            .write_obj(avail_idx, GuestAddress(AVAIL + shift + 2))
            .unwrap();
        self.t.process_queue(q, &self.mem);
    }

    /// Queue `q`'s used index and the length of used entry `n`.
    fn used_on(&self, q: usize, n: u16) -> (u16, u32) {
        let base = USED + q as u64 * QUEUE_STRIDE;
        let idx = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
        let slot = u64::from(n % QSIZE);
        let len = self
            .mem
            .read_obj(GuestAddress(base + 4 + slot * 8 + 4))
            .unwrap();
        (idx, len)
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// A request of `kind` at `sector` with `data` bytes at 0x10000 (data
    /// descriptor writable for reads); returns the status byte.
    fn request(&mut self, kind: u32, sector: u64, data_len: u32) -> u8 {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(0x8000)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(0x9000)).unwrap();
        let data_flags = if kind == 1 { 0 } else { F_WRITE };
        let mut descs = vec![(0x8000, 16, 0)];
        if data_len > 0 {
            descs.push((0x10000, data_len, data_flags));
        }
        descs.push((0x9000, 1, F_WRITE));
        self.submit_at(0, &descs);
        self.mem.read_obj(GuestAddress(0x9000)).unwrap()
    }

    fn needs_reset(&mut self) -> bool {
        r32(&mut self.t, 0x70) & NEEDS_RESET != 0
    }
}

fn disk_bytes() -> Vec<u8> {
    (0..8 * SECTOR_SIZE as usize)
        .map(|i| (i / 512) as u8)
        .collect()
}

mod net;

#[test]
fn blk_write_read_flush_and_id() {
    let disk = TempDisk::new("rw", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    assert_eq!(r32(&mut d.t, 8), 2, "block device");
    // Capacity in config space.
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);

    d.mem
        .write_slice(&[0xab; 1024], GuestAddress(0x10000))
        .unwrap();
    assert_eq!(d.request(1, 2, 1024), 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.irq.read().unwrap(), 1);
    assert_eq!(r32(&mut d.t, 0x60), 1);
    w32(&mut d.t, 0x64, 1);
    assert_eq!(r32(&mut d.t, 0x60), 0);
    let on_disk = std::fs::read(&disk.0).unwrap();
    assert!(on_disk[1024..2048].iter().all(|b| *b == 0xab));
    assert_eq!(on_disk[512], 1);

    d.mem
        .write_slice(&[0; 1536], GuestAddress(0x10000))
        .unwrap();
    assert_eq!(d.request(0, 1, 1536), 0);
    let mut back = [0u8; 1536];
    d.mem.read_slice(&mut back, GuestAddress(0x10000)).unwrap();
    assert!(back[..512].iter().all(|b| *b == 1));
    assert!(back[512..].iter().all(|b| *b == 0xab));

    assert_eq!(d.request(4, 0, 0), 0, "flush");
    assert_eq!(d.request(8, 0, 20), 0, "get id");
    let mut id = [0u8; 5];
    d.mem.read_slice(&mut id, GuestAddress(0x10000)).unwrap();
    assert_eq!(&id, b"cryo-");
    assert_eq!(d.request(99, 0, 0), 2, "unsupported");
    assert_eq!(d.request(0, 0, 0), 0, "a read of nothing");
    assert!(!d.needs_reset());
}

#[test]
fn blk_writes_during_a_disk_copy_leave_the_copy_at_its_start() {
    let mib = super::disk_copy::COPY_CHUNK as usize;
    // 32 MiB: the background copy, in order from the start, is still far
    // from the last chunks when the guest writes there.
    let before: Vec<u8> = (0..32 * mib).map(|i| (i / 4096) as u8).collect();
    let disk = TempDisk::new("copy-disk", &before);
    let copy_file = TempDisk::new("copy-target", &[]);
    let dev = Block::open(DiskConfig {
        path: disk.0.clone(),
        read_only: false,
        direct: false,
    })
    .unwrap();
    let source = dev.copy_source();
    let mut d = Driver::with_device(Box::new(dev));
    let target = std::fs::OpenOptions::new()
        .write(true)
        .open(&copy_file.0)
        .unwrap();
    let copy = source.start(target).unwrap();
    // Guest writes while the copy runs, into each chunk.
    d.mem
        .write_slice(&[0x5a; 4096], GuestAddress(0x10000))
        .unwrap();
    for sector in [8u64, 2048 + 16, 4096 + 24] {
        assert_eq!(d.request(1, sector, 4096), 0);
    }
    copy.finish().unwrap();
    assert_eq!(std::fs::read(&copy_file.0).unwrap(), before);
    let after = std::fs::read(&disk.0).unwrap();
    assert!(after[(4096 + 24) * 512..][..4096]
        .iter()
        .all(|b| *b == 0x5a));
    // Copy mode ended: later writes go to the disk alone.
    assert_eq!(d.request(1, 0, 4096), 0);
    assert_eq!(std::fs::read(&copy_file.0).unwrap(), before);
}

#[test]
fn blk_read_only_refuses_writes() {
    let disk = TempDisk::new("ro", &disk_bytes());
    let mut d = Driver::new(&disk, true);
    w32(&mut d.t, 0x14, 0);
    assert_ne!(r32(&mut d.t, 0x10) & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    d.mem
        .write_slice(&[0xcd; 512], GuestAddress(0x10000))
        .unwrap();
    assert_eq!(d.request(1, 0, 512), 1);
    assert_eq!(std::fs::read(&disk.0).unwrap(), disk_bytes());
    assert_eq!(d.request(0, 0, 512), 0, "reads still work");
}

#[test]
fn blk_request_past_the_end_is_an_io_error() {
    let disk = TempDisk::new("end", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    assert_eq!(d.request(0, 7, 1024), 1);
    assert_eq!(d.request(1, u64::MAX / 2, 512), 1);
    assert!(!d.needs_reset());
}

#[test]
fn hostile_descriptor_outside_guest_memory_needs_reset() {
    let disk = TempDisk::new("oob", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    d.submit_at(
        0,
        &[
            (0x8000, 16, 0),
            (0x10_0000_0000, 512, F_WRITE),
            (0x9000, 1, F_WRITE),
        ],
    );
    assert!(d.needs_reset());
    assert_eq!(r32(&mut d.t, 0x60) & 2, 2, "configuration-change interrupt");
    // A stopped device ignores the queue until reset.
    d.request(0, 0, 512);
    assert_eq!(d.used_idx(), 0);
    // Reset and bring-up make it work again.
    w32(&mut d.t, 0x70, 0);
    d.next_avail[0] = 0;
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    d.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    d.bring_up();
    assert_eq!(d.request(0, 0, 512), 0);
}

#[test]
fn hostile_avail_index_out_of_range_needs_reset() {
    let disk = TempDisk::new("idx", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    d.publish(QSIZE + 5);
    assert!(d.needs_reset());
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn hostile_chain_loop_and_bad_next_need_reset() {
    let disk = TempDisk::new("loop", &disk_bytes());
    // Descriptor 0 points at itself (the chain never ends), then at an
    // index beyond the queue.
    for next in [0u16, 500] {
        let mut d = Driver::new(&disk, false);
        d.mem.write_obj(0x8000u64, GuestAddress(DESC)).unwrap();
        d.mem.write_obj(16u32, GuestAddress(DESC + 8)).unwrap();
        d.mem.write_obj(F_NEXT, GuestAddress(DESC + 12)).unwrap();
        d.mem.write_obj(next, GuestAddress(DESC + 14)).unwrap();
        d.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        d.publish(1);
        assert!(d.needs_reset(), "next {next}");
    }

    // A head index beyond the queue.
    let mut d = Driver::new(&disk, false);
    d.mem.write_obj(900u16, GuestAddress(AVAIL + 4)).unwrap();
    d.publish(1);
    assert!(d.needs_reset());
}

#[test]
fn hostile_rings_outside_memory_need_reset() {
    let disk = TempDisk::new("ring", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    w32(&mut d.t, 0x44, 0);
    w32(&mut d.t, 0x90, 0xffff_f000);
    w32(&mut d.t, 0x94, 0xffff);
    w32(&mut d.t, 0x44, 1);
    d.t.process_queue(0, &d.mem);
    assert!(d.needs_reset());
}

#[test]
fn legacy_driver_does_not_get_features_ok() {
    let disk = TempDisk::new("legacy", &disk_bytes());
    let dev = Block::open(DiskConfig::parse(disk.0.to_str().unwrap()).unwrap()).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), irq).unwrap();
    w32(&mut t, 0x70, 3);
    w32(&mut t, 0x24, 0);
    w32(&mut t, 0x20, 1 << 9);
    w32(&mut t, 0x70, 0xb);
    assert_eq!(r32(&mut t, 0x70) & 8, 0);
    // Unaligned and odd-sized accesses are ignored, not fatal.
    t.write(0x70, &[0xff]);
    let mut b = [0u8; 2];
    t.read(0x0, &mut b);
    assert_eq!(b, [0, 0]);
    t.read(0x1000_0000, &mut [0u8; 8]);
    // Notifying a queue that does not exist does nothing.
    w32(&mut t, 0x50, 7);
}

#[test]
fn transport_state_survives_save_and_restore() {
    let disk = TempDisk::new("state", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    assert_eq!(d.request(0, 0, 512), 0);
    let saved = d.t.state();
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let decoded: MmioTransportState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, saved);

    let dev = Block::open(DiskConfig::parse(disk.0.to_str().unwrap()).unwrap()).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), irq).unwrap();
    t.restore(&decoded).unwrap();
    assert_eq!(t.state(), saved);
    d.t = t;
    // The restored device serves the next request where the old one stopped.
    assert_eq!(d.request(0, 1, 512), 0);
    assert_eq!(d.used_idx(), 2);

    let mut wrong = saved.clone();
    wrong.device_type = 1;
    assert!(d.t.restore(&wrong).is_err());
    let mut wrong = saved.clone();
    wrong.queues[0].size = 3; // not a power of two
    assert!(d.t.restore(&wrong).is_err());
    let mut wrong = saved;
    wrong.acked_features |= 1 << 60;
    assert!(d.t.restore(&wrong).is_err());
}

#[test]
fn disk_identity_detects_missing_and_changed_disks() {
    let disk = TempDisk::new("ident", &disk_bytes());
    let dev = Block::open(DiskConfig::parse(disk.0.to_str().unwrap()).unwrap()).unwrap();
    let id = dev.identity().unwrap();
    assert_eq!(id.size, 8 * SECTOR_SIZE);
    check_identity(&id, false).unwrap();

    // Same size and times, other content (mtime restored by hand).
    let mut changed = id.clone();
    changed.content_crc ^= 1;
    assert!(matches!(
        check_identity(&changed, false),
        Err(DiskError::Changed { .. })
    ));
    check_identity(&changed, true).unwrap();

    let mut bigger = id.clone();
    bigger.size += 512;
    let e = check_identity(&bigger, false).unwrap_err().to_string();
    assert!(e.contains("size"), "{e}");
    assert!(e.contains("--disk-changed-ok"), "{e}");

    std::fs::write(&disk.0, [1u8; 4096]).unwrap();
    let e = check_identity(&id, false).unwrap_err();
    assert!(matches!(e, DiskError::Changed { .. }), "{e}");

    let mut missing = id;
    missing.path.push_str("-gone");
    assert!(matches!(
        check_identity(&missing, true),
        Err(DiskError::Open { .. })
    ));
}

#[test]
fn disk_options_parse() {
    let c = DiskConfig::parse("/d.raw,ro,direct").unwrap();
    assert!(c.read_only && c.direct);
    assert!(DiskConfig::parse("").is_err());
    assert_eq!(
        DiskConfig::parse("/d,rw"),
        Err(super::block::DiskOptionError::UnknownOption("rw".into()))
    );
}

/// A small deterministic generator for the randomized tests.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_registers_and_rings_never_panic() {
    let disk = TempDisk::new("random", &disk_bytes());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..200 {
        let mut d = Driver::new(&disk, round % 3 == 0);
        // Scribble over the descriptor table, the rings and the buffers.
        for _ in 0..64 {
            let addr = DESC + rng.next() % 0x9000;
            d.mem
                .write_obj(rng.next(), GuestAddress(addr & !7))
                .unwrap();
        }
        for _ in 0..32 {
            let offset = match rng.next() % 4 {
                0 => 0x50,
                1 => 0x70,
                _ => (rng.next() % 0x110) & !3,
            };
            let v = match rng.next() % 3 {
                0 => rng.next() as u32 % 4,
                1 => 0xffff_ffff,
                _ => rng.next() as u32,
            };
            w32(&mut d.t, offset, v);
            let _ = r32(&mut d.t, (rng.next() % 0x120) & !3);
            d.t.process_queue((rng.next() % 3) as usize, &d.mem);
        }
        d.publish((rng.next() % 0x1_0000) as u16);
        // The disk never grows or shrinks, whatever the guest asked.
        assert_eq!(std::fs::metadata(&disk.0).unwrap().len(), 8 * SECTOR_SIZE);
    }
}

#[test]
fn random_state_bytes_never_panic_the_decoder() {
    let disk = TempDisk::new("random-state", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    let good = postcard::to_stdvec(&d.t.state()).unwrap();
    let mut rng = XorShift(42);
    for _ in 0..2000 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % bytes.len();
            bytes[i] = rng.next() as u8;
        }
        if let Ok(state) = postcard::from_bytes::<MmioTransportState>(&bytes) {
            // Decoded but hostile: restoring it must fail cleanly or work.
            let _ = d.t.restore(&state);
            d.t.process_queue(0, &d.mem);
        }
    }
}

/// Pages the VMM wrote while observed.
#[derive(Default)]
struct WrittenPages(std::sync::Mutex<std::collections::BTreeSet<u64>>);

impl crate::memory::WriteObserver for WrittenPages {
    fn wrote(&self, addr: u64, len: u64) {
        let mut pages = self.0.lock().unwrap();
        pages.extend((addr >> 12)..=((addr + len - 1) >> 12));
    }
}

/// What dirty tracking of device writes relies on: a read request's data,
/// its status byte and the used ring, all written by the device, reach the
/// memory's write observer; a held device (a paused VM) writes nothing.
#[test]
fn blk_device_writes_reach_the_write_observer_and_a_held_device_writes_none() {
    let disk = TempDisk::new("observed", &disk_bytes());
    let mut d = Driver::new(&disk, false);
    let seen = std::sync::Arc::new(WrittenPages::default());
    crate::memory::observe_writes(&d.mem, Some(seen.clone()));
    // 3 KiB from sector 1 into page 0x10.
    assert_eq!(d.request(0, 1, 6 * 512), 0);
    let pages = seen.0.lock().unwrap().clone();
    for page in [0x10, 0x9, USED >> 12] {
        assert!(pages.contains(&page), "page {page:#x} not seen: {pages:x?}");
    }
    assert!(!pages.contains(&0x11), "{pages:x?}");

    // Held: a notification serves nothing and writes nothing.
    d.t.hold(true);
    seen.0.lock().unwrap().clear();
    d.mem.write_obj(0u8, GuestAddress(0x9000)).unwrap();
    d.request(0, 0, 512);
    let pages = seen.0.lock().unwrap().clone();
    assert!(
        !pages.contains(&(USED >> 12)) && !pages.contains(&0x10),
        "{pages:x?}"
    );
    assert_eq!(d.used_idx(), 1, "nothing served while held");
    crate::memory::observe_writes(&d.mem, None);
}
