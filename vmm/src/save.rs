//! Saving a VM to a file and loading it back: the VM's device state as
//! migration-stream sections, then its RAM as page records.
//!
//! A save never leaves a file under the target name that would restore
//! wrong: it writes `.<name>.tmp-<pid>` beside the target, fsyncs it, renames
//! it over the target and fsyncs the directory. A failed save removes the
//! temporary file and leaves the VM as it was (running, or paused).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Instant;

use microvm::persist::{
    CmosState, I8042State, MachineState, SerialState, VcpuState, VmSnapshot, VmState,
    CMOS_STATE_VERSION, I8042_STATE_VERSION, MACHINE_STATE_VERSION, SERIAL_STATE_VERSION,
    VCPU_STATE_VERSION, VM_STATE_VERSION,
};
use microvm::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use microvm::{create_guest_memory, GuestMemory, MemoryBacking, RunState, VmController};
use migration_stream::{RamRegion, Record, StreamError, StreamReader, StreamWriter};
use serde::{Deserialize, Serialize};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Stream buffer size.
const IO_BUFFER: usize = 1 << 20;

/// Section names in a saved stream.
pub mod sections {
    /// [`microvm::persist::MachineState`], always first.
    pub const MACHINE: &str = "machine";
    /// [`microvm::persist::VmState`].
    pub const KVM_VM: &str = "kvm-vm";
    /// [`microvm::persist::VcpuState`], instance = vCPU index.
    pub const VCPU: &str = "vcpu";
    /// [`microvm::persist::SerialState`].
    pub const SERIAL: &str = "serial";
    /// [`microvm::persist::I8042State`].
    pub const I8042: &str = "i8042";
    /// [`microvm::persist::CmosState`].
    pub const CMOS: &str = "cmos";
}

/// The image formats `save` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SaveFormat {
    /// A sequential migration stream (docs/stream-format.md).
    #[default]
    Stream,
}

/// What a save did.
#[derive(Clone, Debug, Serialize)]
pub struct SaveStats {
    /// Target file.
    pub path: PathBuf,
    /// File size.
    pub bytes: u64,
    /// Bytes of device state (all sections).
    pub device_state_bytes: u64,
    /// Non-zero pages written.
    pub ram_pages: u64,
    /// Zero pages (recorded, not written).
    pub zero_pages: u64,
    /// Time the VM was paused for the save, in milliseconds.
    pub paused_ms: f64,
    /// Total time, in milliseconds.
    pub total_ms: f64,
}

/// Why a save or load failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The VM could not be paused or its state read.
    #[error("capturing VM state: {0}")]
    Vm(#[from] microvm::Error),
    /// The target could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stream writer failed.
    #[error("writing {path}: {source}")]
    Stream {
        /// File.
        path: PathBuf,
        /// Why.
        source: StreamError,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid saved VM.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SaveError {
    /// The API error kind for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            SaveError::Write { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                "bad-request"
            }
            SaveError::Write { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                "bad-request"
            }
            _ => "failed",
        }
    }
}

fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cryo-save".into());
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Pauses the VM, writes it to `path`, and resumes it when `keep_running`
/// (the caller ends it otherwise). On failure the VM is resumed if it was running.
pub fn save_vm(
    controller: &VmController,
    path: &Path,
    format: SaveFormat,
    keep_running: bool,
) -> Result<SaveStats, SaveError> {
    let SaveFormat::Stream = format;
    let start = Instant::now();
    let (snapshot, memory, was_running) = controller.call(|vm| {
        let was_running = vm.state() == RunState::Running;
        vm.pause()?;
        match vm.save_state() {
            Ok(s) => Ok((s, vm.memory().clone(), was_running)),
            Err(e) => {
                if was_running {
                    let _ = vm.resume();
                }
                Err(e)
            }
        }
    })??;
    let written = write_stream_file(path, &snapshot, &memory);
    let paused_ms = start.elapsed().as_secs_f64() * 1000.0;
    if (written.is_err() || keep_running) && was_running {
        controller.resume()?;
    }
    let w = written?;
    Ok(SaveStats {
        path: path.to_owned(),
        bytes: w.bytes,
        device_state_bytes: w.device_state_bytes,
        ram_pages: w.ram_pages,
        zero_pages: w.zero_pages,
        paused_ms,
        total_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Sizes of a written stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    /// File size.
    pub bytes: u64,
    /// Device-state section records.
    pub device_state_bytes: u64,
    /// Non-zero pages stored.
    pub ram_pages: u64,
    /// Zero pages recorded.
    pub zero_pages: u64,
}

/// Writes the snapshot and memory as a stream to `path` (atomically: temp
/// file, fsync, rename, directory fsync).
pub fn write_stream_file(
    path: &Path,
    snapshot: &VmSnapshot,
    memory: &GuestMemory,
) -> Result<Written, SaveError> {
    let tmp = temp_path(path);
    let werr = |source| SaveError::Write {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(werr)?;
    let result = write_stream(file, path, snapshot, memory).and_then(|(file, stats)| {
        file.sync_all().map_err(werr)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(werr)?;
        sync_dir(path).map_err(werr)?;
        Ok(stats)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn write_stream(
    file: File,
    path: &Path,
    snapshot: &VmSnapshot,
    memory: &GuestMemory,
) -> Result<(File, Written), SaveError> {
    let serr = |source| SaveError::Stream {
        path: path.to_owned(),
        source,
    };
    let mut w = StreamWriter::new(BufWriter::with_capacity(IO_BUFFER, file), PAGE_SIZE as u32)
        .map_err(serr)?;
    let before = w.bytes_written();
    w.write_section(
        sections::MACHINE,
        0,
        MACHINE_STATE_VERSION,
        &snapshot.machine,
    )
    .map_err(serr)?;
    w.write_section(sections::KVM_VM, 0, VM_STATE_VERSION, &snapshot.vm)
        .map_err(serr)?;
    for (i, v) in snapshot.vcpus.iter().enumerate() {
        w.write_section(sections::VCPU, i as u32, VCPU_STATE_VERSION, v)
            .map_err(serr)?;
    }
    w.write_section(sections::SERIAL, 0, SERIAL_STATE_VERSION, &snapshot.serial)
        .map_err(serr)?;
    w.write_section(sections::I8042, 0, I8042_STATE_VERSION, &snapshot.i8042)
        .map_err(serr)?;
    w.write_section(sections::CMOS, 0, CMOS_STATE_VERSION, &snapshot.cmos)
        .map_err(serr)?;
    let device_bytes = w.bytes_written() - before;

    let layout: Vec<RamRegion> = memory
        .iter()
        .map(|r| RamRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
        })
        .collect();
    w.write_ram_layout(&layout).map_err(serr)?;
    let (mut ram_pages, mut zero_pages) = (0u64, 0u64);
    for (index, region) in memory.iter().enumerate() {
        let bytes = region_bytes(region);
        let pages = bytes.len() / PAGE_SIZE;
        let mut p = 0;
        while p < pages {
            let zero = is_zero_page(&bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
            let mut q = p + 1;
            while q < pages && is_zero_page(&bytes[q * PAGE_SIZE..(q + 1) * PAGE_SIZE]) == zero {
                q += 1;
            }
            let count = (q - p) as u64;
            if zero {
                w.write_zero_pages(index as u32, p as u64, count)
                    .map_err(serr)?;
                zero_pages += count;
            } else {
                w.write_pages(index as u32, p as u64, &bytes[p * PAGE_SIZE..q * PAGE_SIZE])
                    .map_err(serr)?;
                ram_pages += count;
            }
            p = q;
        }
    }
    let buffered = w.finish().map_err(serr)?;
    let file = buffered.into_inner().map_err(|e| SaveError::Write {
        path: path.to_owned(),
        source: e.into_error(),
    })?;
    let total = file
        .metadata()
        .map_err(|e| SaveError::Write {
            path: path.to_owned(),
            source: e,
        })?
        .len();
    Ok((
        file,
        Written {
            bytes: total,
            device_state_bytes: device_bytes,
            ram_pages,
            zero_pages,
        },
    ))
}

/// The bytes of a guest memory region, for reading while the VM is paused.
fn region_bytes(region: &microvm::GuestRegion) -> &[u8] {
    let len = region.len() as usize;
    let ptr = region.as_ptr();
    // SAFETY: the region is a live mapping of `len` bytes owned by the
    // region, which outlives the returned slice (same lifetime); the vCPUs
    // are paused, so nothing writes it while we read.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Whether a page holds only zero bytes (word-wise scan).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialized bytes as u64 words is valid for
        // any bit pattern; align_to handles the unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Reads a stream file back: the snapshot and a guest memory holding its RAM.
pub fn load_stream_file(path: &Path) -> Result<(VmSnapshot, GuestMemory), SaveError> {
    let invalid = |reason: String| SaveError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|source| SaveError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut r = StreamReader::new(BufReader::with_capacity(IO_BUFFER, file))
        .map_err(|e| invalid(e.to_string()))?;
    if r.page_size() as usize != PAGE_SIZE {
        return Err(invalid(format!(
            "page size {} is not this host's {PAGE_SIZE}",
            r.page_size()
        )));
    }
    let mut machine: Option<MachineState> = None;
    let mut memory: Option<GuestMemory> = None;
    let mut vm: Option<VmState> = None;
    let mut vcpus: Vec<Option<VcpuState>> = Vec::new();
    let mut serial: Option<SerialState> = None;
    let mut i8042: Option<I8042State> = None;
    let mut cmos: Option<CmosState> = None;
    while let Some(record) = r.next_record().map_err(|e| invalid(e.to_string()))? {
        match record {
            Record::Section(s) => {
                let dec = |e: StreamError| invalid(e.to_string());
                if machine.is_none() && s.name != sections::MACHINE {
                    return Err(invalid(format!(
                        "section '{}' comes before the machine section",
                        s.name
                    )));
                }
                match s.name.as_str() {
                    sections::MACHINE => {
                        if machine.is_some() {
                            return Err(invalid("two machine sections".into()));
                        }
                        let m: MachineState = s.decode(MACHINE_STATE_VERSION).map_err(dec)?;
                        let layout = microvm::memory::ram_ranges(m.mem_mib.saturating_mul(1 << 20));
                        let expected: Vec<(u64, u64)> =
                            layout.iter().map(|r| (r.start, r.len)).collect();
                        if m.regions != expected || m.vcpus == 0 {
                            return Err(invalid(format!(
                                "machine section is inconsistent: {} MiB in regions {:x?}, {} vCPUs",
                                m.mem_mib, m.regions, m.vcpus
                            )));
                        }
                        memory = Some(
                            create_guest_memory(m.mem_mib, &MemoryBacking::Anonymous)
                                .map_err(|e| invalid(e.to_string()))?,
                        );
                        vcpus = vec![None; usize::from(m.vcpus)];
                        machine = Some(m);
                    }
                    sections::KVM_VM => vm = Some(s.decode(VM_STATE_VERSION).map_err(dec)?),
                    sections::VCPU => {
                        let count = vcpus.len();
                        let slot = vcpus.get_mut(s.instance as usize).ok_or_else(|| {
                            invalid(format!("vcpu section for vCPU {} of {count}", s.instance))
                        })?;
                        *slot = Some(s.decode(VCPU_STATE_VERSION).map_err(dec)?);
                    }
                    sections::SERIAL => {
                        serial = Some(s.decode(SERIAL_STATE_VERSION).map_err(dec)?)
                    }
                    sections::I8042 => i8042 = Some(s.decode(I8042_STATE_VERSION).map_err(dec)?),
                    sections::CMOS => cmos = Some(s.decode(CMOS_STATE_VERSION).map_err(dec)?),
                    other => {
                        return Err(invalid(format!(
                            "unknown section '{other}' (instance {}, version {}): saved by a newer cryo?",
                            s.instance, s.version
                        )))
                    }
                }
            }
            Record::RamLayout(regions) => {
                let m = machine
                    .as_ref()
                    .ok_or_else(|| invalid("RAM layout before the machine section".into()))?;
                let got: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
                if got != m.regions {
                    return Err(invalid(format!(
                        "RAM layout {got:x?} differs from the machine section's {:x?}",
                        m.regions
                    )));
                }
            }
            Record::Pages(pages) => {
                let mem = memory
                    .as_ref()
                    .ok_or_else(|| invalid("RAM pages before the machine section".into()))?;
                let region = mem.iter().nth(pages.region as usize).ok_or_else(|| {
                    invalid(format!(
                        "pages for region {} that does not exist",
                        pages.region
                    ))
                })?;
                if let migration_stream::PagesKind::Raw(data) = pages.kind {
                    let offset = pages
                        .first_page
                        .checked_mul(PAGE_SIZE as u64)
                        .filter(|o| o.saturating_add(data.len() as u64) <= region.len())
                        .ok_or_else(|| invalid("pages beyond their region".into()))?;
                    let dst = region_bytes_mut(region);
                    dst[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                }
            }
            Record::Sync(_) => {}
            Record::End => {}
        }
    }
    let machine = machine.ok_or_else(|| invalid("no machine section".into()))?;
    let missing = |what: &str| invalid(format!("no {what} section"));
    let vcpus = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| invalid(format!("no vcpu section for vCPU {i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let snapshot = VmSnapshot {
        machine,
        vm: vm.ok_or_else(|| missing(sections::KVM_VM))?,
        vcpus,
        serial: serial.ok_or_else(|| missing(sections::SERIAL))?,
        i8042: i8042.ok_or_else(|| missing(sections::I8042))?,
        cmos: cmos.ok_or_else(|| missing(sections::CMOS))?,
    };
    let memory = memory.ok_or_else(|| invalid("no guest memory".into()))?;
    Ok((snapshot, memory))
}

/// The bytes of a guest memory region, for filling before the VM runs.
#[allow(clippy::mut_from_ref)]
fn region_bytes_mut(region: &microvm::GuestRegion) -> &mut [u8] {
    let len = region.len() as usize;
    let ptr = region.as_ptr();
    // SAFETY: the region is a live mapping of `len` bytes; no vCPU exists
    // yet for this memory and this thread is its only user, so no other
    // reference to these bytes is alive while the slice is used.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}
