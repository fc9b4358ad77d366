//! Measures a snapshot of 256 MiB of anonymous memory while 2 threads keep
//! writing random pages: `cargo run --release -p bg-snapshot --example latency`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use bg_snapshot::{arm, BlockSink, MemRange, SinkError};

struct VecSink(Mutex<Vec<u8>>, usize);

impl BlockSink for VecSink {
    fn block_size(&self) -> usize {
        self.1
    }
    fn write_block(&self, _range: usize, block: u64, data: &[u8]) -> Result<(), SinkError> {
        let off = block as usize * self.1;
        let mut img = self.0.lock().map_err(|_| "poisoned")?;
        img[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let len = 256usize << 20;
    for &bs in &[64usize << 10, 1 << 20] {
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let base = ptr as usize;
        // SAFETY: inside the mapping; half of it is touched, half never.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0x11, len / 2) };
        // SAFETY: the mapping stays until after the snapshot and the writers.
        let range = unsafe { MemRange::new(ptr.cast(), len) };
        // A pre-touched image, so that the sink's own page faults are not measured.
        let sink = VecSink(Mutex::new(vec![0x55u8; len]), bs);
        let armed = arm(&[range], bs)?;
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (stop, writes) = (stop.clone(), writes.clone());
                thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 + w;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = (x as usize >> 8) % (len / 4096);
                        // SAFETY: inside the mapping.
                        unsafe { ((base + page * 4096) as *mut u64).write_volatile(x) };
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let report = armed.run(&sink, 2)?;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            let _ = w.join();
        }
        println!("block size {} KiB: {report:#?}", bs >> 10);
        // SAFETY: unmapping what was mapped above; nobody uses it any more.
        unsafe { libc::munmap(ptr, len) };
    }
    Ok(())
}
