//! virtio-net over a host tap: one receive queue (0) and one transmit
//! queue (1), a MAC address in config space, and the checksum and TSO
//! offloads, which pass through to the tap inside the virtio-net header
//! (`IFF_VNET_HDR`; what the guest accepts on receive is set on the tap
//! with `TUNSETOFFLOAD` when the driver starts the device).
//!
//! Receive runs when the tap is readable (the event loop watches it
//! edge-triggered) and when the driver adds receive buffers: frames move
//! only while the guest has buffers, and otherwise stay queued in the tap
//! (whose own queue drops what overflows). Transmit runs on the queue
//! notification. A frame the tap refuses (interface down, queue full) is
//! dropped and counted: the event loop never blocks on the tap nor spins.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{VirtioDevice, VirtioError};
use crate::memory::GuestMemory;

/// How long a restore waits for its tap while another process (the source
/// of a migration on this host, exiting) still holds it.
pub const TAP_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame with its header, either way: the header, 64 KiB of IP
/// packet (a TSO segment) and an Ethernet header with a VLAN tag.
pub const MAX_BUFFER: usize = VNET_HDR_LEN + 65536 + 18;
/// Shortest transmit buffer: the header and an Ethernet header.
const MIN_TX: usize = VNET_HDR_LEN + 14;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS: usize = 10;

/// The features a net device offers.
pub const NET_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6);

/// A MAC address.
pub type Mac = [u8; 6];

/// The MAC of a device given none: locally administered, unicast,
/// `02:63:72:79:6f:SLOT` ("cryo"), stable for the slot. Two VMs on one
/// bridge need their own `mac=`.
pub fn default_mac(slot: usize) -> Mac {
    [0x02, b'c', b'r', b'y', b'o', slot as u8]
}

/// Formats a MAC as `xx:xx:xx:xx:xx:xx`.
pub fn format_mac(mac: &Mac) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// A network device as the user asked for it on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface.
    pub tap: String,
    /// The guest's MAC (None: [`default_mac`] of the slot).
    pub mac: Option<Mac>,
}

/// Why a `--net` argument does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetOptionError {
    /// No `tap=` given.
    #[error("--net needs tap=NAME")]
    NoTap,
    /// An option other than `tap` and `mac`.
    #[error("unknown net option '{0}' (expected tap=NAME, mac=XX:XX:XX:XX:XX:XX)")]
    UnknownOption(String),
    /// A MAC that is not six hex bytes, or a multicast one.
    #[error("bad MAC '{0}' (six hex bytes separated by ':', unicast)")]
    BadMac(String),
}

fn parse_mac(s: &str) -> Result<Mac, NetOptionError> {
    let bad = || NetOptionError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=XX:XX:XX:XX:XX:XX]`.
    pub fn parse(s: &str) -> Result<Self, NetOptionError> {
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => return Err(NetOptionError::UnknownOption(opt.to_string())),
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or(NetOptionError::NoTap)?,
            mac,
        })
    }
}

/// Frame and drop counters of one device, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Frames read from the tap and dropped (the guest's buffer too small).
    pub rx_dropped: u64,
    /// Failed tap reads (other than "nothing waiting").
    pub rx_errors: u64,
    /// Frames the guest sent that the tap took.
    pub tx_frames: u64,
    /// Frames the guest sent that were dropped: malformed (too short,
    /// longer than [`MAX_BUFFER`]), or refused by the tap (down, full).
    pub tx_dropped: u64,
}

/// The live counters of a device, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    rx_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

impl NetCounters {
    /// The counts now.
    pub fn get(&self) -> NetStats {
        NetStats {
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            rx_dropped: self.rx_dropped.load(Ordering::Relaxed),
            rx_errors: self.rx_errors.load(Ordering::Relaxed),
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_dropped: self.tx_dropped.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed)
}

/// A virtio-net device on a tap.
pub struct Net {
    tap: Tap,
    mac: Mac,
    buf: Box<[u8]>,
    stats: Arc<NetCounters>,
    queue_sizes: [u16; 2],
}

impl Net {
    /// Opens the tap `config.tap` for the device in MMIO slot `slot`.
    pub fn open(config: &NetConfig, slot: usize) -> Result<Self, TapError> {
        Ok(Net::on_tap(Tap::open(&config.tap)?, config, slot))
    }

    /// [`Net::open`] for a restored device: a tap still held by another
    /// process is waited for, up to [`TAP_BUSY_WAIT`] (see
    /// [`Tap::open_when_free`]).
    pub fn reopen(config: &NetConfig, slot: usize) -> Result<Self, TapError> {
        let tap = Tap::open_when_free(&config.tap, TAP_BUSY_WAIT)?;
        Ok(Net::on_tap(tap, config, slot))
    }

    /// The device on `tap`, opened beforehand (see
    /// [`crate::open_restore_taps`]); `config` gives its MAC.
    pub fn on_tap(tap: Tap, config: &NetConfig, slot: usize) -> Self {
        Net {
            tap,
            mac: config.mac.unwrap_or_else(|| default_mac(slot)),
            buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
            stats: Arc::default(),
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// The guest's MAC.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The device's counters (shared: they keep counting).
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.stats)
    }

    /// Moves waiting frames from the tap into the guest's receive buffers,
    /// while both last.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, VirtioError> {
        let qerr = |source| VirtioError::Queue {
            queue: RX_QUEUE,
            source,
        };
        let mut used = false;
        while let Some(chain) = queue.iter(mem).map_err(qerr)?.next() {
            let n = match self.tap.read_frame(&mut self.buf) {
                Ok(n) => n,
                Err(e) => {
                    // Nothing waiting (or the tap failed): the buffer goes
                    // back for the next frame.
                    queue.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        bump(&self.stats.rx_errors);
                        warn!("tap {}: read: {e}", self.tap.name());
                    }
                    break;
                }
            };
            let head = chain.head_index();
            let len = self.deliver(chain, mem, n)?;
            queue.add_used(mem, head, len).map_err(qerr)?;
            used = true;
        }
        Ok(used)
    }

    /// Writes the frame of `n` bytes in the buffer into `chain`; returns
    /// the length used (0 for a dropped frame).
    fn deliver(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        n: usize,
    ) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let mut writer = Writer::new(mem, chain).map_err(|e| VirtioError::BadChain {
            head,
            reason: format!("receive buffers: {e}"),
        })?;
        if n < VNET_HDR_LEN || writer.available_bytes() < n {
            bump(&self.stats.rx_dropped);
            return Ok(0);
        }
        // One buffer per frame: no mergeable receive buffers.
        self.buf[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        writer
            .write_all(&self.buf[..n])
            .map_err(|e| VirtioError::BadChain {
                head,
                reason: format!("receive buffers: {e}"),
            })?;
        bump(&self.stats.rx_frames);
        Ok(n as u32)
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, VirtioError> {
        let qerr = |source| VirtioError::Queue {
            queue: TX_QUEUE,
            source,
        };
        let mut used = false;
        while let Some(chain) = queue.iter(mem).map_err(qerr)?.next() {
            let head = chain.head_index();
            self.send(chain, mem)?;
            queue.add_used(mem, head, 0).map_err(qerr)?;
            used = true;
        }
        Ok(used)
    }

    fn send(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<(), VirtioError> {
        let head = chain.head_index();
        let bad = |reason: String| VirtioError::BadChain { head, reason };
        let mut reader =
            Reader::new(mem, chain).map_err(|e| bad(format!("transmit buffers: {e}")))?;
        let len = reader.available_bytes();
        if !(MIN_TX..=MAX_BUFFER).contains(&len) {
            bump(&self.stats.tx_dropped);
            return Ok(());
        }
        reader
            .read_exact(&mut self.buf[..len])
            .map_err(|e| bad(format!("transmit buffers: {e}")))?;
        match self.tap.write_frame(&self.buf[..len]) {
            Ok(_) => {
                bump(&self.stats.tx_frames);
            }
            Err(e) => {
                if bump(&self.stats.tx_dropped) == 0 {
                    warn!(
                        "tap {}: frame dropped: {e} (later drops are only counted)",
                        self.tap.name()
                    );
                }
            }
        }
        Ok(())
    }

    /// Config space: the MAC (`virtio_net_config.mac`); no status field.
    fn config_bytes(&self) -> [u8; 6] {
        self.mac
    }
}

/// The tap offloads (`TUN_F_*`) matching the receive features the driver accepted.
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        NET_FEATURES
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
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Err(VirtioError::NoQueue(index)),
        }
    }

    fn activate(&mut self, acked: u64) -> Result<(), VirtioError> {
        Ok(self.tap.set_offload(tap_offloads(acked))?)
    }

    fn backend(&self) -> Option<(BorrowedFd<'_>, usize)> {
        Some((self.tap.as_fd(), RX_QUEUE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let c = NetConfig::parse("tap=tap0,mac=02:00:00:aa:bb:cc").unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(NetConfig::parse("tap=t").unwrap().mac, None);
        assert_eq!(
            NetConfig::parse("mac=02:00:00:00:00:01"),
            Err(NetOptionError::NoTap)
        );
        assert_eq!(
            NetConfig::parse("tap=t,queues=2"),
            Err(NetOptionError::UnknownOption("queues=2".into()))
        );
        assert_eq!(
            NetConfig::parse("tap="),
            Err(NetOptionError::UnknownOption("tap=".into()))
        );
        for bad in [
            "01:00:00:00:00:01",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "zz:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            assert!(
                matches!(
                    NetConfig::parse(&format!("tap=t,mac={bad}")),
                    Err(NetOptionError::BadMac(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn default_macs_are_local_unicast_and_per_slot() {
        let a = default_mac(0);
        assert_eq!(a[0] & 3, 2, "locally administered, unicast");
        assert_ne!(default_mac(1), a);
        assert_eq!(format_mac(&a), "02:63:72:79:6f:00");
    }

    #[test]
    fn offloads_follow_the_accepted_features() {
        assert_eq!(
            tap_offloads(NET_FEATURES & !(1 << VIRTIO_NET_F_GUEST_CSUM)),
            0
        );
        assert_eq!(
            tap_offloads(NET_FEATURES),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
    }
}
