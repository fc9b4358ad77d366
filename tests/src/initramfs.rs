//! Guest artefacts for Linux boot tests: initramfs archives ([`CpioArchive`],
//! used by the Linux tier in `tests/linux-tier`), and the Debian cloud kernel
//! fetched (and cached) by `resources/fetch-kernel.sh`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// File type bits of a regular file in a cpio `mode` field.
const S_IFREG: u32 = 0o100000;
/// File type bits of a directory in a cpio `mode` field.
const S_IFDIR: u32 = 0o040000;
/// File type bits of a character device in a cpio `mode` field.
const S_IFCHR: u32 = 0o020000;

/// Length of a `newc` header: the 6-byte magic plus 13 fields of 8 hex digits.
const NEWC_HEADER_LEN: usize = 110;
/// Magic of the `newc` (SVR4, no checksum) cpio format.
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends a cpio archive.
const TRAILER: &str = "TRAILER!!!";

/// Path of the script that fetches the Debian cloud kernel
/// (`resources/fetch-kernel.sh` at the workspace root).
pub fn fetch_kernel_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/fetch-kernel.sh")
}

/// One entry of a `newc` cpio archive.
struct CpioEntry<'a> {
    /// Path inside the archive, without a leading `/`.
    name: &'a str,
    /// File type and permission bits.
    mode: u32,
    /// Major number of the device (character/block devices only).
    rdev_major: u32,
    /// Minor number of the device (character/block devices only).
    rdev_minor: u32,
    /// File contents (regular files only).
    data: &'a [u8],
}

/// Bytes needed to pad `len` up to a multiple of 4.
fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Converts a length to a 32-bit cpio field, failing if it does not fit.
fn field_u32(value: usize, what: &str) -> io::Result<u32> {
    u32::try_from(value).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpio: {what} {value} does not fit in 32 bits"),
        )
    })
}

/// Writes one `newc` header, the NUL-terminated name and the data, each
/// padded to a multiple of 4 bytes.
fn write_newc_entry<W: Write>(out: &mut W, ino: u32, e: &CpioEntry<'_>) -> io::Result<()> {
    let namesize = field_u32(e.name.len() + 1, "name size")?;
    let filesize = field_u32(e.data.len(), "file size")?;
    let nlink: u32 = if e.mode & 0o170000 == S_IFDIR { 2 } else { 1 };
    let fields: [u32; 13] = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        filesize,
        0, // devmajor
        0, // devminor
        e.rdev_major,
        e.rdev_minor,
        namesize,
        0, // check
    ];
    let mut header = Vec::with_capacity(NEWC_HEADER_LEN);
    header.extend_from_slice(NEWC_MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    debug_assert_eq!(header.len(), NEWC_HEADER_LEN);
    out.write_all(&header)?;
    out.write_all(e.name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(NEWC_HEADER_LEN + e.name.len() + 1)])?;
    out.write_all(e.data)?;
    out.write_all(&[0; 3][..pad4(e.data.len())])?;
    Ok(())
}

/// An uncompressed `newc` cpio archive built in memory: what the kernel
/// unpacks as an initramfs.
#[derive(Default)]
pub struct CpioArchive {
    bytes: Vec<u8>,
    next_ino: u32,
}

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        CpioArchive {
            bytes: Vec::new(),
            next_ino: 1,
        }
    }

    fn add(&mut self, entry: &CpioEntry<'_>) -> io::Result<&mut Self> {
        write_newc_entry(&mut self.bytes, self.next_ino, entry)?;
        self.next_ino += 1;
        Ok(self)
    }

    /// A directory (`path` without a leading `/`), mode 0755.
    pub fn dir(&mut self, path: &str) -> io::Result<&mut Self> {
        self.add(&CpioEntry {
            name: path,
            mode: S_IFDIR | 0o755,
            rdev_major: 0,
            rdev_minor: 0,
            data: &[],
        })
    }

    /// A regular file with `perm` permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<&mut Self> {
        self.add(&CpioEntry {
            name: path,
            mode: S_IFREG | (perm & 0o7777),
            rdev_major: 0,
            rdev_minor: 0,
            data,
        })
    }

    /// A host file copied in with `perm` permission bits.
    pub fn host_file(&mut self, path: &str, perm: u32, host: &Path) -> io::Result<&mut Self> {
        let data = fs::read(host).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cpio: cannot read {}: {e}", host.display()),
            )
        })?;
        self.file(path, perm, &data)
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<&mut Self> {
        self.add(&CpioEntry {
            name: path,
            mode: S_IFCHR | 0o600,
            rdev_major: major,
            rdev_minor: minor,
            data: &[],
        })
    }

    /// The finished archive, with its trailer.
    pub fn finish(mut self) -> io::Result<Vec<u8>> {
        let trailer = CpioEntry {
            name: TRAILER,
            mode: 0,
            rdev_major: 0,
            rdev_minor: 0,
            data: &[],
        };
        write_newc_entry(&mut self.bytes, 0, &trailer)?;
        Ok(self.bytes)
    }
}

/// Directory where `resources/fetch-kernel.sh` caches the Debian cloud kernel:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/cryo` (an empty `XDG_CACHE_HOME` counts
/// as unset, as in the script). It holds `debian-cloud-bzImage`,
/// `debian-cloud-vmlinux` (ELF) and `debian-cloud-version`.
pub fn debian_kernel_cache_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache")
        }
    };
    base.join("cryo")
}

/// Runs `resources/fetch-kernel.sh` (a no-op, without network, when the
/// cache is already valid) and returns the cache directory (see
/// [`debian_kernel_cache_dir`]). Fails with the script's error message when
/// it exits non-zero (e.g. no `apt-get` on the host, or no network).
pub fn fetch_debian_kernel() -> io::Result<PathBuf> {
    let script = fetch_kernel_script();
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run bash: {e}")))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .unwrap_or_else(debian_kernel_cache_dir);
    if !dir.join("debian-cloud-vmlinux").is_file() || !dir.join("debian-cloud-bzImage").is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} did not leave a kernel in {}",
                script.display(),
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry parsed back from a `newc` archive.
    #[derive(Debug)]
    struct Parsed {
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        name: String,
        data: Vec<u8>,
    }

    fn parse_newc(buf: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(pos % 4, 0, "header not 4-byte aligned");
            let hdr = &buf[pos..pos + NEWC_HEADER_LEN];
            assert_eq!(&hdr[..6], NEWC_MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex field")
            };
            let namesize = field(11) as usize;
            let filesize = field(6) as usize;
            let name_start = pos + NEWC_HEADER_LEN;
            let name_bytes = &buf[name_start..name_start + namesize];
            assert_eq!(name_bytes[namesize - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(name_bytes[..namesize - 1].to_vec()).expect("utf8");
            let data_start = name_start + namesize + pad4(NEWC_HEADER_LEN + namesize);
            assert_eq!(data_start % 4, 0);
            let data = buf[data_start..data_start + filesize].to_vec();
            pos = data_start + filesize + pad4(filesize);
            let done = name == TRAILER;
            out.push(Parsed {
                ino: field(0),
                mode: field(1),
                nlink: field(4),
                rdev: (field(9), field(10)),
                name,
                data,
            });
            if done {
                assert_eq!(pos, buf.len(), "bytes after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn newc_roundtrip_and_padding() {
        // Names and data of every length mod 4 exercise the padding.
        let names = ["a", "ab", "abc", "abcd"];
        let mut archive = CpioArchive::new();
        for n in names {
            archive.file(n, 0o644, n.as_bytes()).expect("add");
        }
        let buf = archive.finish().expect("finish");
        assert_eq!(buf.len() % 4, 0);
        let parsed = parse_newc(&buf);
        assert_eq!(parsed.len(), 5);
        for (p, n) in parsed.iter().zip(names) {
            assert_eq!(p.name, n);
            assert_eq!(p.data, n.as_bytes());
            assert_eq!(p.mode, S_IFREG | 0o644);
        }
        assert_eq!(parsed[4].name, TRAILER);
        assert_eq!(parsed[4].ino, 0);
    }

    #[test]
    fn archive_holds_dirs_devices_and_files() {
        let mut archive = CpioArchive::new();
        archive
            .dir("dev")
            .and_then(|a| a.char_device("dev/console", 5, 1))
            .and_then(|a| a.file("init", 0o755, b"#!/bin/sh\n"))
            .expect("add");
        let parsed = parse_newc(&archive.finish().expect("finish"));
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", TRAILER]);
        assert_eq!(parsed[0].mode, 0o040755);
        assert_eq!(parsed[0].nlink, 2);
        assert_eq!(parsed[1].mode, 0o020600);
        assert_eq!(parsed[1].rdev, (5, 1));
        assert!(parsed[1].data.is_empty());
        assert_eq!(parsed[2].mode, 0o100755);
        let inos: Vec<u32> = parsed[..3].iter().map(|p| p.ino).collect();
        assert_eq!(inos, [1, 2, 3]);
    }

    #[test]
    fn cache_dir_follows_xdg_rule() {
        let dir = debian_kernel_cache_dir();
        assert!(dir.ends_with("cryo"));
    }
}
