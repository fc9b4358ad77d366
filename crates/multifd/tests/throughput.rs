//! Throughput of the file channels (ignored by default; it writes a large
//! file). Run with
//! `cargo test --release -p multifd --test throughput -- --ignored --nocapture`;
//! `MULTIFD_BENCH_MIB` sets the guest size (default 1024) and
//! `MULTIFD_BENCH_DIR` the directory (default the target's tmp dir).

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use common::{direct_io_works, Anon, TestLayout, PAGE};
use multifd::{load_from_file, save_to_file, DirectIo, FileChannelOptions};

fn drop_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid fd; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Raw O_DIRECT sequential writes of `mem` in 4 MiB blocks by `streams` threads.
fn raw_direct_write(path: &Path, mem: &Anon, streams: usize) -> f64 {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let block = 4 << 20;
    let blocks = mem.len / block;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..streams {
            s.spawn(|| loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= blocks {
                    break;
                }
                // SAFETY: the block is inside the mapping.
                let r = unsafe {
                    libc::pwrite(
                        f.as_raw_fd(),
                        mem.ptr.add(b * block).cast(),
                        block,
                        (b * block) as libc::off_t,
                    )
                };
                assert_eq!(r, block as isize);
            });
        }
    });
    mem.len as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Raw O_DIRECT sequential reads into `mem` in 4 MiB blocks by `streams` threads.
fn raw_direct_read(path: &Path, mem: &Anon, streams: usize) -> f64 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let block = 4 << 20;
    let blocks = mem.len / block;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..streams {
            s.spawn(|| loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= blocks {
                    break;
                }
                // SAFETY: the block is inside the mapping.
                let r = unsafe {
                    libc::pread(
                        f.as_raw_fd(),
                        mem.ptr.add(b * block).cast(),
                        block,
                        (b * block) as libc::off_t,
                    )
                };
                assert_eq!(r, block as isize);
            });
        }
    });
    mem.len as f64 / t.elapsed().as_secs_f64() / 1e6
}

#[test]
#[ignore]
fn measure_throughput() {
    let mib: u64 = std::env::var("MULTIFD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = std::env::var("MULTIFD_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf());
    let size = mib << 20;
    let thp = std::env::var("MULTIFD_BENCH_THP").is_ok_and(|v| v == "1");
    let mut mem = Anon::new(size as usize);
    // Every page non-zero (a worst case for the disk), cheap to generate.
    for (i, w) in mem.bytes_mut().chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_le_bytes());
    }
    let path = dir.join(format!("multifd-bench-{}", std::process::id()));
    let direct_ok = direct_io_works(&dir);
    println!(
        "guest {mib} MiB, all pages present, load targets {}, file {} ({}), {} CPUs",
        if thp { "MADV_HUGEPAGE" } else { "4 KiB pages" },
        path.display(),
        if direct_ok {
            "O_DIRECT works"
        } else {
            "no O_DIRECT"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if direct_ok {
        let layout = TestLayout::new(&[size]);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(layout.file_len).unwrap();
        for s in [1, 2, 4] {
            println!(
                "raw O_DIRECT write, 4 MiB blocks, {s} streams: {:.0} MB/s",
                raw_direct_write(&path, &mem, s)
            );
        }
        for s in [1, 2, 4] {
            let target = Anon::new(size as usize);
            if thp {
                // SAFETY: advice on our own mapping.
                unsafe { libc::madvise(target.ptr.cast(), target.len, libc::MADV_HUGEPAGE) };
            }
            println!(
                "raw O_DIRECT read into fresh memory, 4 MiB blocks, {s} streams: {:.0} MB/s",
                raw_direct_read(&path, &target, s)
            );
        }
    }
    for direct in [DirectIo::Off, DirectIo::On] {
        if direct == DirectIo::On && !direct_ok {
            continue;
        }
        for ch in [1, 2, 4] {
            let layout = TestLayout::new(&[size]);
            let _ = std::fs::remove_file(&path);
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(layout.file_len).unwrap();
            drop(f);
            let opts = FileChannelOptions {
                channels: ch,
                direct_io: direct,
                prefault: true,
            };
            let regions = [mem.region(0)];
            let t = Instant::now();
            let s = save_to_file(&path, &regions, &layout, &opts).unwrap();
            let save_mbs = s.mb_per_s();
            drop_cache(&path);
            let with_sync = size as f64 / t.elapsed().as_secs_f64() / 1e6;
            let mut loads = Vec::new();
            for populate in [false, true] {
                let target = Anon::new(size as usize);
                if thp {
                    // SAFETY: advice on our own mapping.
                    unsafe { libc::madvise(target.ptr.cast(), target.len, libc::MADV_HUGEPAGE) };
                }
                drop_cache(&path);
                let opts = FileChannelOptions {
                    prefault: populate,
                    ..opts.clone()
                };
                let l = load_from_file(&path, &[target.region(0)], &layout, &opts).unwrap();
                assert_eq!(l.present_pages, size / PAGE);
                assert!(target.bytes()[..1 << 20] == mem.bytes()[..1 << 20]);
                loads.push(l.mb_per_s());
            }
            println!(
                "{direct:?} {ch} ch: save {save_mbs:.0} MB/s (with fsync {with_sync:.0}), load {:.0} MB/s without pre-fault, {:.0} MB/s with MADV_POPULATE_WRITE",
                loads[0], loads[1]
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}
