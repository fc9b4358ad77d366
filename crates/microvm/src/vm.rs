//! The VM: KVM objects, guest memory, devices and vCPU threads, wired together;
//! built from a [`VmConfig`], run on an event loop until the guest or the host
//! ends it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::I8042Device;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, MAX_VCPUS};
use crate::arch::regs::{boot_fpu, boot_regs, setup_sregs};
use crate::arch::{acpi, cpuid, lapic, mptable, msr};
use crate::devices::console::{ConsoleInput, TerminalMode};
use crate::devices::virtio;
use crate::devices::virtio::block::{check_identity, Block, DiskConfig};
use crate::devices::virtio::bus::{self as virtio_bus, BlockSlot, MmioBus, NetSlot, QueueWorker};
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::state::{BlockDeviceState, NetDeviceState};
use crate::devices::virtio::tap::{Tap, TapError};
use crate::devices::{
    new_serial, restore_serial, AcpiPm, Cmos, EventFdTrigger, PioDevices, SerialOutput, COM1_IRQ,
};
use crate::loader::{self, BootSource, LoadedKernel};
use crate::memory::{create_guest_memory, GuestMemory, MemoryBacking};
use crate::persist::{CmosState, I8042State, MachineState, SerialState, VmSnapshot};
use crate::vcpu::{ExitNotifier, VcpuError, VcpuHandle, VcpuRequest, VcpuResponse, VmExitReason};
use crate::vstate;
use crate::Error;

/// Everything needed to build a VM.
pub struct VmConfig {
    /// Number of vCPUs (1 to the host's limit, at most 254).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// How RAM is backed.
    pub backing: MemoryBacking,
    /// Kernel, initrd, command line, entry protocol.
    pub boot: BootSource,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// Whether the VMM's stdin feeds the serial console.
    pub serial_input: bool,
    /// virtio-blk disks, in MMIO slot order (announced to the guest on its
    /// command line).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices on host taps, in the MMIO slots after the disks.
    pub nets: Vec<NetConfig>,
}

/// Whether the VM runs or is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Built, vCPUs not started.
    Created,
    /// vCPUs running guest code.
    Running,
    /// vCPUs stopped by the host.
    Paused,
    /// The VM has ended.
    Stopped,
}

/// A running or runnable VM.
pub struct MicroVm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    devices: Arc<Mutex<PioDevices>>,
    vcpu_fds: Vec<VcpuFd>,
    vcpus: Vec<VcpuHandle>,
    exit: Arc<ExitNotifier>,
    platform: PlatformEvents,
    state: RunState,
    loaded: Option<LoadedKernel>,
    machine: MachineState,
    serial_input: bool,
    vcpu_count: u8,
    control_tx: Sender<ControlCall>,
    control_rx: Receiver<ControlCall>,
    control_evt: EventFd,
    blocks: Vec<BlockSlot>,
    nets: Vec<NetSlot>,
    /// Serve every virtio queue once when the loop starts (after a restore).
    kick_queues: bool,
}

type ControlCall = Box<dyn FnOnce(&mut MicroVm) + Send>;

/// Ends a VM without waiting; see [`MicroVm::stop_handle`].
#[derive(Clone)]
pub struct StopHandle(Arc<ExitNotifier>);

impl StopHandle {
    /// Asks the VM to end with `reason` (the first reason recorded wins).
    pub fn stop(&self, reason: VmExitReason) {
        self.0.notify(reason);
    }
}

/// A handle other threads use to act on a VM while [`MicroVm::run`] owns it:
/// each call runs a closure on the event-loop thread with `&mut MicroVm`.
#[derive(Clone)]
pub struct VmController {
    tx: Sender<ControlCall>,
    evt: Arc<EventFd>,
    exit: Arc<ExitNotifier>,
}

/// How often a caller waiting on the event loop checks that the VM has not
/// ended (an ended VM's loop runs no more calls).
const CALL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

impl VmController {
    /// Runs `f` on the VM's event-loop thread and returns its result, or an
    /// error if the VM has ended.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut MicroVm) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Box::new(move |vm: &mut MicroVm| {
                let _ = tx.send(f(vm));
            }))
            .map_err(|_| Error::State("the VM has ended".into()))?;
        self.evt.write(1).map_err(Error::Io)?;
        let ended = || Error::State("the VM has ended".into());
        loop {
            match rx.recv_timeout(CALL_POLL) {
                Ok(v) => return Ok(v),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // The loop stops once an exit reason is recorded: a call
                    // still queued then would wait forever.
                    if self.exit.reason().is_some() {
                        return Err(ended());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(ended()),
            }
        }
    }

    /// Pauses every vCPU.
    pub fn pause(&self) -> Result<(), Error> {
        self.call(|vm| vm.pause())?
    }

    /// Resumes every vCPU.
    pub fn resume(&self) -> Result<(), Error> {
        self.call(|vm| vm.resume())?
    }

    /// Ends the VM with [`VmExitReason::Stopped`].
    pub fn stop(&self) -> Result<(), Error> {
        self.call(|vm| vm.request_stop(VmExitReason::Stopped))
    }
}

/// Options for [`MicroVm::restore`].
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Restore even if this host's TSC frequency differs from the saved one
    /// and KVM cannot scale it (the guest's sense of time will be off).
    pub allow_tsc_mismatch: bool,
    /// Restore even if a disk's size or fingerprint differs from the one
    /// recorded in the save (a missing disk is still refused).
    pub disk_changed_ok: bool,
    /// The taps the saved net devices attach to, in device order (empty:
    /// the taps recorded in the save). Otherwise one per saved device.
    pub nets: Vec<NetConfig>,
}

/// TSC frequencies closer than this (in parts per million) count as equal:
/// hosts calibrate the same hardware slightly differently at each boot.
const TSC_TOLERANCE_PPM: u64 = 250;

fn check_tsc(kvm: &Kvm, fd: &VcpuFd, saved_khz: u32, allow: bool) -> Result<(), Error> {
    if saved_khz == 0 {
        return Ok(());
    }
    let host_khz = fd.get_tsc_khz().unwrap_or(0);
    let diff = u64::from(saved_khz.abs_diff(host_khz));
    if host_khz != 0 && diff * 1_000_000 <= u64::from(saved_khz) * TSC_TOLERANCE_PPM {
        return Ok(());
    }
    if kvm.check_extension(kvm_ioctls::Cap::TscControl) && fd.set_tsc_khz(saved_khz).is_ok() {
        info!("TSC scaled from {host_khz} kHz to the saved {saved_khz} kHz");
        return Ok(());
    }
    if allow {
        warn!("restoring a VM saved at TSC {saved_khz} kHz on a host at {host_khz} kHz without TSC scaling: guest time will run at the wrong rate");
        Ok(())
    } else {
        Err(Error::TscMismatch {
            saved_khz,
            host_khz,
        })
    }
}

fn check_vcpu_count(kvm: &Kvm, vcpus: u8) -> Result<(), Error> {
    let limit = max_vcpus(kvm);
    if vcpus == 0 || vcpus > limit {
        return Err(Error::TooManyVcpus {
            requested: vcpus,
            max: limit,
        });
    }
    Ok(())
}

/// The guest memory regions as (address, size) pairs.
pub fn region_list(memory: &GuestMemory) -> Vec<(u64, u64)> {
    memory.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// The KVM memory slots of `memory`: slot `i` is region `i`, flags 0.
fn memory_slots(memory: &GuestMemory) -> Result<Vec<kvm_userspace_memory_region>, Error> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| Error::Internal("guest memory region has no host address".into()))?;
            Ok(kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            })
        })
        .collect()
}

/// Creates the KVM VM with its TSS, identity map, irqchip, PIT and memory slots.
fn create_vm_fd(kvm: &Kvm, memory: &GuestMemory) -> Result<VmFd, Error> {
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    // The memory slots before the irqchip. Creating the irqchip ends an SRCU
    // grace period of the VM's, after which the first slot's update (in
    // kvm_swap_active_memslots) waits for a normal grace period instead of
    // taking the fast path: on the 2-CPU test hosts a 3 GiB slot took 4-35
    // ms after the irqchip, asleep for all but 1.5 ms of it, and 1-4 ms
    // before it. Every restore waits for this before its guest resumes.
    // KVM takes either order; only the vCPUs must come after the irqchip.
    for r in memory_slots(memory)? {
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // VM keeps for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    vm_fd
        .create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
    Ok(vm_fd)
}

/// A KVM VM with its guest memory registered and nothing else yet (no
/// state, devices or vCPUs): the first part of a restore, which
/// [`MicroVm::restore_in`] completes. A migration's destination makes it as
/// soon as it knows the RAM layout, so that creating it (milliseconds to
/// tens of them: `KVM_CREATE_VM`, the irqchip, the PIT, the memory slots) is
/// not part of the guest's downtime.
pub struct VmShell {
    kvm: Kvm,
    vm_fd: VmFd,
    memory: GuestMemory,
    /// How long creating it took.
    created: std::time::Duration,
    /// Taps opened beforehand for the saved net devices (see
    /// [`open_restore_taps`]); the restore opens any other itself.
    taps: Vec<Tap>,
}

impl VmShell {
    /// Creates the KVM VM for `memory` and registers it. The memory may be
    /// written meanwhile (RAM still arriving): KVM only maps it.
    pub fn new(memory: GuestMemory) -> Result<Self, Error> {
        let t = std::time::Instant::now();
        let kvm = open_kvm()?;
        let vm_fd = create_vm_fd(&kvm, &memory)?;
        Ok(VmShell {
            kvm,
            vm_fd,
            memory,
            created: t.elapsed(),
            taps: Vec::new(),
        })
    }

    /// The guest memory it registered.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Hands the restore taps opened beforehand ([`open_restore_taps`]):
    /// each saved net device whose tap is among them attaches to it.
    pub fn with_taps(mut self, taps: Vec<Tap>) -> Self {
        self.taps = taps;
        self
    }
}

/// Opens now the taps that a restore of the net devices `saved` will attach
/// to (`given`, as [`RestoreOptions::nets`], or those the save recorded),
/// checking their number and MACs as the restore does. A migration's
/// destination calls it before its ACK, so that a tap it cannot have fails
/// the migration while the source still runs, instead of losing the VM
/// after the source has ended. A tap that is busy under the very name the
/// save recorded is not an error and is left out: on the source's own host
/// the source holds it until the migration ends, and the restore waits for
/// it (up to [`virtio::net::TAP_BUSY_WAIT`]). Hand the result to
/// [`VmShell::with_taps`].
pub fn open_restore_taps(saved: &[NetDeviceState], given: &[NetConfig]) -> Result<Vec<Tap>, Error> {
    let targets = net_targets(saved, given)?;
    let mut taps = Vec::with_capacity(targets.len());
    for (state, target) in saved.iter().zip(&targets) {
        match Tap::open(&target.tap) {
            Ok(tap) => taps.push(tap),
            Err(TapError::Busy(_)) if target.tap == state.tap => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(taps)
}

/// Builds the port I/O devices, fresh or from saved state; returns them and
/// the events of the guest's reset and power-off lines.
fn build_devices(
    vm_fd: &VmFd,
    serial_out: SerialOutput,
    saved: Option<(&SerialState, &CmosState)>,
) -> Result<(PioDevices, PlatformEvents), Error> {
    let serial_irq = EventFdTrigger::new().map_err(Error::Io)?;
    vm_fd
        .register_irqfd(&serial_irq.0, COM1_IRQ)
        .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
    let reset = EventFdTrigger::new().map_err(Error::Io)?;
    let power_off = EventFdTrigger::new().map_err(Error::Io)?;
    let platform = PlatformEvents {
        reset: reset.0.try_clone().map_err(Error::Io)?,
        power_off: power_off.0.try_clone().map_err(Error::Io)?,
    };
    let acpi_pm = AcpiPm::new(reset.try_clone().map_err(Error::Io)?, power_off);
    let mut devices = match saved {
        None => PioDevices::new(
            new_serial(serial_irq, serial_out).map_err(Error::Io)?,
            I8042Device::new(reset),
            acpi_pm,
        ),
        Some((serial, _)) => {
            let serial = restore_serial(serial_irq, serial_out, serial)
                .map_err(|e| Error::Snapshot(format!("serial state cannot be restored: {e}")))?;
            PioDevices::new(serial, I8042Device::new(reset), acpi_pm)
        }
    };
    if let Some((_, cmos)) = saved {
        devices.cmos = Cmos::from_state(cmos);
    }
    Ok((devices, platform))
}

/// Refuses more virtio devices than there are MMIO slots.
fn check_device_count(count: usize) -> Result<(), Error> {
    if count > virtio::MAX_DEVICES {
        return Err(Error::TooManyDevices(count));
    }
    Ok(())
}

/// Opens the disks and attaches each as a virtio-blk device in its MMIO slot.
fn attach_disks(vm_fd: &VmFd, disks: &[DiskConfig]) -> Result<Vec<BlockSlot>, Error> {
    let mut slots = Vec::with_capacity(disks.len());
    for (slot, disk) in disks.iter().enumerate() {
        slots.push(virtio_bus::attach(vm_fd, slot, Block::open(disk.clone())?)?);
    }
    Ok(slots)
}

/// Rebuilds the saved virtio-blk devices: checks each disk is the one the
/// save recorded, opens it and applies the saved transport state.
fn restore_disks(
    vm_fd: &VmFd,
    saved: &[BlockDeviceState],
    disk_changed_ok: bool,
) -> Result<Vec<BlockSlot>, Error> {
    let mut slots = Vec::with_capacity(saved.len());
    for (i, state) in saved.iter().enumerate() {
        if state.slot as usize != i {
            return Err(Error::Snapshot(format!(
                "virtio-blk device {i} is saved in slot {}",
                state.slot
            )));
        }
        check_identity(&state.disk, disk_changed_ok)?;
        let block = Block::open(DiskConfig {
            path: state.disk.path.clone().into(),
            read_only: state.read_only,
            direct: state.direct,
        })?;
        let slot = virtio_bus::attach(vm_fd, i, block)?;
        slot.transport
            .lock()
            .map_err(|_| Error::Internal("device lock poisoned".into()))?
            .restore(&state.transport)
            .map_err(|e| Error::Snapshot(format!("virtio-blk device {i}: {e}")))?;
        slots.push(slot);
    }
    Ok(slots)
}

/// Quiesces each virtio-blk device and reads its state and disk identity.
fn save_disks(blocks: &[BlockSlot]) -> Result<Vec<BlockDeviceState>, Error> {
    let started = std::time::Instant::now();
    let mut states = Vec::with_capacity(blocks.len());
    for (slot, b) in blocks.iter().enumerate() {
        let mut t = b
            .transport
            .lock()
            .map_err(|_| Error::Internal("device lock poisoned".into()))?;
        t.device_mut().quiesce()?;
        let path = std::path::absolute(&b.disk.path).map_err(Error::Io)?;
        states.push(BlockDeviceState {
            slot: slot as u32,
            transport: t.state(),
            disk: virtio::block::disk_identity(&path)?,
            read_only: b.disk.read_only,
            direct: b.disk.direct,
        });
    }
    if !blocks.is_empty() {
        info!(
            "{} disks quiesced and identified in {:.1} ms",
            blocks.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(states)
}

/// Opens the taps and attaches each as a virtio-net device in the MMIO
/// slots from `first_slot` on.
fn attach_nets(vm_fd: &VmFd, first_slot: usize, nets: &[NetConfig]) -> Result<Vec<NetSlot>, Error> {
    let mut slots = Vec::with_capacity(nets.len());
    for (i, net) in nets.iter().enumerate() {
        let slot = first_slot + i;
        slots.push(virtio_bus::attach_net(vm_fd, slot, Net::open(net, slot)?)?);
    }
    Ok(slots)
}

/// The tap each saved net device reattaches to: the one `given` for it,
/// or, with none given, the one recorded in the save.
fn net_targets(saved: &[NetDeviceState], given: &[NetConfig]) -> Result<Vec<NetConfig>, Error> {
    if given.is_empty() {
        return Ok(saved
            .iter()
            .map(|s| NetConfig {
                tap: s.tap.clone(),
                mac: Some(s.mac),
            })
            .collect());
    }
    if given.len() != saved.len() {
        return Err(Error::NetCountMismatch {
            saved: saved.len(),
            given: given.len(),
        });
    }
    let mut out = Vec::with_capacity(saved.len());
    for (i, (s, g)) in saved.iter().zip(given).enumerate() {
        if let Some(mac) = g.mac.filter(|m| *m != s.mac) {
            return Err(Error::NetMacMismatch {
                device: i,
                saved: s.mac,
                given: mac,
            });
        }
        out.push(NetConfig {
            tap: g.tap.clone(),
            mac: Some(s.mac),
        });
    }
    Ok(out)
}

/// Rebuilds the saved virtio-net devices on their taps (see
/// [`net_targets`]) in the slots after the disks, with their transport
/// state: a tap in `opened` (by name, see [`open_restore_taps`]), else one
/// opened now.
fn restore_nets(
    vm_fd: &VmFd,
    first_slot: usize,
    saved: &[NetDeviceState],
    given: &[NetConfig],
    mut opened: Vec<Tap>,
) -> Result<Vec<NetSlot>, Error> {
    let targets = net_targets(saved, given)?;
    let mut slots = Vec::with_capacity(saved.len());
    for (i, (state, target)) in saved.iter().zip(&targets).enumerate() {
        let slot = first_slot + i;
        if state.slot as usize != slot || state.features != virtio::net::NET_FEATURES {
            return Err(Error::Snapshot(format!(
                "virtio-net device {i} is saved in slot {} with features {:#x}; this cryo puts it in slot {slot} with {:#x}",
                state.slot,
                state.features,
                virtio::net::NET_FEATURES
            )));
        }
        let device = match opened.iter().position(|t| t.name() == target.tap) {
            Some(i) => Net::on_tap(opened.swap_remove(i), target, slot),
            // The source of a migration on this host may still hold the tap.
            None => Net::reopen(target, slot)?,
        };
        let net = virtio_bus::attach_net(vm_fd, slot, device)?;
        net.transport
            .lock()
            .map_err(|_| Error::Internal("device lock poisoned".into()))?
            .restore(&state.transport)
            .map_err(|e| Error::Snapshot(format!("virtio-net device {i}: {e}")))?;
        slots.push(net);
    }
    Ok(slots)
}

/// Reads each virtio-net device's state. Nothing is in flight between two
/// queue services (each runs to completion on the event loop), so there is
/// nothing to drain.
fn save_nets(nets: &[NetSlot], first_slot: usize) -> Result<Vec<NetDeviceState>, Error> {
    let mut states = Vec::with_capacity(nets.len());
    for (i, n) in nets.iter().enumerate() {
        let mut t = n
            .transport
            .lock()
            .map_err(|_| Error::Internal("device lock poisoned".into()))?;
        t.device_mut().quiesce()?;
        states.push(NetDeviceState {
            slot: (first_slot + i) as u32,
            transport: t.state(),
            mac: n.mac,
            tap: n.tap.clone(),
            features: t.device().features(),
        });
    }
    Ok(states)
}

/// Largest vCPU count this host and this VMM allow.
pub fn max_vcpus(kvm: &Kvm) -> u8 {
    kvm.get_max_vcpus().min(usize::from(MAX_VCPUS)) as u8
}

static KVM_DEVICE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Makes every VM of this process use `path` instead of `/dev/kvm` (for
/// hosts that put it elsewhere, and for tests of the error paths). Only the
/// first call counts; false if the path was set before.
pub fn set_kvm_device_path(path: std::path::PathBuf) -> bool {
    KVM_DEVICE.set(path).is_ok()
}

/// The KVM device path: `/dev/kvm`, or the one given to
/// [`set_kvm_device_path`].
pub fn kvm_device_path() -> std::path::PathBuf {
    KVM_DEVICE
        .get()
        .cloned()
        .unwrap_or_else(|| "/dev/kvm".into())
}

/// Opens the KVM device with a clear error.
pub fn open_kvm() -> Result<Kvm, Error> {
    let path = kvm_device_path();
    let shown = path.display();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::KvmUnavailable(format!("{shown}: path has a NUL byte")))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => Error::KvmUnavailable(format!("{shown} does not exist (is the kvm module loaded, and does this host offer virtualization?)")),
        libc::EACCES | libc::EPERM => Error::KvmUnavailable(format!("{shown} is not accessible to this user (add the user to the kvm group, or run as root)")),
        _ => Error::KvmUnavailable(format!("cannot use {shown}: {e}")),
    })?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(Error::KvmUnavailable(format!(
            "{shown} is not a usable KVM device (KVM_GET_API_VERSION returned {v}, expected 12)"
        ))),
    }
}

impl MicroVm {
    /// Builds the VM: memory, KVM VM and irqchip, devices, kernel, vCPUs.
    /// Nothing runs until [`MicroVm::start`].
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        let kvm = open_kvm()?;
        check_vcpu_count(&kvm, config.vcpus)?;
        // Check the kernel is readable before allocating anything large.
        std::fs::File::open(&config.boot.kernel).map_err(|source| {
            Error::Load(loader::LoadError::Read {
                path: config.boot.kernel.clone(),
                source,
            })
        })?;
        let memory = create_guest_memory(config.mem_mib, &config.backing)?;
        let vm_fd = create_vm_fd(&kvm, &memory)?;
        check_device_count(config.disks.len() + config.nets.len())?;
        let blocks = attach_disks(&vm_fd, &config.disks)?;
        let nets = attach_nets(&vm_fd, blocks.len(), &config.nets)?;
        let boot = &config.boot;

        // Firmware tables, then the kernel (which gets the RSDP address).
        mptable::setup_mptable(&memory, config.vcpus)?;
        let rsdp = acpi::setup_acpi(&memory, config.vcpus, blocks.len() + nets.len())?;
        let loaded = loader::load(&memory, boot, Some(rsdp))?;
        info!(
            "loaded {:?} kernel, entry {:x?}, kernel end {:#x}, initrd {:x?}",
            loaded.format, loaded.entry, loaded.kernel_end, loaded.initrd
        );
        let (devices, platform) = build_devices(&vm_fd, config.serial, None)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpu_fds = Vec::with_capacity(config.vcpus as usize);
        let mut tsc_khz = 0;
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            let khz = fd.get_tsc_khz().ok().filter(|k| *k != 0);
            tsc_khz = khz.unwrap_or(0);
            let cpuid = cpuid::filter_cpuid(&supported, index, config.vcpus, khz)
                .map_err(|e| Error::Internal(format!("CPUID table: {e:?}")))?;
            fd.set_cpuid2(&cpuid)
                .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
            let msrs = msr::boot_msrs().map_err(|e| Error::Internal(format!("MSR list: {e:?}")))?;
            let written = fd
                .set_msrs(&msrs)
                .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
            if written != msrs.as_slice().len() {
                debug!(
                    "vCPU {index}: KVM took {written} of {} boot MSRs",
                    msrs.as_slice().len()
                );
            }
            fd.set_fpu(&boot_fpu())
                .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
            let mut lapic_state = fd.get_lapic().map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
            lapic::configure_lint(&mut lapic_state);
            fd.set_lapic(&lapic_state)
                .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))?;
            if index == 0 {
                let sregs = fd.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
                let sregs = setup_sregs(&memory, loaded.entry, sregs)?;
                fd.set_sregs(&sregs)
                    .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
                fd.set_regs(&boot_regs(loaded.entry))
                    .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
            }
            vcpu_fds.push(fd);
        }
        let machine = MachineState {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            regions: region_list(&memory),
            cmdline: config.boot.cmdline.clone(),
            tsc_khz,
            kernel: config.boot.kernel.display().to_string(),
            writer: String::new(),
        };
        let mut vm = Self::assemble(
            kvm,
            vm_fd,
            memory,
            devices,
            platform,
            vcpu_fds,
            machine,
            Some(loaded),
            config.serial_input,
        )?;
        vm.blocks = blocks;
        vm.nets = nets;
        Ok(vm)
    }

    /// Rebuilds a VM from a snapshot in this process. `memory` must already
    /// hold the guest's RAM (with the layout the snapshot records). The VM is
    /// left in [`RunState::Created`]: [`MicroVm::start`] or [`MicroVm::run`]
    /// resumes the guest where it was saved.
    pub fn restore(
        snapshot: &VmSnapshot,
        memory: GuestMemory,
        serial: SerialOutput,
        serial_input: bool,
        options: RestoreOptions,
    ) -> Result<Self, Error> {
        let shell = VmShell::new(memory)?;
        Self::restore_in(shell, snapshot, serial, serial_input, options)
    }

    /// [`MicroVm::restore`] into a [`VmShell`] made beforehand (while the
    /// RAM was still arriving), which takes creating the KVM VM and
    /// registering its memory off the restore's own time.
    pub fn restore_in(
        shell: VmShell,
        snapshot: &VmSnapshot,
        serial: SerialOutput,
        serial_input: bool,
        options: RestoreOptions,
    ) -> Result<Self, Error> {
        let t = std::time::Instant::now();
        let VmShell {
            kvm,
            vm_fd,
            memory,
            created,
            taps,
        } = shell;
        let machine = &snapshot.machine;
        check_vcpu_count(&kvm, machine.vcpus)?;
        if snapshot.vcpus.len() != usize::from(machine.vcpus) {
            return Err(Error::Snapshot(format!(
                "snapshot describes {} vCPUs but holds state for {}",
                machine.vcpus,
                snapshot.vcpus.len()
            )));
        }
        let regions = region_list(&memory);
        if regions != machine.regions {
            return Err(Error::Snapshot(format!(
                "snapshot RAM layout {:x?} does not match the guest memory {:x?}",
                machine.regions, regions
            )));
        }
        vstate::restore_vm(&vm_fd, &snapshot.vm)?;
        let (devices, platform) =
            build_devices(&vm_fd, serial, Some((&snapshot.serial, &snapshot.cmos)))?;
        check_device_count(snapshot.blocks.len() + snapshot.nets.len())?;
        let blocks = restore_disks(&vm_fd, &snapshot.blocks, options.disk_changed_ok)?;
        let nets = restore_nets(&vm_fd, blocks.len(), &snapshot.nets, &options.nets, taps)?;
        let devices_done = t.elapsed();
        let ctx = vstate::VcpuStateContext::new(&kvm, &vm_fd)?;
        let mut vcpu_fds = Vec::with_capacity(snapshot.vcpus.len());
        for (index, state) in snapshot.vcpus.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(index as u64)
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            check_tsc(&kvm, &fd, machine.tsc_khz, options.allow_tsc_mismatch)?;
            vstate::restore_vcpu(&fd, state, &ctx)?;
            vcpu_fds.push(fd);
        }
        debug!(
            "restore: KVM VM and memory slots (made beforehand) {:.1} ms, then VM state and devices after {:.1} ms, vCPUs after {:.1} ms",
            created.as_secs_f64() * 1e3,
            devices_done.as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64() * 1e3
        );
        let mut vm = Self::assemble(
            kvm,
            vm_fd,
            memory,
            devices,
            platform,
            vcpu_fds,
            machine.clone(),
            None,
            serial_input,
        )?;
        vm.blocks = blocks;
        vm.nets = nets;
        vm.kick_queues = true;
        Ok(vm)
    }

    /// Captures the complete state of the paused VM except its RAM.
    pub fn save_state(&mut self) -> Result<VmSnapshot, Error> {
        if self.state != RunState::Paused {
            return Err(Error::State(format!(
                "the VM must be paused to save its state (it is {:?})",
                self.state
            )));
        }
        let ctx = Arc::new(vstate::VcpuStateContext::new(&self.kvm, &self.vm_fd)?);
        let vm = vstate::save_vm(&self.vm_fd)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let ctx = Arc::clone(&ctx);
            vcpus.push(v.with(move |fd| vstate::save_vcpu(fd, &ctx))??);
        }
        let blocks = save_disks(&self.blocks)?;
        let nets = save_nets(&self.nets, self.blocks.len())?;
        let devices = self
            .devices
            .lock()
            .map_err(|_| Error::Internal("device lock poisoned".into()))?;
        Ok(VmSnapshot {
            blocks,
            nets,
            machine: self.machine.clone(),
            vm,
            vcpus,
            serial: devices.serial.state().into(),
            i8042: I8042State::default(),
            cmos: devices.cmos.state(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        kvm: Kvm,
        vm_fd: VmFd,
        memory: GuestMemory,
        devices: PioDevices,
        platform: PlatformEvents,
        vcpu_fds: Vec<VcpuFd>,
        machine: MachineState,
        loaded: Option<LoadedKernel>,
        serial_input: bool,
    ) -> Result<Self, Error> {
        let (control_tx, control_rx) = std::sync::mpsc::channel();
        Ok(MicroVm {
            kvm,
            vm_fd: Arc::new(vm_fd),
            memory,
            devices: Arc::new(Mutex::new(devices)),
            vcpu_count: machine.vcpus,
            vcpu_fds,
            vcpus: Vec::new(),
            exit: Arc::new(ExitNotifier::new().map_err(Error::Io)?),
            platform,
            state: RunState::Created,
            loaded,
            machine,
            serial_input,
            control_tx,
            control_rx,
            control_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?,
            blocks: Vec::new(),
            nets: Vec::new(),
            kick_queues: false,
        })
    }

    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), Error> {
        self.start_vcpus(false)
    }

    /// Starts every vCPU thread paused: no guest code runs until
    /// [`MicroVm::resume`] (a restore that waits for `cryo resume`).
    pub fn start_paused(&mut self) -> Result<(), Error> {
        self.start_vcpus(true)
    }

    fn start_vcpus(&mut self, paused: bool) -> Result<(), Error> {
        if self.state != RunState::Created {
            return Err(Error::State(format!(
                "cannot start a VM that is {:?}",
                self.state
            )));
        }
        let mmio = MmioBus::new(self.transports());
        for (index, fd) in self.vcpu_fds.drain(..).enumerate() {
            self.vcpus.push(VcpuHandle::spawn(
                index as u8,
                fd,
                Arc::clone(&self.devices),
                mmio.clone(),
                self.memory.clone(),
                Arc::clone(&self.exit),
                paused,
            )?);
        }
        if paused {
            for v in &self.vcpus {
                v.wait_for(VcpuResponse::Paused)?;
            }
            self.hold_devices(true)?;
        }
        self.state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(())
    }

    /// Stops all vCPUs; when this returns, guest state no longer changes.
    pub fn pause(&mut self) -> Result<(), Error> {
        match self.state {
            RunState::Paused => return Ok(()),
            RunState::Running => {}
            s => return Err(Error::State(format!("cannot pause a VM that is {s:?}"))),
        }
        for v in &self.vcpus {
            v.send(VcpuRequest::Pause)?;
        }
        for v in &self.vcpus {
            v.wait_for(VcpuResponse::Paused)?;
        }
        self.hold_devices(true)?;
        self.state = RunState::Paused;
        Ok(())
    }

    /// Holds every virtio device while the VM is paused, or lets them go
    /// and has the event loop serve what waited (see
    /// [`virtio::MmioTransport::hold`] and [`virtio::MmioTransport::kick`]).
    fn hold_devices(&self, held: bool) -> Result<(), Error> {
        for t in self.transports() {
            let mut t = t
                .lock()
                .map_err(|_| Error::Internal("device lock poisoned".into()))?;
            t.hold(held);
            if !held {
                t.kick().map_err(Error::Io)?;
            }
        }
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) -> Result<(), Error> {
        match self.state {
            RunState::Running => return Ok(()),
            RunState::Paused => {}
            s => return Err(Error::State(format!("cannot resume a VM that is {s:?}"))),
        }
        self.hold_devices(false)?;
        for v in &self.vcpus {
            v.send(VcpuRequest::Resume)?;
        }
        for v in &self.vcpus {
            v.wait_for(VcpuResponse::Resumed)?;
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// A handle for other threads (control API, signal handling) to act on
    /// the VM while [`MicroVm::run`] owns it.
    pub fn controller(&self) -> Result<VmController, Error> {
        Ok(VmController {
            tx: self.control_tx.clone(),
            evt: Arc::new(self.control_evt.try_clone().map_err(Error::Io)?),
            exit: Arc::clone(&self.exit),
        })
    }

    /// The run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Number of virtio-blk disks attached.
    pub fn disk_count(&self) -> usize {
        self.blocks.len()
    }

    /// Number of virtio devices (disks and network devices) attached.
    pub fn virtio_device_count(&self) -> usize {
        self.blocks.len() + self.nets.len()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The KVM memory slots as registered (slot, guest address, size, host
    /// address, flags 0): what dirty logging re-registers. Their mappings
    /// live as long as this VM.
    pub fn memory_slots(&self) -> Result<Vec<kvm_userspace_memory_region>, Error> {
        memory_slots(&self.memory)
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The port I/O devices.
    pub fn devices(&self) -> &Arc<Mutex<PioDevices>> {
        &self.devices
    }

    /// The virtio-blk devices, in MMIO slot order.
    pub fn blocks(&self) -> &[BlockSlot] {
        &self.blocks
    }

    /// The virtio-net devices, in MMIO slot order (after the disks).
    pub fn nets(&self) -> &[NetSlot] {
        &self.nets
    }

    /// Every virtio transport, in MMIO slot order.
    fn transports(&self) -> Vec<Arc<Mutex<virtio::MmioTransport>>> {
        let blocks = self.blocks.iter().map(|b| &b.transport);
        let nets = self.nets.iter().map(|n| &n.transport);
        blocks.chain(nets).map(Arc::clone).collect()
    }

    /// What was loaded and how the VM boots (None for a restored VM).
    pub fn loaded_kernel(&self) -> Option<&LoadedKernel> {
        self.loaded.as_ref()
    }

    /// The VM's shape (vCPUs, memory, command line, TSC frequency).
    pub fn machine(&self) -> &MachineState {
        &self.machine
    }

    /// The vCPU handles (running threads).
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<VmExitReason> {
        if let Some(r) = self.exit.reason() {
            return Some(r);
        }
        // The reset and power-off lines fire eventfds of their own.
        if self.platform.power_off.read().is_ok() {
            self.exit.notify(VmExitReason::PowerOff);
        } else if self.platform.reset.read().is_ok() {
            self.exit.notify(VmExitReason::Reset);
        }
        self.exit.reason()
    }

    /// Asks the VM to stop with `reason` (wakes [`MicroVm::run`]).
    pub fn request_stop(&self, reason: VmExitReason) {
        self.exit.notify(reason);
    }

    /// A handle that ends the VM from any context without waiting (for
    /// signal watchers and event-loop subscribers, which must not block on
    /// the event loop they run in).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.exit))
    }

    /// An event that becomes readable when the VM should stop.
    pub fn exit_event(&self) -> Result<EventFd, Error> {
        self.exit.event().try_clone().map_err(Error::Io)
    }

    /// Stops the vCPU threads and releases them.
    pub fn shutdown(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
        if let Ok(mut d) = self.devices.lock() {
            let _ = std::io::Write::flush(d.serial.writer_mut());
        }
        self.state = RunState::Stopped;
    }

    /// Starts the VM if needed and runs the event loop (serial input, exit
    /// events, and any `extra` subscribers) until the VM ends; returns why.
    pub fn run(
        &mut self,
        extra: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    ) -> Result<VmExitReason, Error> {
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        let done = Arc::new(AtomicBool::new(false));
        let watcher = Arc::new(Mutex::new(ExitWatcher {
            exit_evt: self.exit.event().try_clone().map_err(Error::Io)?,
            platform: self.platform.try_clone().map_err(Error::Io)?,
            control_evt: self.control_evt.try_clone().map_err(Error::Io)?,
            exit: Arc::clone(&self.exit),
            done: Arc::clone(&done),
        }));
        manager.add_subscriber(watcher);
        // Restores the terminal when the run ends, however it ends.
        let _terminal = self.serial_input.then(TerminalMode::enter);
        if self.serial_input {
            if let Some(input) = ConsoleInput::new(Arc::clone(&self.devices)).map_err(Error::Io)? {
                manager.add_subscriber(Arc::new(Mutex::new(input)));
            }
        }
        for s in extra {
            manager.add_subscriber(s);
        }
        if self.virtio_device_count() > 0 {
            let worker =
                QueueWorker::new(self.memory.clone(), &self.transports(), self.kick_queues)?;
            self.kick_queues = false;
            manager.add_subscriber(Arc::new(Mutex::new(worker)));
        }
        if self.state == RunState::Created {
            self.start()?;
        }
        while !done.load(Ordering::Acquire) {
            manager
                .run()
                .map_err(|e| Error::EventLoop(format!("{e:?}")))?;
            while let Ok(call) = self.control_rx.try_recv() {
                call(self);
            }
            if self.exit.reason().is_some() {
                done.store(true, Ordering::Release);
            }
        }
        let reason = self
            .exit_reason()
            .unwrap_or_else(|| VmExitReason::Error("VM ended without a reason".into()));
        self.shutdown();
        Ok(reason)
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl From<VcpuError> for Error {
    fn from(e: VcpuError) -> Self {
        Error::Vcpu(e)
    }
}

/// The guest's reset and power-off lines, as eventfds the event loop watches.
struct PlatformEvents {
    reset: EventFd,
    power_off: EventFd,
}

impl PlatformEvents {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(PlatformEvents {
            reset: self.reset.try_clone()?,
            power_off: self.power_off.try_clone()?,
        })
    }
}

struct ExitWatcher {
    exit_evt: EventFd,
    platform: PlatformEvents,
    control_evt: EventFd,
    exit: Arc<ExitNotifier>,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.platform.reset.as_raw_fd() {
            let _ = self.platform.reset.read();
            info!("guest reset (i8042 or ACPI reset register)");
            self.exit.notify(VmExitReason::Reset);
        } else if events.fd() == self.platform.power_off.as_raw_fd() {
            let _ = self.platform.power_off.read();
            info!("guest powered off (ACPI S5)");
            self.exit.notify(VmExitReason::PowerOff);
        } else if events.fd() == self.control_evt.as_raw_fd() {
            // The run loop drains the control calls after this returns.
            let _ = self.control_evt.read();
        } else {
            let _ = self.exit_evt.read();
        }
        if self.exit.reason().is_some() {
            self.done.store(true, Ordering::Release);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.exit_evt, EventSet::IN));
        let _ = ops.add(Events::new(&self.platform.reset, EventSet::IN));
        let _ = ops.add(Events::new(&self.platform.power_off, EventSet::IN));
        let _ = ops.add(Events::new(&self.control_evt, EventSet::IN));
    }
}
