//! A Linux tap interface opened through `/dev/net/tun`: `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a 12-byte virtio-net
//! header (`virtio_net_hdr_v1`) in front of every frame in both directions,
//! so the guest's header passes through unchanged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// Longest interface name (IFNAMSIZ, with its NUL).
const IFNAMSIZ: usize = 16;
/// Bytes of the virtio-net header in front of each frame (version 1 layout).
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: the name, then flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long, or holds a NUL, '/' or whitespace.
    #[error("bad tap name '{0}' (1 to 15 bytes, no '/', NUL or whitespace)")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are we root or CAP_NET_ADMIN?): {0}")]
    OpenTun(std::io::Error),
    /// Another file (another process) has the tap attached: a tap serves
    /// one device at a time.
    #[error("tap {0} is in use by another process (a tap serves one device at a time)")]
    Busy(String),
    /// A tun ioctl failed.
    #[error("tap {name}: {op} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which ioctl.
        op: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn check_name(name: &str) -> Result<[u8; IFNAMSIZ], TapError> {
    let bad = name.is_empty()
        || name.len() >= IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if bad {
        return Err(TapError::BadName(name.to_string()));
    }
    let mut out = [0u8; IFNAMSIZ];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

impl Tap {
    /// Opens (creating it if missing, which needs CAP_NET_ADMIN) the tap
    /// `name`, non-blocking, with 12-byte virtio-net headers and no offloads.
    /// A tap created here is not persistent: it disappears when the last fd
    /// on it closes (when cryo exits).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let ifname = check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let mut req = IfReq {
            name: ifname,
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // is (same size and layout), alive for the call.
        let set = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        match tap.check("TUNSETIFF", set) {
            Err(TapError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                return Err(TapError::Busy(tap.name));
            }
            other => other?,
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        tap.check("TUNSETVNETHDRSZ", unsafe {
            libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len)
        })?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// [`Tap::open`], trying again every 20 ms for up to `wait` while the
    /// tap is [`TapError::Busy`]: a restore on the host of its source (a
    /// migration over a local socket) gets the VM before the source process
    /// has exited and let go of the tap.
    pub fn open_when_free(name: &str, wait: Duration) -> Result<Self, TapError> {
        let deadline = Instant::now() + wait;
        loop {
            match Tap::open(name) {
                Err(TapError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Turns an ioctl's return value into a typed error naming it.
    fn check(&self, op: &'static str, ret: libc::c_int) -> Result<(), TapError> {
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets which offloads (`TUN_F_*`) the reader (the guest) accepts:
    /// frames read from the tap may then carry partial checksums or be
    /// larger than the MTU (GSO), as described by their virtio-net header.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        self.ioctl_value(
            "TUNSETOFFLOAD",
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    /// Keeps the interface after its last fd closes (or not). The tap a
    /// restore reattaches to must outlive the saving cryo: make it
    /// persistent (or create it with `ip tuntap add`).
    pub fn set_persistent(&self, persistent: bool) -> Result<(), TapError> {
        self.ioctl_value(
            "TUNSETPERSIST",
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persistent),
        )
    }

    /// A tun ioctl that takes its argument by value.
    fn ioctl_value(
        &self,
        op: &'static str,
        code: libc::Ioctl,
        value: libc::c_ulong,
    ) -> Result<(), TapError> {
        // SAFETY: `code` is a tun ioctl that reads no memory: its argument
        // is the value itself.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), code, value) };
        self.check(op, ret)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (virtio-net header first) into `buf`. `WouldBlock`
    /// when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (virtio-net header first). The tap takes it whole
    /// or not at all: `WouldBlock` when its queue is full, EIO when the
    /// interface is down.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "has space", "sixteen-bytes-xx", "nul\0"] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        let n = check_name("tap0").unwrap();
        assert_eq!(&n[..5], b"tap0\0");
        assert!(check_name("fifteen-bytes-x").is_ok());
    }
}
