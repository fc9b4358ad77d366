//! Virtio devices in the VM: their MMIO windows (for the vCPUs' MMIO
//! exits), their irqfds and ioeventfds, and the event-loop subscriber that
//! serves queue notifications.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use log::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, DiskConfig};
use super::disk_copy::CopySource;
use super::net::{Mac, Net, NetCounters};
use super::{mmio_base, mmio_irq, MmioTransport, VirtioDevice, VirtioError, MMIO_WINDOW};
use crate::memory::GuestMemory;

/// Offset of QueueNotify in the MMIO window.
const QUEUE_NOTIFY: u64 = 0x50;

/// One virtio-blk device of the VM.
pub struct BlockSlot {
    /// The device and its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// How the disk was opened.
    pub disk: DiskConfig,
    /// For point-in-time copies of the disk (`disk_copy`).
    pub copy_source: CopySource,
}

/// One virtio-net device of the VM.
pub struct NetSlot {
    /// The device and its transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The tap it is attached to.
    pub tap: String,
    /// The guest's MAC.
    pub mac: Mac,
    /// Its frame and drop counters.
    pub counters: Arc<NetCounters>,
}

/// Creates the transport for `device` in MMIO slot `slot` and wires its
/// interrupt (irqfd on the slot's IOAPIC pin) and queue notifications
/// (ioeventfds on QueueNotify, one per queue index).
fn attach_device(
    vm_fd: &VmFd,
    slot: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<Arc<Mutex<MmioTransport>>, VirtioError> {
    let gsi = mmio_irq(slot)
        .ok_or_else(|| VirtioError::State(format!("no interrupt line for device slot {slot}")))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm_fd
        .register_irqfd(&irq, gsi)
        .map_err(|e| VirtioError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let transport = MmioTransport::new(device, irq)?;
    let notify = IoEventAddress::Mmio(mmio_base(slot) + QUEUE_NOTIFY);
    for (i, evt) in transport.queue_events().iter().enumerate() {
        vm_fd
            .register_ioevent(evt, &notify, i as u32)
            .map_err(|e| VirtioError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(Arc::new(Mutex::new(transport)))
}

/// Attaches `block` in MMIO slot `slot`.
pub fn attach(vm_fd: &VmFd, slot: usize, block: Block) -> Result<BlockSlot, VirtioError> {
    let disk = block.config().clone();
    let copy_source = block.copy_source();
    Ok(BlockSlot {
        transport: attach_device(vm_fd, slot, Box::new(block))?,
        disk,
        copy_source,
    })
}

/// Attaches `net` in MMIO slot `slot`.
pub fn attach_net(vm_fd: &VmFd, slot: usize, net: Net) -> Result<NetSlot, VirtioError> {
    let tap = net.tap_name().to_string();
    let mac = net.mac();
    let counters = net.counters();
    Ok(NetSlot {
        transport: attach_device(vm_fd, slot, Box::new(net))?,
        tap,
        mac,
        counters,
    })
}

/// The MMIO windows of every virtio device, for the vCPU threads.
#[derive(Clone, Default)]
pub struct MmioBus {
    slots: Vec<Arc<Mutex<MmioTransport>>>,
}

impl MmioBus {
    /// A bus over the transports, in slot order.
    pub fn new(slots: Vec<Arc<Mutex<MmioTransport>>>) -> Self {
        MmioBus { slots }
    }

    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
        let base = mmio_base(0);
        let rel = addr.checked_sub(base)?;
        let slot = usize::try_from(rel / MMIO_WINDOW).ok()?;
        Some((self.slots.get(slot)?, rel % MMIO_WINDOW))
    }

    /// A guest read; false when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((t, offset)) = self.find(addr) else {
            return false;
        };
        match t.lock() {
            Ok(mut t) => t.read(offset, data),
            Err(_) => data.fill(0xff),
        }
        true
    }

    /// A guest write; false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((t, offset)) = self.find(addr) else {
            return false;
        };
        if let Ok(mut t) = t.lock() {
            t.write(offset, data);
        }
        true
    }
}

/// What wakes the worker for a queue.
enum Source {
    /// The queue's notification eventfd (an ioeventfd).
    Notify(EventFd),
    /// The device's backend (a tap), watched edge-triggered.
    Backend(OwnedFd),
}

impl Source {
    fn raw(&self) -> RawFd {
        match self {
            Source::Notify(evt) => evt.as_raw_fd(),
            Source::Backend(fd) => fd.as_raw_fd(),
        }
    }
}

/// Serves queue notifications and device backends on the VM's event loop.
pub struct QueueWorker {
    memory: GuestMemory,
    /// (what wakes it, transport, queue index).
    queues: Vec<(Source, Arc<Mutex<MmioTransport>>, usize)>,
}

impl QueueWorker {
    /// A worker for every queue and backend of `slots`. With `kick`, each
    /// queue is served once when the loop starts (after a restore, a
    /// notification may have been pending at the save).
    pub fn new(
        memory: GuestMemory,
        slots: &[Arc<Mutex<MmioTransport>>],
        kick: bool,
    ) -> Result<Self, VirtioError> {
        let mut queues = Vec::new();
        for t in slots {
            let guard = t
                .lock()
                .map_err(|_| VirtioError::State("device lock poisoned".into()))?;
            if kick {
                guard.kick()?;
            }
            for (i, evt) in guard.queue_events().iter().enumerate() {
                queues.push((Source::Notify(evt.try_clone()?), Arc::clone(t), i));
            }
            if let Some((fd, i)) = guard.device().backend() {
                queues.push((Source::Backend(fd.try_clone_to_owned()?), Arc::clone(t), i));
            }
        }
        Ok(QueueWorker { memory, queues })
    }
}

impl MutEventSubscriber for QueueWorker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        for (source, t, i) in &self.queues {
            if source.raw() != fd {
                continue;
            }
            if let Source::Notify(evt) = source {
                let _ = evt.read();
            }
            match t.lock() {
                Ok(mut t) => t.process_queue(*i, &self.memory),
                Err(_) => warn!("virtio: device lock poisoned"),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (source, _, _) in &self.queues {
            let events = match source {
                Source::Notify(evt) => Events::new(evt, EventSet::IN),
                // Edge-triggered: a backend left readable (no guest buffers)
                // must not wake the loop again until new data arrives or the
                // driver adds buffers (its notification resumes the queue).
                Source::Backend(fd) => {
                    Events::new_raw(fd.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED)
                }
            };
            if let Err(e) = ops.add(events) {
                warn!("virtio: cannot watch a queue notification: {e:?}");
            }
        }
    }
}
