//! Raw userfaultfd interface: `#[repr(C)]` structs from `<linux/userfaultfd.h>`,
//! ioctl numbers computed with the `_IOWR` rules, and a small owned-fd wrapper.
//!
//! We do not use the `userfaultfd` crate: its `-sys` crate runs bindgen (libclang
//! at build time), its write-protect API hides behind the `linux5_7` feature and
//! it does not expose `UFFD_FEATURE_WP_UNPOPULATED`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;

/// Feature bits (`uffdio_api.features`).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19).
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// Bit of `uffdio_register.ioctls` saying UFFDIO_WRITEPROTECT works on the range.
pub const IOCTL_BIT_WRITEPROTECT: u64 = 1 << 0x06;

/// `UFFD_USER_MODE_ONLY`: deliberately NOT used (KVM writes guest memory from
/// kernel mode; with it, a guest write to protected memory fails KVM_RUN).
#[allow(dead_code)]
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg` (32 bytes), with the page-fault arm of its union spelled out.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// `arg.pagefault.flags`
    pub flags: u64,
    /// `arg.pagefault.address`
    pub address: u64,
    /// `arg.pagefault.feat` (thread id with UFFD_FEATURE_THREAD_ID) and padding.
    pub feat: u64,
}

const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO_TYPE: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO_TYPE << 8) | nr
}

/// `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`
pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
/// `_IOWR(UFFDIO, 0x00, struct uffdio_register)`
pub const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
/// `_IOR(UFFDIO, 0x01, struct uffdio_range)`
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
/// `_IOR(UFFDIO, 0x02, struct uffdio_range)`
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
/// `_IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`
pub const UFFDIO_WRITEPROTECT: u64 =
    ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `_IO(UFFDIO, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0x00, 0);

/// How the userfaultfd was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdSource {
    /// The `userfaultfd(2)` system call.
    Syscall,
    /// `/dev/userfaultfd` and its `USERFAULTFD_IOC_NEW` ioctl (Linux 5.11+).
    DevUserfaultfd,
}

/// An owned userfaultfd (non-blocking, close-on-exec, not user-mode-only).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    pub source: UffdSource,
}

/// Why no userfaultfd could be created.
pub struct CreateError {
    pub syscall: io::Error,
    pub dev: io::Error,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Uffd {
    /// Creates a userfaultfd, preferring the syscall, falling back to `/dev/userfaultfd`.
    pub fn create() -> Result<Uffd, CreateError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let syscall_err = if ret >= 0 {
            let fd = match libc::c_int::try_from(ret) {
                Ok(fd) => fd,
                Err(_) => return Err(CreateError::other("fd out of range")),
            };
            // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Uffd {
                fd,
                source: UffdSource::Syscall,
            });
        } else {
            io::Error::last_os_error()
        };
        match Self::create_dev(flags) {
            Ok(fd) => Ok(Uffd {
                fd,
                source: UffdSource::DevUserfaultfd,
            }),
            Err(dev) => Err(CreateError {
                syscall: syscall_err,
                dev,
            }),
        }
    }

    fn create_dev(flags: libc::c_int) -> io::Result<OwnedFd> {
        let path = c"/dev/userfaultfd";
        // SAFETY: `path` is a valid NUL-terminated string; open returns a new fd or -1.
        let dev = cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
        // SAFETY: `dev` was just returned by open and is owned by nobody else.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its integer argument.
        let fd = cvt(unsafe {
            libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags)
        })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: every `req` used with this helper is a uffd ioctl whose argument is
            // the `#[repr(C)]` struct `T` (size encoded in `req`), valid for reads and writes.
            let ret =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), req as libc::Ioctl, arg as *mut T) };
            if ret >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => return Err(err),
            }
        }
    }

    /// UFFDIO_API handshake; returns the features the kernel offers.
    pub fn api(&self, features: u64) -> io::Result<UffdioApi> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_API, &mut api)?;
        Ok(api)
    }

    /// Registers `[start, start+len)` in write-protect mode; returns the allowed ioctls.
    pub fn register_wp(&self, start: usize, len: usize) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// Protects (`protect`) or un-protects and wakes waiters (`!protect`).
    pub fn writeprotect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Waits up to `timeout_ms` for events. Ok(true) when readable.
    pub fn poll(&self, timeout_ms: libc::c_int) -> io::Result<bool> {
        self.poll_or(None, timeout_ms)
    }

    /// Like [`poll`](Self::poll), also returning (with Ok(false)) as soon as
    /// `waker` is woken.
    pub fn poll_or(&self, waker: Option<&Waker>, timeout_ms: libc::c_int) -> io::Result<bool> {
        let pfd = |fd: &OwnedFd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut pfds = [pfd(&self.fd), pfd(waker.map_or(&self.fd, |w| &w.0))];
        let n: libc::nfds_t = if waker.is_some() { 2 } else { 1 };
        // SAFETY: `pfds` holds at least `n` valid pollfds.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(err);
        }
        let revents = pfds[0].revents;
        if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other(format!(
                "poll on the userfaultfd returned revents {revents:#x}"
            )));
        }
        Ok(ret > 0 && revents & libc::POLLIN != 0)
    }

    /// Reads as many messages as are queued (up to `buf.len()`); 0 when none.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is valid for writes of `bytes` bytes, and UffdMsg is plain data.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(err),
            };
        }
        let n = usize::try_from(ret).unwrap_or(0);
        if n % size_of::<UffdMsg>() != 0 {
            return Err(io::Error::other(format!(
                "short userfaultfd read of {n} bytes"
            )));
        }
        Ok(n / size_of::<UffdMsg>())
    }
}

/// An eventfd that interrupts [`Uffd::poll_or`] from another thread.
#[derive(Debug)]
pub struct Waker(OwnedFd);

impl Waker {
    /// A new, unwoken eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd(2) takes an initial count and flags; returns a new fd or -1.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes every later `poll_or` on this waker return at once.
    pub fn wake(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid 8-byte buffer to our eventfd.
        let ret = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl CreateError {
    fn other(msg: &str) -> CreateError {
        CreateError {
            syscall: io::Error::other(msg.to_string()),
            dev: io::Error::other(msg.to_string()),
        }
    }
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The `/proc/self/maps` line that covers `addr`, if any.
pub fn mapping_of(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .find(|line| {
            let range = line.split_whitespace().next().unwrap_or("");
            let mut it = range.split('-');
            let lo = it.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            let hi = it.next().and_then(|s| usize::from_str_radix(s, 16).ok());
            matches!((lo, hi), (Some(lo), Some(hi)) if lo <= addr && addr < hi)
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_headers() {
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
