//! `--disk-snapshot`: a copy of each disk at the instant of a live
//! snapshot, recorded in the image in place of the disk itself.
//!
//! The steps follow the snapshot's: [`prepare`] checks the targets and
//! creates their temporary files while the VM runs; [`Starts::start`]
//! begins every copy inside the snapshot's pause (the disks are quiesced by
//! then; see `microvm::devices::virtio::disk_copy`); [`Running::finish`]
//! waits until each copy is complete and durable and reads its identity;
//! [`Finished::publish`] renames the copies into place just before the
//! image itself. A failure at any step removes the temporary files, and
//! the devices leave copy mode.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use microvm::devices::virtio::block::disk_identity;
use microvm::devices::virtio::disk_copy::{
    CopyCancel, CopyMethod, CopySource, DiskCopy, DiskCopyError,
};
use microvm::devices::virtio::state::DiskIdentity;
use serde::Serialize;

use super::{create_temp, publish, SaveControl, SaveError};
use crate::files::TempFile;

/// What one disk copy did.
#[derive(Clone, Debug, Serialize)]
pub struct DiskCopyStats {
    /// The copy.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// `reflink` or `copy-before-write`.
    pub method: &'static str,
    /// Chunks (1 MiB) copied by the background thread.
    pub chunks_by_thread: u64,
    /// Chunks copied because the guest was about to write them.
    pub chunks_before_write: u64,
    /// Chunks left as holes.
    pub chunks_holes: u64,
    /// From the pause until the copy was durable (ms).
    pub copy_ms: f64,
}

/// The copies to start in the pause.
pub struct Starts {
    sources: Vec<CopySource>,
    files: Vec<File>,
}

/// Targets checked and temporary files created, before the pause.
pub struct Pending {
    targets: Vec<(PathBuf, TempFile)>,
    starts: Starts,
}

/// The targets of the copies, waiting for the copies to start.
pub struct Targets(Vec<(PathBuf, TempFile)>);

/// Checks `targets` (one per disk, in slot order) against the VM's `disks`
/// (path as opened, copy source) and the snapshot `image`, and creates a
/// temporary file beside each target. No targets: no copies.
pub fn prepare(
    targets: &[PathBuf],
    disks: Vec<(PathBuf, CopySource)>,
    image: &Path,
) -> Result<Pending, SaveError> {
    let disks = if targets.is_empty() {
        Vec::new()
    } else {
        disks
    };
    if targets.len() != disks.len() {
        return Err(SaveError::DiskSnapshotCount {
            disks: disks.len(),
            targets: targets.len(),
        });
    }
    let mut pending = Pending {
        targets: Vec::new(),
        starts: Starts::none(),
    };
    for (i, target) in targets.iter().enumerate() {
        check_target(target, &targets[..i], &disks, image)?;
        let (tmp, file) = create_temp(target)?;
        pending.targets.push((target.clone(), tmp));
        pending.starts.files.push(file);
    }
    pending.starts.sources = disks.into_iter().map(|(_, s)| s).collect();
    Ok(pending)
}

/// A target must be a save target, distinct from the image, from the
/// targets before it and from every disk of the VM (which it would replace).
fn check_target(
    target: &Path,
    earlier: &[PathBuf],
    disks: &[(PathBuf, CopySource)],
    image: &Path,
) -> Result<(), SaveError> {
    let bad = |reason: String| SaveError::BadRequest(format!("--disk-snapshot {reason}"));
    crate::files::check_save_target(target).map_err(|e| bad(e.0))?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let t = abs(target);
    if t == abs(image) || earlier.iter().any(|e| abs(e) == t) {
        return Err(bad(format!("{}: named twice", target.display())));
    }
    let same_file = |disk: &Path| match (std::fs::metadata(target), std::fs::metadata(disk)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if let Some((disk, _)) = disks.iter().find(|(d, _)| abs(d) == t || same_file(d)) {
        return Err(bad(format!(
            "{}: is the VM's disk {}; a copy cannot replace its own disk",
            target.display(),
            disk.display()
        )));
    }
    Ok(())
}

impl Pending {
    /// The targets, and the copies to start (moved into the pause).
    pub fn split(self) -> (Targets, Starts) {
        (Targets(self.targets), self.starts)
    }
}

impl Starts {
    /// No copies.
    pub fn none() -> Self {
        Starts {
            sources: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Starts every copy. Call it inside the pause, after the disks were
    /// quiesced; on failure the copies already started end.
    pub fn start(self) -> Result<Vec<DiskCopy>, (usize, DiskCopyError)> {
        self.sources
            .iter()
            .zip(self.files)
            .enumerate()
            .map(|(i, (s, f))| s.start(f).map_err(|e| (i, e)))
            .collect()
    }
}

impl Targets {
    /// The copies, as [`Starts::start`] returned them.
    pub fn started(
        self,
        copies: Result<Vec<DiskCopy>, (usize, DiskCopyError)>,
    ) -> Result<Running, SaveError> {
        let targets = self.0;
        match copies {
            Ok(copies) => Ok(Running { targets, copies }),
            Err((i, e)) => Err(copy_error(&targets[i].0, e)),
        }
    }
}

fn copy_error(path: &Path, e: DiskCopyError) -> SaveError {
    match e {
        DiskCopyError::Cancelled => SaveError::Cancelled("snapshot"),
        source => SaveError::DiskCopy {
            path: path.to_owned(),
            source,
        },
    }
}

/// Copies under way.
pub struct Running {
    targets: Vec<(PathBuf, TempFile)>,
    copies: Vec<DiskCopy>,
}

impl Running {
    /// Whether there are copies at all.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Handles that cancel the copies.
    pub fn cancel_handles(&self) -> Vec<CopyCancel> {
        self.copies.iter().map(DiskCopy::cancel_handle).collect()
    }

    /// Waits for every copy to be complete and durable, and reads the
    /// identity each will have under its target name.
    pub fn finish(self) -> Result<Finished, SaveError> {
        let mut done = Finished {
            targets: Vec::new(),
            identities: Vec::new(),
            stats: Vec::new(),
        };
        let mut copies = self.copies.into_iter();
        for (path, tmp) in self.targets {
            let Some(copy) = copies.next() else { break };
            let report = copy.finish().map_err(|e| copy_error(&path, e))?;
            let abs = std::path::absolute(&path).map_err(|source| SaveError::Write {
                path: path.clone(),
                source,
            })?;
            // Renaming keeps the inode and modification time.
            let identity = disk_identity(tmp.path()).map_err(|source| SaveError::DiskIdentity {
                path: path.clone(),
                source,
            })?;
            done.identities.push(DiskIdentity {
                path: abs.to_string_lossy().into_owned(),
                ..identity
            });
            done.stats.push(DiskCopyStats {
                path: path.clone(),
                bytes: report.bytes,
                method: match report.method {
                    CopyMethod::Reflink => "reflink",
                    CopyMethod::CopyBeforeWrite => "copy-before-write",
                },
                chunks_by_thread: report.chunks_by_thread,
                chunks_before_write: report.chunks_before_write,
                chunks_holes: report.chunks_holes,
                copy_ms: report.elapsed.as_secs_f64() * 1000.0,
            });
            done.targets.push((path, tmp));
        }
        Ok(done)
    }
}

/// Complete, durable copies under their temporary names.
pub struct Finished {
    targets: Vec<(PathBuf, TempFile)>,
    /// The identity of each copy, in slot order, to record in the image.
    pub identities: Vec<DiskIdentity>,
    /// What each copy did.
    pub stats: Vec<DiskCopyStats>,
}

impl Finished {
    /// Puts the identity of each copy in place of its disk's in `snapshot`.
    pub fn record(&self, snapshot: &mut microvm::persist::VmSnapshot) {
        for (b, id) in snapshot.blocks.iter_mut().zip(&self.identities) {
            b.disk = id.clone();
        }
    }

    /// Renames every copy over its target (call just before the image's
    /// own rename).
    pub fn publish(self) -> Result<Vec<DiskCopyStats>, SaveError> {
        for (path, tmp) in self.targets {
            publish(tmp, &path, &SaveControl::default())?;
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::scratch;
    use std::sync::Arc;

    fn disk(dir: &Path, name: &str) -> (PathBuf, CopySource) {
        let p = dir.join(name);
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let source = CopySource {
            disk: Arc::new(File::open(&p).unwrap()),
            hook: Arc::default(),
        };
        (p, source)
    }

    fn refusal(r: Result<Pending, SaveError>) -> String {
        match r {
            Err(SaveError::BadRequest(m)) => m,
            Err(e) => panic!("not a bad request: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn targets_are_checked_against_disks_image_and_each_other() {
        let dir = scratch("disk-targets");
        let d0 = disk(&dir, "d0.raw");
        let d1 = disk(&dir, "d1.raw");
        let image = dir.join("snap.img");
        let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
        let two = || vec![d0.clone(), d1.clone()];
        assert!(matches!(
            prepare(std::slice::from_ref(&a), two(), &image),
            Err(SaveError::DiskSnapshotCount {
                disks: 2,
                targets: 1
            })
        ));
        let m = refusal(prepare(&[a.clone(), d1.0.clone()], two(), &image));
        assert!(m.contains("its own disk"), "{m}");
        let m = refusal(prepare(&[a.clone(), a.clone()], two(), &image));
        assert!(m.contains("named twice"), "{m}");
        let m = refusal(prepare(&[image.clone(), a.clone()], two(), &image));
        assert!(m.contains("named twice"), "{m}");
        // A hard link to a disk is that disk.
        let link = dir.join("link.raw");
        std::fs::hard_link(&d0.0, &link).unwrap();
        let m = refusal(prepare(&[link, b.clone()], two(), &image));
        assert!(m.contains("its own disk"), "{m}");
        // Accepted: a private temporary file beside each target, removed
        // when the snapshot is dropped before completing.
        let pending = prepare(&[a, b], two(), &image).unwrap();
        let temps = || {
            std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .map(|e| e.metadata().unwrap())
                .collect::<Vec<_>>()
        };
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(temps().len(), 2);
        assert!(temps()
            .iter()
            .all(|m| m.permissions().mode() & 0o777 == 0o600));
        drop(pending);
        assert!(temps().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
