//! Saved state of virtio devices, as plain serde structs. Each device is
//! one section of a saved image; the structs here are layout version 1 of
//! their sections ([`VIRTIO_BLK_STATE_VERSION`], [`VIRTIO_NET_STATE_VERSION`]).

use serde::{Deserialize, Serialize};

/// Version of [`BlockDeviceState`] (the `virtio-blk` section).
pub const VIRTIO_BLK_STATE_VERSION: u32 = 1;

/// Version of [`NetDeviceState`] (the `virtio-net` section).
pub const VIRTIO_NET_STATE_VERSION: u32 = 1;

/// One virtqueue: its addresses, size and ring positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<&QueueState> for virtio_queue::QueueState {
    fn from(q: &QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The virtio-mmio common configuration of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Virtio device ID (checked on restore).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues, by index.
    pub queues: Vec<QueueState>,
}

/// What identifies a disk's backing file, to refuse restoring a VM onto
/// another disk than the one its memory was saved with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The path the VM opened (as given, made absolute).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Inode number.
    pub inode: u64,
    /// Modification time, in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// CRC32C of the first and the last MiB (of the whole file if smaller).
    pub content_crc: u32,
}

/// A virtio-blk device: transport, identity of the disk and options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceState {
    /// The MMIO slot (window and interrupt line) of the device.
    pub slot: u32,
    /// Virtio common configuration and queues.
    pub transport: MmioTransportState,
    /// The disk the guest used.
    pub disk: DiskIdentity,
    /// Read-only disk.
    pub read_only: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
}

impl crate::persist::StateSection for BlockDeviceState {
    const NAME: &'static str = "virtio-blk";
    const VERSION: u32 = VIRTIO_BLK_STATE_VERSION;
    fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, crate::persist::SectionError> {
        crate::persist::decode_exact(Self::NAME, version, bytes)
    }
}

/// A virtio-net device: transport, the guest's MAC, the tap it was
/// attached to and the features it offered. Frames in flight are not
/// state: the tap's queue stays with the tap, and the network drops or the
/// peers retransmit the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceState {
    /// The MMIO slot (window and interrupt line) of the device.
    pub slot: u32,
    /// Virtio common configuration and queues.
    pub transport: MmioTransportState,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The tap interface the device used (a restore reattaches to it unless
    /// told another).
    pub tap: String,
    /// The features the device offered (the driver accepted
    /// `transport.acked_features` of them).
    pub features: u64,
}

impl crate::persist::StateSection for NetDeviceState {
    const NAME: &'static str = "virtio-net";
    const VERSION: u32 = VIRTIO_NET_STATE_VERSION;
    fn decode_layout(version: u32, bytes: &[u8]) -> Result<Self, crate::persist::SectionError> {
        crate::persist::decode_exact(Self::NAME, version, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockDeviceState {
        BlockDeviceState {
            slot: 1,
            transport: MmioTransportState {
                device_type: 2,
                device_features_sel: 1,
                driver_features_sel: 1,
                acked_features: (1 << 32) | (1 << 9),
                queue_sel: 0,
                status: 0xf,
                interrupt_status: 1,
                config_generation: 0,
                queues: vec![QueueState {
                    max_size: 256,
                    size: 128,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                    next_avail: 65530,
                    next_used: 65529,
                    event_idx: false,
                }],
            },
            disk: DiskIdentity {
                path: "/var/disk.raw".into(),
                size: 1 << 30,
                inode: 42,
                mtime_ns: 1_700_000_000_123_456_789,
                content_crc: 0xdead_beef,
            },
            read_only: false,
            direct: true,
        }
    }

    fn net_sample() -> NetDeviceState {
        let mut transport = sample().transport;
        transport.device_type = 1;
        transport.queues.push(transport.queues[0].clone());
        NetDeviceState {
            slot: 2,
            transport,
            mac: [2, 0x63, 0x72, 0x79, 0x6f, 2],
            tap: "tap-vm0".into(),
            features: crate::devices::virtio::net::NET_FEATURES,
        }
    }

    #[test]
    fn net_state_round_trips_through_its_section() {
        use crate::persist::StateSection;
        let state = net_sample();
        let bytes = state.encode().unwrap();
        let back = NetDeviceState::decode_versioned(VIRTIO_NET_STATE_VERSION, &bytes).unwrap();
        assert_eq!(back, state);
        for n in 0..bytes.len() {
            assert!(NetDeviceState::decode_versioned(1, &bytes[..n]).is_err());
        }
        assert!(NetDeviceState::decode_versioned(2, &bytes).is_err());
    }

    #[test]
    fn block_state_round_trips_through_postcard() {
        let state = sample();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: BlockDeviceState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn queue_state_converts_both_ways() {
        let q = sample().transport.queues[0].clone();
        let vq = virtio_queue::QueueState::from(&q);
        assert_eq!(QueueState::from(vq), q);
    }

    #[test]
    fn truncated_block_state_is_an_error_not_a_panic() {
        let bytes = postcard::to_stdvec(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(postcard::from_bytes::<BlockDeviceState>(&bytes[..n]).is_err());
        }
    }
}
