//! The device state of a saved VM as migration-stream sections: encoding a
//! [`VmSnapshot`], and rebuilding one from sections read back, checking that
//! each is known, of a version we read, and present.

use microvm::devices::virtio::state::{BlockDeviceState, VIRTIO_BLK_STATE_VERSION};
use microvm::persist::{
    CmosState, I8042State, MachineState, SerialState, VcpuState, VmSnapshot, VmState,
    CMOS_STATE_VERSION, I8042_STATE_VERSION, MACHINE_STATE_VERSION, SERIAL_STATE_VERSION,
    VCPU_STATE_VERSION, VM_STATE_VERSION,
};
use migration_stream::{Section, StreamError, StreamWriter};

use super::sections;

/// Writes every device-state section of `snapshot`.
pub fn write_sections<W: std::io::Write>(
    w: &mut StreamWriter<W>,
    snapshot: &VmSnapshot,
) -> Result<(), StreamError> {
    w.write_section(
        sections::MACHINE,
        0,
        MACHINE_STATE_VERSION,
        &snapshot.machine,
    )?;
    w.write_section(sections::KVM_VM, 0, VM_STATE_VERSION, &snapshot.vm)?;
    for (i, v) in snapshot.vcpus.iter().enumerate() {
        w.write_section(sections::VCPU, i as u32, VCPU_STATE_VERSION, v)?;
    }
    w.write_section(sections::SERIAL, 0, SERIAL_STATE_VERSION, &snapshot.serial)?;
    w.write_section(sections::I8042, 0, I8042_STATE_VERSION, &snapshot.i8042)?;
    w.write_section(sections::CMOS, 0, CMOS_STATE_VERSION, &snapshot.cmos)?;
    for b in &snapshot.blocks {
        w.write_section(sections::VIRTIO_BLK, b.slot, VIRTIO_BLK_STATE_VERSION, b)?;
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
}

impl SnapshotBuilder {
    /// The machine section, once seen.
    pub fn machine(&self) -> Option<&MachineState> {
        self.machine.as_ref()
    }

    /// Takes one section. Errors are one-line reasons.
    pub fn add(&mut self, s: &Section) -> Result<(), String> {
        let dec = |e: StreamError| e.to_string();
        if self.machine.is_none() && s.name != sections::MACHINE {
            return Err(format!(
                "section '{}' comes before the machine section",
                s.name
            ));
        }
        match s.name.as_str() {
            sections::MACHINE => {
                if self.machine.is_some() {
                    return Err("two machine sections".into());
                }
                let m: MachineState = s.decode(MACHINE_STATE_VERSION).map_err(dec)?;
                let layout = microvm::memory::ram_ranges(m.mem_mib.saturating_mul(1 << 20));
                let expected: Vec<(u64, u64)> = layout.iter().map(|r| (r.start, r.len)).collect();
                if m.regions != expected || m.vcpus == 0 || m.mem_mib < microvm::memory::MIN_MEM_MIB
                {
                    return Err(format!(
                        "machine section is inconsistent: {} MiB in regions {:x?}, {} vCPUs",
                        m.mem_mib, m.regions, m.vcpus
                    ));
                }
                self.vcpus = vec![None; usize::from(m.vcpus)];
                self.machine = Some(m);
            }
            sections::KVM_VM => self.vm = Some(s.decode(VM_STATE_VERSION).map_err(dec)?),
            sections::VCPU => {
                let count = self.vcpus.len();
                let slot = self
                    .vcpus
                    .get_mut(s.instance as usize)
                    .ok_or_else(|| format!("vcpu section for vCPU {} of {count}", s.instance))?;
                *slot = Some(s.decode(VCPU_STATE_VERSION).map_err(dec)?);
            }
            sections::SERIAL => self.serial = Some(s.decode(SERIAL_STATE_VERSION).map_err(dec)?),
            sections::I8042 => self.i8042 = Some(s.decode(I8042_STATE_VERSION).map_err(dec)?),
            sections::CMOS => self.cmos = Some(s.decode(CMOS_STATE_VERSION).map_err(dec)?),
            sections::VIRTIO_BLK => {
                let b: BlockDeviceState = s.decode(VIRTIO_BLK_STATE_VERSION).map_err(dec)?;
                // Sections come in slot order, each slot once, matching its instance.
                if b.slot != s.instance || s.instance as usize != self.blocks.len() {
                    return Err(format!(
                        "virtio-blk section instance {} (slot {}) out of order: expected {}",
                        s.instance,
                        b.slot,
                        self.blocks.len()
                    ));
                }
                self.blocks.push(b);
            }
            other => {
                return Err(format!(
                    "unknown section '{other}' (instance {}, version {}): saved by a newer cryo?",
                    s.instance, s.version
                ))
            }
        }
        Ok(())
    }

    /// The snapshot, if every section is there.
    pub fn finish(self) -> Result<VmSnapshot, String> {
        let machine = self.machine.ok_or("no machine section")?;
        let vcpus = self
            .vcpus
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.ok_or_else(|| format!("no vcpu section for vCPU {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = |what: &str| format!("no {what} section");
        Ok(VmSnapshot {
            machine,
            vm: self.vm.ok_or_else(|| missing(sections::KVM_VM))?,
            vcpus,
            serial: self.serial.ok_or_else(|| missing(sections::SERIAL))?,
            i8042: self.i8042.ok_or_else(|| missing(sections::I8042))?,
            cmos: self.cmos.ok_or_else(|| missing(sections::CMOS))?,
            blocks: self.blocks,
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
pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, String> {
    let mut r = migration_stream::StreamReader::new(bytes).map_err(|e| e.to_string())?;
    let mut b = SnapshotBuilder::default();
    while let Some(rec) = r.next_record().map_err(|e| e.to_string())? {
        match rec {
            migration_stream::Record::Section(s) => b.add(&s)?,
            migration_stream::Record::End => {}
            _ => return Err("device state holds RAM records".into()),
        }
    }
    b.finish()
}
