//! Endpoints (`tcp:HOST:PORT`, `unix:PATH`), their connections and listeners.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::{CallerError, MemRegion, MultifdError, TransferStats};

/// Where a receiver listens: a TCP address or a Unix socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT` (`HOST` may be a name, an IPv4 address or `[IPv6]`).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// Parses `tcp:HOST:PORT` or `unix:PATH`.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, MultifdError> {
    let bad = |why: &str| {
        MultifdError::InvalidArgument(format!(
            "endpoint {s:?}: {why} (expected tcp:HOST:PORT or unix:PATH)"
        ))
    };
    if let Some(rest) = s.strip_prefix("tcp:") {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(bad("an IPv6 address must be in brackets"));
        }
        port.parse::<u16>().map_err(|_| bad("bad port"))?;
        Ok(Endpoint::Tcp(rest.to_string()))
    } else if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("no path"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    } else {
        Err(bad("unknown kind"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Endpoint {
    /// Connects to the endpoint (TCP with `TCP_NODELAY` and dead-peer
    /// detection, see [`DEAD_PEER_TIMEOUT`]).
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a.as_str())?;
                tcp_options(&s)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
        }
    }

    /// Listens on the endpoint. A Unix socket file is created (it must not
    /// exist) and removed when the listener is dropped.
    pub fn listen(&self) -> Result<Listener, MultifdError> {
        let ctx = |e| MultifdError::io(format!("listening on {self}"), e);
        match self {
            Endpoint::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str()).map_err(ctx)?)),
            Endpoint::Unix(p) => Ok(Listener::Unix(
                UnixListener::bind(p).map_err(ctx)?,
                p.clone(),
            )),
        }
    }
}

/// How long a TCP peer may stay silent (sent data unacknowledged, or
/// keepalive probes unanswered) before the connection fails with
/// `TimedOut`. A link that breaks mid-transfer otherwise leaves a blocked
/// `write` (sender) or `read` (receiver) waiting for the kernel's
/// retransmission limit, about a quarter of an hour. A slow but live peer
/// is not affected: its kernel acknowledges data and answers probes.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Idle time before the first keepalive probe, and the time between probes.
const KEEPALIVE_IDLE_S: libc::c_int = 5;
const KEEPALIVE_INTERVAL_S: libc::c_int = 3;
const KEEPALIVE_PROBES: libc::c_int = 5;

/// `TCP_NODELAY`, keepalive probes and `TCP_USER_TIMEOUT` on a connection.
fn tcp_options(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let user_timeout = libc::c_int::try_from(DEAD_PEER_TIMEOUT.as_millis()).unwrap_or(20_000);
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout),
    ] {
        // SAFETY: an int option on the stream's open socket fd; the kernel
        // reads `size_of::<c_int>()` bytes from `value`, which lives here.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A connection: TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with the socket file's path (removed on drop).
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// The endpoint a sender connects to (for TCP port 0, the real port).
    pub fn local_endpoint(&self) -> Result<Endpoint, MultifdError> {
        match self {
            Listener::Tcp(l) => {
                let a = l
                    .local_addr()
                    .map_err(|e| MultifdError::io("reading the listener's address", e))?;
                Ok(Endpoint::Tcp(a.to_string()))
            }
            Listener::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }

    /// Waits for a connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                tcp_options(&s)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// Waits at most `timeout` for a connection (`TimedOut` error after it).
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Stream> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `p` is one valid pollfd for the listener's open fd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ));
            }
            return self.accept();
        }
    }

    /// [`receive`](crate::receive) on this listener: waits as long as it
    /// takes for the main connection, then at most `data_timeout` for each
    /// data connection (a sender that failed before connecting them all
    /// does not leave the receiver waiting forever).
    #[allow(clippy::type_complexity)]
    pub fn receive(
        &self,
        data_timeout: Duration,
        alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
    ) -> Result<(Vec<u8>, TransferStats), MultifdError> {
        self.receive_checked(data_timeout, alloc, &mut |_| Ok(()))
    }

    /// [`receive_checked`](crate::receive_checked) on this listener, with
    /// the timeouts of [`Listener::receive`].
    #[allow(clippy::type_complexity)]
    pub fn receive_checked(
        &self,
        data_timeout: Duration,
        alloc: &mut dyn FnMut(&[(u64, u64)]) -> Result<Vec<MemRegion>, CallerError>,
        check_state: &mut dyn FnMut(&[u8]) -> Result<(), CallerError>,
    ) -> Result<(Vec<u8>, TransferStats), MultifdError> {
        let mut first = true;
        crate::receive_checked(
            &mut || {
                if std::mem::take(&mut first) {
                    self.accept()
                } else {
                    self.accept_timeout(data_timeout)
                }
            },
            alloc,
            check_state,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_connections_detect_dead_peers() {
        let l = parse_endpoint("tcp:127.0.0.1:0").unwrap().listen().unwrap();
        let c = l.local_endpoint().unwrap().connect().unwrap();
        let a = l.accept().unwrap();
        for s in [&c, &a] {
            let Stream::Tcp(s) = s else { panic!("not TCP") };
            let get = |level, name| {
                let mut v: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: an int option read into `v` of `len` bytes.
                let r = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        level,
                        name,
                        std::ptr::from_mut(&mut v).cast(),
                        &mut len,
                    )
                };
                assert_eq!(r, 0);
                v
            };
            assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
            assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 20_000);
            assert!(s.nodelay().unwrap());
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("tcp:127.0.0.1:4444").unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            parse_endpoint("tcp:[::1]:80").unwrap(),
            Endpoint::Tcp("[::1]:80".into())
        );
        assert_eq!(
            parse_endpoint("tcp:host.example:1").unwrap(),
            Endpoint::Tcp("host.example:1".into())
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/x.sock").unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:host:99999",
            "tcp:::1:80",
            "unix:",
            "udp:x:1",
            "/tmp/x",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_endpoint("unix:/a b").unwrap().to_string(),
            "unix:/a b"
        );
    }

    #[test]
    fn accept_times_out() {
        let l = parse_endpoint("tcp:127.0.0.1:0").unwrap().listen().unwrap();
        let e = l.accept_timeout(Duration::from_millis(20)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let ep = l.local_endpoint().unwrap();
        let _c = ep.connect().unwrap();
        l.accept_timeout(Duration::from_secs(5)).unwrap();
    }
}
