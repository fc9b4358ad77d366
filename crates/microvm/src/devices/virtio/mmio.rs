//! The virtio-mmio register block (virtio 1.x, MMIO version 2).

use log::warn;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::state::{MmioTransportState, QueueState};
use super::{VirtioDevice, VirtioError};
use crate::memory::GuestMemory;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO layout.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest.
const VENDOR_ID: u32 = 0x4f59_5243; // "CRYO"

/// One virtio device behind its MMIO registers, queues, interrupt and
/// queue-notification eventfds.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// While the VM is paused the device serves nothing: no guest memory
    /// or device state changes under a save (see [`MmioTransport::hold`]).
    held: bool,
}

impl MmioTransport {
    /// Wraps `device`, raising its interrupt on `irq`. One queue
    /// notification eventfd is created per queue.
    pub fn new(device: Box<dyn VirtioDevice>, irq: EventFd) -> Result<Self, VirtioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for (i, &max) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(max).map_err(|source| VirtioError::Queue { queue: i, source })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            queues,
            queue_evts,
            irq,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            held: false,
        })
    }

    /// The queue notification eventfds, by queue index (for ioeventfds).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutable.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver has set the device up and it has not failed.
    pub fn is_running(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x00 => MAGIC,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device.write_config(offset - 0x100, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => self.ack_features(v),
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => self.with_queue_setup(|q| q.set_size(v as u16)),
            0x44 => self.with_queue_setup(|q| q.set_ready(v == 1)),
            0x50 => self.notify(v),
            0x64 => self.interrupt_status &= !v,
            0x70 => self.set_status(v),
            0x80 => self.with_queue_setup(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue_setup(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue_setup(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue_setup(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue_setup(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue_setup(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Applies a queue set-up write, only while the driver may make it:
    /// after FEATURES_OK, before DRIVER_OK (the ready bit may also be cleared later).
    fn with_queue_setup(&mut self, f: impl FnOnce(&mut Queue)) {
        let allowed = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0;
        if !allowed {
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    fn ack_features(&mut self, v: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            return;
        }
        let offered = self.device.features();
        match self.driver_features_sel {
            0 => {
                self.acked_features =
                    (self.acked_features & !0xffff_ffff) | (u64::from(v) & offered)
            }
            1 => {
                self.acked_features =
                    (self.acked_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered)
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits; anything else is ignored.
        if v & self.status != self.status {
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // Legacy drivers are not served: FEATURES_OK does not stick.
            v &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        let needed = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        if v & !needed != 0 && v & needed != needed {
            return;
        }
        let starting =
            v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        self.status = v;
        if starting {
            if let Err(e) = self.device.activate(self.acked_features) {
                self.fail(&e);
            }
        }
    }

    /// Puts the device into DEVICE_NEEDS_RESET after `e` and tells the
    /// driver through a configuration-change interrupt.
    fn fail(&mut self, e: &VirtioError) {
        warn!(
            "virtio device {}: {e}; the device needs a reset",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// A queue notification that reached the MMIO exit path (no ioeventfd).
    fn notify(&mut self, queue: u32) {
        if let Some(evt) = self.queue_evts.get(queue as usize) {
            if let Err(e) = evt.write(1) {
                warn!("virtio: queue notification lost: {e}");
            }
        }
    }

    /// Serves queue `index` and raises the interrupt if buffers were used.
    /// A guest protocol error puts the device into DEVICE_NEEDS_RESET and
    /// tells the driver through a configuration-change interrupt.
    pub fn process_queue(&mut self, index: usize, mem: &GuestMemory) {
        if !self.is_running() || self.held {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        match self.device.process_queue(index, queue, mem) {
            Ok(true) => self.raise(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.fail(&e),
        }
    }

    /// Holds the device (the VM is pausing) or lets it go (resuming).
    /// A held device serves no notification and no backend event: a
    /// device driven from the host side (a tap's incoming frames) would
    /// otherwise write guest memory and move its rings while a paused VM
    /// is saved. What arrives meanwhile waits (in the tap); [`MmioTransport::kick`]
    /// after letting go has it served.
    pub fn hold(&mut self, held: bool) {
        self.held = held;
    }

    /// Signals every queue's notification eventfd, so that the event loop
    /// serves each queue once when it next runs (after a restore or a
    /// pause, for what came while the device could not serve it). Nothing
    /// is served here: the caller may hold up the loop (a live snapshot
    /// arms write protection before the thread that resolves its faults
    /// runs, and must not see guest memory written meanwhile).
    pub fn kick(&self) -> std::io::Result<()> {
        for evt in &self.queue_evts {
            evt.write(1)?;
        }
        Ok(())
    }

    /// Serves every queue (after a restore or a pause, in case a
    /// notification came while the device could not serve it).
    pub fn process_all(&mut self, mem: &GuestMemory) {
        for i in 0..self.queues.len() {
            self.process_queue(i, mem);
        }
    }

    fn raise(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.write(1) {
            warn!("virtio: interrupt lost: {e}");
        }
    }

    /// The transport's state (queues included) for a save.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState::from(q.state()))
                .collect(),
        }
    }

    /// Applies saved transport state to this (fresh) transport.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), VirtioError> {
        if state.device_type != self.device.device_type() {
            return Err(VirtioError::State(format!(
                "saved device type {} restored into a device of type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(VirtioError::State(format!(
                "saved device has {} queues, this one {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.acked_features & !self.device.features() != 0 {
            return Err(VirtioError::State(format!(
                "saved features {:#x} are not all offered by this device ({:#x})",
                state.acked_features,
                self.device.features()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(VirtioError::State(format!(
                    "queue {i}: saved maximum size {} differs from {}",
                    saved.max_size,
                    current.max_size()
                )));
            }
            let q = Queue::try_from(virtio_queue::QueueState::from(saved))
                .map_err(|source| VirtioError::Queue { queue: i, source })?;
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.acked_features)?;
        }
        Ok(())
    }
}
