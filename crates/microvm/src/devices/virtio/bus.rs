//! Virtio devices in the VM: their MMIO windows (for the vCPUs' MMIO
//! exits), their irqfds and ioeventfds, and the event-loop subscriber that
//! serves queue notifications.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use log::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, DiskConfig};
use super::disk_copy::CopySource;
use super::{mmio_base, mmio_irq, MmioTransport, VirtioError, MMIO_WINDOW};
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

/// Creates the transport for `block` in MMIO slot `slot` and wires its
/// interrupt (irqfd on the slot's IOAPIC pin) and queue notifications
/// (ioeventfds on QueueNotify, one per queue index).
pub fn attach(vm_fd: &VmFd, slot: usize, block: Block) -> Result<BlockSlot, VirtioError> {
    let gsi = mmio_irq(slot)
        .ok_or_else(|| VirtioError::State(format!("no interrupt line for device slot {slot}")))?;
    let disk = block.config().clone();
    let copy_source = block.copy_source();
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm_fd
        .register_irqfd(&irq, gsi)
        .map_err(|e| VirtioError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let transport = MmioTransport::new(Box::new(block), irq)?;
    let notify = IoEventAddress::Mmio(mmio_base(slot) + QUEUE_NOTIFY);
    for (i, evt) in transport.queue_events().iter().enumerate() {
        vm_fd
            .register_ioevent(evt, &notify, i as u32)
            .map_err(|e| VirtioError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(BlockSlot {
        transport: Arc::new(Mutex::new(transport)),
        disk,
        copy_source,
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

/// Serves queue notifications on the VM's event loop.
pub struct QueueWorker {
    memory: GuestMemory,
    /// (notification eventfd, transport, queue index).
    queues: Vec<(EventFd, Arc<Mutex<MmioTransport>>, usize)>,
}

impl QueueWorker {
    /// A worker for every queue of `slots`. With `kick`, each queue is
    /// served once when the loop starts (after a restore, a notification
    /// may have been pending at the save).
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
            for (i, evt) in guard.queue_events().iter().enumerate() {
                let evt = evt.try_clone()?;
                if kick {
                    evt.write(1)?;
                }
                queues.push((evt, Arc::clone(t), i));
            }
        }
        Ok(QueueWorker { memory, queues })
    }
}

impl MutEventSubscriber for QueueWorker {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        for (evt, t, i) in &self.queues {
            if evt.as_raw_fd() != fd {
                continue;
            }
            let _ = evt.read();
            match t.lock() {
                Ok(mut t) => t.process_queue(*i, &self.memory),
                Err(_) => warn!("virtio: device lock poisoned"),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (evt, _, _) in &self.queues {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                warn!("virtio: cannot watch a queue notification: {e:?}");
            }
        }
    }
}
