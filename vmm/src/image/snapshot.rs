//! The device state of a saved VM as migration-stream sections: encoding a
//! [`VmSnapshot`], and rebuilding one from sections read back, checking that
//! each is known, of a version we read (every version back to 1, each
//! through its own layout: see [`StateSection`] and docs/versions.md), and
//! present.

use microvm::devices::virtio::state::{BlockDeviceState, NetDeviceState};
use microvm::persist::{
    CmosState, I8042State, MachineState, SectionError, SerialState, StateSection, VcpuState,
    VmSnapshot, VmState,
};
use migration_stream::{Section, StreamError, StreamWriter};

use super::sections;

/// The program and version recorded as the writer of every image.
pub fn writer_version() -> String {
    format!("cryo {}", env!("CARGO_PKG_VERSION"))
}

/// Why device-state sections do not make a VM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The stream holding the sections is damaged.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A section could not be read (a newer version, or damaged bytes).
    #[error("section '{name}' instance {instance}: {source}")]
    Section {
        /// Section name.
        name: String,
        /// Instance.
        instance: u32,
        /// Why.
        #[source]
        source: SectionError,
    },
    /// A section came before the machine section.
    #[error("section '{0}' comes before the machine section")]
    BeforeMachine(String),
    /// The machine section appeared twice.
    #[error("two machine sections")]
    TwoMachines,
    /// The machine section contradicts itself.
    #[error(
        "machine section is inconsistent: {mem_mib} MiB in regions {regions:x?}, {vcpus} vCPUs"
    )]
    InconsistentMachine {
        /// Memory size.
        mem_mib: u64,
        /// Regions recorded.
        regions: Vec<(u64, u64)>,
        /// vCPUs recorded.
        vcpus: u8,
    },
    /// A vCPU section for a vCPU the machine does not have.
    #[error("vcpu section for vCPU {index} of {count}")]
    VcpuOutOfRange {
        /// Instance in the section.
        index: u32,
        /// vCPUs of the machine.
        count: usize,
    },
    /// A section this cryo does not know.
    #[error(
        "unknown section '{name}' (instance {instance}, version {version}): saved by a newer cryo?"
    )]
    Unknown {
        /// Name.
        name: String,
        /// Instance.
        instance: u32,
        /// Version.
        version: u32,
    },
    /// A section is missing.
    #[error("no {0} section")]
    Missing(String),
    /// A vCPU's section is missing.
    #[error("no vcpu section for vCPU {0}")]
    MissingVcpu(usize),
    /// Device state that holds RAM records.
    #[error("device state holds RAM records")]
    HoldsRam,
    /// A virtio-blk section after a virtio-net one (disks take the first slots).
    #[error("virtio-blk section instance {0} comes after a virtio-net section")]
    DiskAfterNet(u32),
    /// A virtio section out of slot order, or whose slot is not its
    /// instance (disks take slots 0, 1, ..., network devices the next ones).
    #[error("{name} section instance {instance} (slot {slot}) out of order: expected {expected}")]
    DeviceOutOfOrder {
        /// The section.
        name: &'static str,
        /// Instance of the section.
        instance: u32,
        /// Slot recorded inside it.
        slot: u32,
        /// The instance expected next.
        expected: usize,
    },
}

/// Writes `state` as its section, in its current version.
fn write_one<W: std::io::Write, T: StateSection>(
    w: &mut StreamWriter<W>,
    instance: u32,
    state: &T,
) -> Result<(), StreamError> {
    w.write_section(T::NAME, instance, T::VERSION, state)
}

/// Writes every device-state section of `snapshot`, recording this cryo as
/// the writer.
pub fn write_sections<W: std::io::Write>(
    w: &mut StreamWriter<W>,
    snapshot: &VmSnapshot,
) -> Result<(), StreamError> {
    let machine = MachineState {
        writer: writer_version(),
        ..snapshot.machine.clone()
    };
    write_one(w, 0, &machine)?;
    write_one(w, 0, &snapshot.vm)?;
    for (i, v) in snapshot.vcpus.iter().enumerate() {
        write_one(w, i as u32, v)?;
    }
    write_one(w, 0, &snapshot.serial)?;
    write_one(w, 0, &snapshot.i8042)?;
    write_one(w, 0, &snapshot.cmos)?;
    for b in &snapshot.blocks {
        write_one(w, b.slot, b)?;
    }
    for n in &snapshot.nets {
        write_one(w, n.slot, n)?;
    }
    Ok(())
}

/// Decodes `s` as a `T`, through the layout of its version.
fn read<T: StateSection>(s: &Section) -> Result<T, DeviceStateError> {
    T::decode_versioned(s.version, &s.data).map_err(|source| DeviceStateError::Section {
        name: s.name.clone(),
        instance: s.instance,
        source,
    })
}

/// Checks that virtio section `s`, recording `slot`, is the device
/// expected next: sections come in slot order, each slot once, and the
/// instance is the slot.
fn in_slot_order(s: &Section, slot: u32, expected: usize) -> Result<(), DeviceStateError> {
    if slot != s.instance || s.instance as usize != expected {
        let name = if s.name == sections::VIRTIO_NET {
            sections::VIRTIO_NET
        } else {
            sections::VIRTIO_BLK
        };
        return Err(DeviceStateError::DeviceOutOfOrder {
            name,
            instance: s.instance,
            slot,
            expected,
        });
    }
    Ok(())
}

/// Collects sections into a [`VmSnapshot`].
#[derive(Default)]
pub struct SnapshotBuilder {
    machine: Option<MachineState>,
    vm: Option<VmState>,
    vcpus: Vec<Option<VcpuState>>,
    serial: Option<SerialState>,
    i8042: Option<I8042State>,
    cmos: Option<CmosState>,
    blocks: Vec<BlockDeviceState>,
    nets: Vec<NetDeviceState>,
}

impl SnapshotBuilder {
    /// The machine section, once seen.
    pub fn machine(&self) -> Option<&MachineState> {
        self.machine.as_ref()
    }

    /// Takes one section.
    pub fn add(&mut self, s: &Section) -> Result<(), DeviceStateError> {
        if self.machine.is_none() && s.name != sections::MACHINE {
            return Err(DeviceStateError::BeforeMachine(s.name.clone()));
        }
        match s.name.as_str() {
            sections::MACHINE => {
                if self.machine.is_some() {
                    return Err(DeviceStateError::TwoMachines);
                }
                let m: MachineState = read(s)?;
                let layout = microvm::memory::ram_ranges(m.mem_mib.saturating_mul(1 << 20));
                let expected: Vec<(u64, u64)> = layout.iter().map(|r| (r.start, r.len)).collect();
                if m.regions != expected || m.vcpus == 0 || m.mem_mib < microvm::memory::MIN_MEM_MIB
                {
                    return Err(DeviceStateError::InconsistentMachine {
                        mem_mib: m.mem_mib,
                        regions: m.regions,
                        vcpus: m.vcpus,
                    });
                }
                self.vcpus = vec![None; usize::from(m.vcpus)];
                self.machine = Some(m);
            }
            sections::KVM_VM => self.vm = Some(read(s)?),
            sections::VCPU => {
                let count = self.vcpus.len();
                let slot = self.vcpus.get_mut(s.instance as usize).ok_or(
                    DeviceStateError::VcpuOutOfRange {
                        index: s.instance,
                        count,
                    },
                )?;
                *slot = Some(read(s)?);
            }
            sections::SERIAL => self.serial = Some(read(s)?),
            sections::I8042 => self.i8042 = Some(read(s)?),
            sections::CMOS => self.cmos = Some(read(s)?),
            sections::VIRTIO_BLK => {
                let b: BlockDeviceState = read(s)?;
                if !self.nets.is_empty() {
                    return Err(DeviceStateError::DiskAfterNet(s.instance));
                }
                in_slot_order(s, b.slot, self.blocks.len())?;
                self.blocks.push(b);
            }
            sections::VIRTIO_NET => {
                let n: NetDeviceState = read(s)?;
                in_slot_order(s, n.slot, self.blocks.len() + self.nets.len())?;
                self.nets.push(n);
            }
            other => {
                return Err(DeviceStateError::Unknown {
                    name: other.to_string(),
                    instance: s.instance,
                    version: s.version,
                })
            }
        }
        Ok(())
    }

    /// The snapshot, if every section is there.
    pub fn finish(self) -> Result<VmSnapshot, DeviceStateError> {
        let missing = |what: &str| DeviceStateError::Missing(what.to_string());
        let machine = self.machine.ok_or_else(|| missing(sections::MACHINE))?;
        let vcpus = self
            .vcpus
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.ok_or(DeviceStateError::MissingVcpu(i)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmSnapshot {
            machine,
            vm: self.vm.ok_or_else(|| missing(sections::KVM_VM))?,
            vcpus,
            serial: self.serial.ok_or_else(|| missing(sections::SERIAL))?,
            i8042: self.i8042.ok_or_else(|| missing(sections::I8042))?,
            cmos: self.cmos.ok_or_else(|| missing(sections::CMOS))?,
            blocks: self.blocks,
            nets: self.nets,
        })
    }
}

/// Encodes the device state alone as a complete stream (for fixed-ram images).
pub fn encode(snapshot: &VmSnapshot, page_size: u32) -> Result<Vec<u8>, StreamError> {
    let mut w = StreamWriter::new(Vec::new(), page_size)?;
    write_sections(&mut w, snapshot)?;
    w.finish()
}

/// Decodes a device-state stream (sections only) into a snapshot.
pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, DeviceStateError> {
    let mut r = migration_stream::StreamReader::new(bytes)?;
    let mut b = SnapshotBuilder::default();
    while let Some(rec) = r.next_record()? {
        match rec {
            migration_stream::Record::Section(s) => b.add(&s)?,
            migration_stream::Record::End => {}
            _ => return Err(DeviceStateError::HoldsRam),
        }
    }
    b.finish()
}
