//! virtio-blk backed by a raw file: read, write, flush (fdatasync), get-id;
//! read-only disks refuse writes. Requests run to completion when the
//! driver notifies the queue, so the device never holds a request in
//! flight between two notifications (a save sees a quiet disk).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::disk_copy::{CopyHook, CopySource};
use super::state::DiskIdentity;
use super::{ChainReader, ChainWriter, VirtioDevice, VirtioError};
use crate::memory::GuestMemory;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request the device announces.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of the request header (type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Bytes hashed at each end of the disk for its fingerprint.
const FINGERPRINT_SPAN: u64 = 1 << 20;
/// Bounce buffer size: requests are copied through it in pieces this big.
const CHUNK: usize = 128 * 1024;

/// A bounce buffer aligned for O_DIRECT.
#[repr(C, align(4096))]
struct Bounce([u8; CHUNK]);

/// A disk as the user asked for it on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Guest may not write.
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

/// Why a `--disk` argument does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskOptionError {
    /// Nothing before the first comma.
    #[error("empty disk path")]
    EmptyPath,
    /// An option other than `ro` and `direct`.
    #[error("unknown disk option '{0}' (expected ro, direct)")]
    UnknownOption(String),
}

impl DiskConfig {
    /// Parses `PATH[,ro][,direct]`.
    pub fn parse(s: &str) -> Result<Self, DiskOptionError> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(DiskOptionError::EmptyPath)?;
        let mut config = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            direct: false,
        };
        for opt in parts {
            match opt {
                "ro" => config.read_only = true,
                "direct" => config.direct = true,
                other => return Err(DiskOptionError::UnknownOption(other.to_string())),
            }
        }
        Ok(config)
    }
}

/// Errors opening or checking a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened or read.
    #[error("disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The disk is not the one the VM was saved with.
    #[error(
        "disk {path} changed since the save: {what} (pass --disk-changed-ok to restore anyway)"
    )]
    Changed {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
}

/// Reads the identity of the file at `path` (size, inode, mtime, CRC32C of
/// its first and last MiB).
pub fn disk_identity(path: &Path) -> Result<DiskIdentity, DiskError> {
    let err = |source| DiskError::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let size = meta.len();
    let mut crc = 0u32;
    let head = size.min(FINGERPRINT_SPAN);
    crc = crc_range(&file, 0, head, crc).map_err(err)?;
    let tail_start = size.saturating_sub(FINGERPRINT_SPAN).max(head);
    crc = crc_range(&file, tail_start, size - tail_start, crc).map_err(err)?;
    Ok(DiskIdentity {
        path: path.to_string_lossy().into_owned(),
        size,
        inode: meta.ino(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        content_crc: crc,
    })
}

fn crc_range(file: &File, start: u64, len: u64, crc: u32) -> std::io::Result<u32> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(crc32c::crc32c_append(crc, &buf))
}

/// Checks that the disk at `saved.path` is the one described by `saved`.
/// A missing disk is always refused; with `changed_ok`, a changed one is
/// accepted with a warning.
pub fn check_identity(saved: &DiskIdentity, changed_ok: bool) -> Result<(), DiskError> {
    let path = PathBuf::from(&saved.path);
    let now = disk_identity(&path)?;
    let what = if now.size != saved.size {
        Some(format!("size was {} bytes, is {}", saved.size, now.size))
    } else if now.inode != saved.inode || now.mtime_ns != saved.mtime_ns {
        Some("inode or modification time differs (the file was replaced or written)".to_string())
    } else if now.content_crc != saved.content_crc {
        Some("content of its first or last MiB differs".to_string())
    } else {
        None
    };
    match what {
        None => Ok(()),
        Some(what) if changed_ok => {
            log::warn!(
                "disk {}: {what}; restoring anyway (--disk-changed-ok)",
                saved.path
            );
            Ok(())
        }
        Some(what) => Err(DiskError::Changed { path, what }),
    }
}

/// A virtio-blk device.
pub struct Block {
    file: Arc<File>,
    copy_hook: Arc<CopyHook>,
    config: DiskConfig,
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    bounce: Box<Bounce>,
    queue_sizes: [u16; 1],
}

impl Block {
    /// Opens the disk. Its size is taken as the guest's disk size, in whole sectors.
    pub fn open(config: DiskConfig) -> Result<Self, DiskError> {
        let err = |source| DiskError::Open {
            path: config.path.clone(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(!config.read_only);
        if config.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&config.path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = format!("cryo-{:x}", meta.ino());
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file: Arc::new(file),
            copy_hook: Arc::default(),
            capacity: meta.len() / SECTOR_SIZE,
            config,
            id,
            bounce: Box::new(Bounce([0; CHUNK])),
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// How the disk was opened.
    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    /// What a point-in-time copy of this disk needs (see [`super::disk_copy`]).
    pub fn copy_source(&self) -> CopySource {
        CopySource {
            disk: Arc::clone(&self.file),
            hook: Arc::clone(&self.copy_hook),
        }
    }

    /// Size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The disk's current identity (read from the file now).
    pub fn identity(&self) -> Result<DiskIdentity, DiskError> {
        let path = std::path::absolute(&self.config.path).map_err(|source| DiskError::Open {
            path: self.config.path.clone(),
            source,
        })?;
        disk_identity(&path)
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) stays 0: not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Serves one request; returns the bytes written into the driver's buffers.
    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let bad = |reason: String| VirtioError::BadChain { head, reason };
        let mut reader =
            Reader::new(mem, chain.clone()).map_err(|e| bad(format!("readable buffers: {e}")))?;
        let mut writer =
            Writer::new(mem, chain).map_err(|e| bad(format!("writable buffers: {e}")))?;
        let mut header = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header)
            .map_err(|_| bad("request header missing or short".into()))?;
        let data_len = writer
            .available_bytes()
            .checked_sub(1)
            .ok_or_else(|| bad("no status byte".into()))?;
        let mut status_writer = writer
            .split_at(data_len)
            .map_err(|e| bad(format!("status byte: {e}")))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        let status = match kind {
            VIRTIO_BLK_T_IN => self.read(sector, &mut writer),
            VIRTIO_BLK_T_OUT => self.write(sector, &mut reader),
            VIRTIO_BLK_T_FLUSH => self.flush(),
            VIRTIO_BLK_T_GET_ID => {
                let n = self.id.len().min(writer.available_bytes());
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => VIRTIO_BLK_S_OK,
                    Err(_) => VIRTIO_BLK_S_IOERR,
                }
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        };
        status_writer
            .write_all(&[status as u8])
            .map_err(|e| bad(format!("status byte: {e}")))?;
        Ok(u32::try_from(writer.bytes_written() + 1).unwrap_or(u32::MAX))
    }

    /// The byte offset of a request of `len` bytes at `sector`, if it fits the disk.
    fn offset(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.capacity * SECTOR_SIZE).then_some(start)
    }

    /// Moves a request of `total` bytes at `sector` through the bounce
    /// buffer, one chunk at a time: `step` gets the file, the chunk and its
    /// disk offset. Returns the request's status.
    fn chunked(
        &mut self,
        sector: u64,
        total: usize,
        mut step: impl FnMut(&File, &mut [u8], u64) -> std::io::Result<()>,
    ) -> u32 {
        let Some(mut offset) = self.offset(sector, total) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            if let Err(e) = step(&self.file, &mut self.bounce.0[..n], offset) {
                log::warn!("disk {}: at {offset}: {e}", self.config.path.display());
                return VIRTIO_BLK_S_IOERR;
            }
            offset += n as u64;
            left -= n;
        }
        VIRTIO_BLK_S_OK
    }

    fn read(&mut self, sector: u64, writer: &mut ChainWriter<'_>) -> u32 {
        let total = writer.available_bytes();
        self.chunked(sector, total, |file, buf, offset| {
            file.read_exact_at(buf, offset)?;
            writer.write_all(buf)
        })
    }

    fn write(&mut self, sector: u64, reader: &mut ChainReader<'_>) -> u32 {
        if self.config.read_only {
            return VIRTIO_BLK_S_IOERR;
        }
        let total = reader.available_bytes();
        if let Some(offset) = self.offset(sector, total) {
            // A copy in progress keeps the old contents first.
            self.copy_hook.before_write(offset, total as u64);
        }
        self.chunked(sector, total, |file, buf, offset| {
            reader.read_exact(buf)?;
            file.write_all_at(buf, offset)
        })
    }

    fn flush(&mut self) -> u32 {
        if self.config.read_only {
            return VIRTIO_BLK_S_OK;
        }
        match self.file.sync_data() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("disk {}: fdatasync: {e}", self.config.path.display());
                VIRTIO_BLK_S_IOERR
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if self.config.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_space(&self) -> Vec<u8> {
        self.config_bytes().to_vec()
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, VirtioError> {
        let qerr = |source| VirtioError::Queue {
            queue: index,
            source,
        };
        let mut used = false;
        while let Some(chain) = queue.iter(mem).map_err(qerr)?.next() {
            let head = chain.head_index();
            let len = self.handle(chain, mem)?;
            queue.add_used(mem, head, len).map_err(qerr)?;
            used = true;
        }
        Ok(used)
    }

    fn quiesce(&mut self) -> Result<(), VirtioError> {
        // Every request completed when it was served; make what the guest
        // was told is written durable before the state is taken.
        if !self.config.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }
}
