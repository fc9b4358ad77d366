//! virtio-net on a real tap, driven as a guest driver would, with frames
//! injected and captured on the host side of the tap through a packet
//! socket. Needs root (CAP_NET_ADMIN) and /dev/net/tun: without them each
//! test says so on stderr and does nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::{r32, w32, Driver, F_WRITE, NEEDS_RESET};
use crate::devices::virtio::net::{
    Net, NetConfig, NetCounters, MAX_BUFFER, NET_FEATURES, RX_QUEUE, TX_QUEUE,
};
use crate::devices::virtio::state::MmioTransportState;
use crate::devices::virtio::tap::{Tap, TapError, VNET_HDR_LEN};
use crate::devices::virtio::MmioTransport;

/// An ethertype for local experiments (IEEE 802 "local experimental 1").
const ETHERTYPE: u16 = 0x88b5;
/// Guest addresses of receive and transmit buffers.
const RX_BUF: u64 = 0x20000;
const TX_BUF: u64 = 0x40000;

/// A tap made for one test, with a packet socket on its host side.
struct HostSide {
    name: String,
    sock: std::os::fd::OwnedFd,
    ifindex: i32,
}

/// A fresh tap name (at most 15 bytes).
fn tap_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "cryot{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether this process can create taps; if not, says which test is skipped and why.
fn can_use_taps(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !(root && tun) {
        eprintln!("SKIP {test}: needs root and /dev/net/tun to create a tap (root {root}, /dev/net/tun {tun})");
    }
    root && tun
}

fn ifreq(name: &str) -> [u8; 40] {
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req
}

/// An interface ioctl on a 40-byte `struct ifreq`; panics on failure.
fn ifreq_ioctl(fd: i32, op: libc::Ioctl, req: &mut [u8; 40]) {
    // SAFETY: the interface ioctls read and write one `struct ifreq`
    // (40 bytes on x86_64), which `req` is, alive for the call.
    let r = unsafe { libc::ioctl(fd, op, req.as_mut_ptr()) };
    assert_eq!(r, 0, "ioctl {op:#x}: {}", std::io::Error::last_os_error());
}

impl HostSide {
    /// Brings tap `name` up (IPv6 off, so the host sends nothing on its
    /// own) and opens a packet socket on it for [`ETHERTYPE`].
    fn new(name: &str, up: bool) -> Self {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let proto = ETHERTYPE.to_be() as i32;
        // SAFETY: plain socket creation.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh socket we own.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut req = ifreq(name);
        ifreq_ioctl(fd, libc::SIOCGIFINDEX, &mut req);
        let ifindex = i32::from_ne_bytes([req[16], req[17], req[18], req[19]]);
        if up {
            let mut req = ifreq(name);
            ifreq_ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            ifreq_ioctl(fd, libc::SIOCSIFFLAGS, &mut req);
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: addr is a sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        HostSide {
            name: name.to_string(),
            sock,
            ifindex,
        }
    }

    /// Sends `frame` out of the tap interface (the guest receives it).
    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        // SAFETY: frame and addr are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// The next frame arriving from the guest, within a second.
    fn recv(&self) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

/// An Ethernet frame to `dst` of [`ETHERTYPE`] carrying `payload`.
fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A driver with a started net device on a fresh tap, and its host side.
fn net_driver(up: bool) -> (Driver, HostSide, Arc<NetCounters>) {
    let name = tap_name();
    let net = Net::open(
        &NetConfig {
            tap: name.clone(),
            mac: None,
        },
        3,
    )
    .unwrap();
    let counters = net.counters();
    let host = HostSide::new(&name, up);
    (Driver::with_device(Box::new(net)), host, counters)
}

/// Posts receive buffer `i` (`len` bytes at RX_BUF + i * 64 KiB... within memory).
fn post_rx(d: &mut Driver, i: u16, len: u32) {
    d.submit_on(
        RX_QUEUE,
        i,
        &[(RX_BUF + u64::from(i) * 0x1000, len, F_WRITE)],
    );
}

/// Sends `bytes` (header included) as one transmit buffer.
fn transmit(d: &mut Driver, bytes: &[u8]) {
    d.mem.write_slice(bytes, GuestAddress(TX_BUF)).unwrap();
    d.submit_on(TX_QUEUE, 0, &[(TX_BUF, bytes.len() as u32, 0)]);
}

fn needs_reset(d: &mut Driver) -> bool {
    r32(&mut d.t, 0x70) & NEEDS_RESET != 0
}

#[test]
fn net_frames_pass_both_ways_through_a_real_tap() {
    if !can_use_taps("net_frames_pass_both_ways_through_a_real_tap") {
        return;
    }
    let (mut d, host, counters) = net_driver(true);
    assert_eq!(r32(&mut d.t, 8), 1, "network device");
    let mut mac = [0u8; 6];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, [0x02, b'c', b'r', b'y', b'o', 3]);
    w32(&mut d.t, 0x14, 1);
    assert_eq!(r32(&mut d.t, 0x10), (NET_FEATURES >> 32) as u32);

    // Host to guest.
    let to_guest = frame(mac, b"hello guest");
    host.send(&to_guest);
    post_rx(&mut d, 0, 2048);
    let (idx, len) = d.used_on(RX_QUEUE, 0);
    assert_eq!((idx, len as usize), (1, VNET_HDR_LEN + to_guest.len()));
    let mut got = vec![0u8; len as usize];
    d.mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &to_guest[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(d.irq.read().unwrap(), 1);

    // Guest to host.
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend(frame([0x02, 0, 0, 0, 0, 0x99], b"hello host"));
    transmit(&mut d, &out);
    assert_eq!(d.used_on(TX_QUEUE, 0).0, 1);
    assert_eq!(host.recv().as_deref(), Some(&out[VNET_HDR_LEN..]));
    let s = counters.get();
    assert_eq!((s.rx_frames, s.tx_frames, s.tx_dropped), (1, 1, 0));
    assert!(!needs_reset(&mut d));
}

#[test]
fn net_receive_waits_for_guest_buffers() {
    if !can_use_taps("net_receive_waits_for_guest_buffers") {
        return;
    }
    let (mut d, host, counters) = net_driver(true);
    for i in 0..3u8 {
        host.send(&frame([0x02, b'c', b'r', b'y', b'o', 3], &[i; 60]));
    }
    // No buffers: the frames wait in the tap.
    d.t.process_queue(RX_QUEUE, &d.mem);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 0);
    post_rx(&mut d, 0, 2048);
    post_rx(&mut d, 1, 2048);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 2, "two buffers, two frames");
    post_rx(&mut d, 2, 2048);
    assert_eq!(d.used_on(RX_QUEUE, 2).0, 3);
    let mut b = [0u8; 1];
    d.mem
        .read_slice(
            &mut b,
            GuestAddress(RX_BUF + 2 * 0x1000 + VNET_HDR_LEN as u64 + 14),
        )
        .unwrap();
    assert_eq!(b[0], 2, "frames arrive in order");
    // A buffer with nothing to read stays with the device.
    post_rx(&mut d, 3, 2048);
    assert_eq!(d.used_on(RX_QUEUE, 3).0, 3);
    assert_eq!(counters.get().rx_frames, 3);
}

#[test]
fn net_transmit_to_a_down_tap_drops_and_counts() {
    if !can_use_taps("net_transmit_to_a_down_tap_drops_and_counts") {
        return;
    }
    let (mut d, _host, counters) = net_driver(false);
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend(frame([0xff; 6], b"into the void"));
    for i in 1..=3 {
        transmit(&mut d, &out);
        assert_eq!(d.used_on(TX_QUEUE, 0).0, i, "the buffer is returned");
    }
    assert_eq!(counters.get().tx_dropped, 3);
    assert!(!needs_reset(&mut d));
}

#[test]
fn hostile_net_buffers_drop_frames_or_need_reset() {
    if !can_use_taps("hostile_net_buffers_drop_frames_or_need_reset") {
        return;
    }
    let (mut d, host, counters) = net_driver(true);
    // A transmit frame over 64 KiB plus headers, in two descriptors.
    let half = (MAX_BUFFER / 2 + 1) as u32;
    d.submit_on(
        TX_QUEUE,
        0,
        &[(TX_BUF, half, 0), (TX_BUF + u64::from(half), half, 0)],
    );
    // One shorter than its headers.
    transmit(&mut d, &[0u8; 5]);
    assert_eq!(d.used_on(TX_QUEUE, 0).0, 2);
    assert_eq!(counters.get().tx_dropped, 2);
    assert!(host.recv().is_none());

    // A receive buffer too small for the frame: returned empty, frame dropped.
    host.send(&frame([0x02, b'c', b'r', b'y', b'o', 3], &[7; 200]));
    post_rx(&mut d, 0, 64);
    assert_eq!(d.used_on(RX_QUEUE, 0), (1, 0));
    assert_eq!(counters.get().rx_dropped, 1);
    assert!(!needs_reset(&mut d));

    // A receive buffer outside guest memory: the device needs a reset.
    host.send(&frame([0x02, b'c', b'r', b'y', b'o', 3], &[8; 60]));
    d.submit_on(RX_QUEUE, 1, &[(0x10_0000_0000, 2048, F_WRITE)]);
    assert!(needs_reset(&mut d));

    // Likewise a transmit buffer outside guest memory.
    let (mut d, _host, _) = net_driver(true);
    d.submit_on(TX_QUEUE, 0, &[(0xffff_f000, 100, 0)]);
    assert!(needs_reset(&mut d));
    // And an avail index out of range.
    let (mut d, _host, _) = net_driver(true);
    d.publish_on(TX_QUEUE, 300);
    assert!(needs_reset(&mut d));
}

#[test]
fn net_state_survives_save_and_restore_on_the_same_tap() {
    if !can_use_taps("net_state_survives_save_and_restore_on_the_same_tap") {
        return;
    }
    let name = tap_name();
    let keeper = Tap::open(&name).unwrap();
    keeper.set_persistent(true).unwrap();
    drop(keeper);
    let config = NetConfig {
        tap: name.clone(),
        mac: Some([2, 1, 2, 3, 4, 5]),
    };
    let mut d = Driver::with_device(Box::new(Net::open(&config, 0).unwrap()));
    let host = HostSide::new(&name, true);
    post_rx(&mut d, 0, 2048);
    post_rx(&mut d, 1, 2048);
    host.send(&frame(config.mac.unwrap(), b"before"));
    d.t.process_queue(RX_QUEUE, &d.mem);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 1);

    let saved = d.t.state();
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let decoded: MmioTransportState = postcard::from_bytes(&bytes).unwrap();
    // The saving device lets go of the tap before the restore takes it
    // (as the saving cryo exits before the restoring one attaches).
    let Driver {
        t,
        mem,
        irq,
        queues,
        next_avail,
    } = d;
    drop(t);
    let mut t = MmioTransport::new(
        Box::new(Net::open(&config, 0).unwrap()),
        irq.try_clone().unwrap(),
    )
    .unwrap();
    t.restore(&decoded).unwrap();
    assert_eq!(t.state(), saved);
    let mut d = Driver {
        t,
        mem,
        irq,
        queues,
        next_avail,
    };
    // The second posted buffer is still the device's: a frame sent now lands in it.
    host.send(&frame(config.mac.unwrap(), b"after"));
    d.t.process_queue(RX_QUEUE, &d.mem);
    assert_eq!(d.used_on(RX_QUEUE, 1).0, 2);
    let mut got = [0u8; 5];
    d.mem
        .read_slice(
            &mut got,
            GuestAddress(RX_BUF + 0x1000 + VNET_HDR_LEN as u64 + 14),
        )
        .unwrap();
    assert_eq!(&got, b"after");

    assert!(
        matches!(Tap::open(&name), Err(TapError::Busy(_))),
        "a tap serves one device at a time"
    );
    drop(d);
    let last = Tap::open(&name).unwrap();
    last.set_persistent(false).unwrap();
}

#[test]
fn a_restored_device_waits_for_a_tap_another_process_still_holds() {
    if !can_use_taps("a_restored_device_waits_for_a_tap_another_process_still_holds") {
        return;
    }
    let name = tap_name();
    let holder = Tap::open(&name).unwrap();
    // Held throughout: the wait ends in the typed error.
    let held = Tap::open_when_free(&name, Duration::from_millis(100));
    assert!(matches!(held, Err(TapError::Busy(ref n)) if *n == name));
    // Let go of (as the source of a local migration does when it exits)
    // while the restore waits.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        holder.set_persistent(true).unwrap();
        drop(holder);
    });
    let config = NetConfig {
        tap: name.clone(),
        mac: None,
    };
    let net = Net::reopen(&config, 0).expect("the tap, once let go of");
    release.join().unwrap();
    assert_eq!(net.tap_name(), name);
    drop(net);
    Tap::open(&name).unwrap().set_persistent(false).unwrap();
}

#[test]
fn a_held_device_leaves_guest_memory_alone_until_let_go() {
    if !can_use_taps("a_held_device_leaves_guest_memory_alone_until_let_go") {
        return;
    }
    let (mut d, host, counters) = net_driver(true);
    post_rx(&mut d, 0, 2048);
    // The VM pauses for a save: frames arriving now must not reach it.
    d.t.hold(true);
    let before = d.t.state();
    host.send(&frame(
        [0x02, b'c', b'r', b'y', b'o', 3],
        b"during the save",
    ));
    d.t.process_queue(RX_QUEUE, &d.mem);
    post_rx(&mut d, 1, 2048);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 0);
    assert_eq!(d.t.state().queues, before.queues, "rings untouched");
    // Resuming has every queue served (by the event loop, as here), and
    // what waited lands in the buffers posted meanwhile.
    d.t.hold(false);
    d.t.kick().unwrap();
    for (q, evt) in d.t.queue_events().iter().enumerate() {
        assert_eq!(evt.read().unwrap(), 1, "queue {q} kicked");
    }
    d.t.process_all(&d.mem);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 1);
    assert_eq!(counters.get().rx_frames, 1);
}

/// A received frame's buffer and the receive used ring are device writes
/// that reach the memory's write observer (dirty tracking for live copies).
#[test]
fn a_received_frame_reaches_the_write_observer() {
    if !can_use_taps("a_received_frame_reaches_the_write_observer") {
        return;
    }
    let (mut d, host, _) = net_driver(true);
    let seen = Arc::new(super::WrittenPages::default());
    crate::memory::observe_writes(&d.mem, Some(seen.clone()));
    host.send(&frame([0x02, b'c', b'r', b'y', b'o', 3], b"tracked"));
    post_rx(&mut d, 0, 2048);
    assert_eq!(d.used_on(RX_QUEUE, 0).0, 1);
    let pages = seen.0.lock().unwrap().clone();
    for page in [RX_BUF >> 12, super::USED >> 12] {
        assert!(pages.contains(&page), "page {page:#x} not seen: {pages:x?}");
    }
    crate::memory::observe_writes(&d.mem, None);
}
