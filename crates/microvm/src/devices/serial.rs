//! COM1: vm-superio's 16550 with its interrupt wired to an irqfd and its
//! output going to stdout, a file, or nowhere.

use std::fs::File;
use std::io::{self, LineWriter, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// An eventfd as vm-superio's interrupt/reset trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// A new non-blocking eventfd trigger.
    pub fn new() -> io::Result<Self> {
        Ok(EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(File),
    /// Discarded.
    Sink,
}

/// Serial output, flushed at every line end so that readers see whole lines promptly.
pub struct SerialWriter(LineWriter<Box<dyn Write + Send>>);

impl Write for SerialWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A full pipe or a closed reader must not stop the guest.
        match self.0.write(buf) {
            Ok(n) => Ok(n),
            Err(_) => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Signals, through an eventfd, that the guest has emptied the receive
/// FIFO, so that console input held back for lack of room can go in.
#[derive(Debug)]
pub struct InputReady(pub EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A full eventfd counter only means a wake-up is already pending.
        let _ = self.0.write(1);
    }
}

/// The COM1 device as the VM uses it.
pub type SerialDevice = Serial<EventFdTrigger, InputReady, SerialWriter>;

/// 16550 register offsets and bits that [`guest_read`] looks at.
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const LSR: u8 = 5;
const LCR_DLAB: u8 = 0x80;
const IER_RECEIVED_DATA: u8 = 0x01;
const LSR_DATA_READY: u8 = 0x01;
const IIR_NO_INTERRUPT: u8 = 0x01;
const IIR_RECEIVED_DATA: u8 = 0x04;
const IIR_ID_BITS: u8 = 0x0f;

/// A guest read of COM1's register `offset`, where the interrupt
/// identification reads "received data" while the FIFO still holds bytes,
/// as a real 16550's does (its received-data and character-timeout
/// interrupts stay pending until the FIFO is read).
///
/// vm-superio clears the received-data identification at every read of the
/// data register, even when bytes remain. Linux's 8250 driver reads at most
/// 256 bytes per call and then asks the identification register again
/// (its interrupt handler loops until the UART reports nothing pending): on
/// vm-superio alone that said "nothing", the driver left the rest in the
/// FIFO with no interrupt to come, and the console input behind it
/// ([`super::console`]), which refills the FIFO only once it is empty,
/// stalled. No extra interrupt is raised: the handler's own loop reads on.
pub fn guest_read(serial: &mut SerialDevice, offset: u8) -> u8 {
    let value = serial.read(offset);
    if offset != IIR || value & IIR_NO_INTERRUPT == 0 {
        return value;
    }
    // LCR, LSR and IER reads have no side effects. With DLAB set, offset 1
    // is the divisor, not IER (IIR itself is not shadowed).
    let dlab = serial.read(LCR) & LCR_DLAB != 0;
    let data_left = serial.read(LSR) & LSR_DATA_READY != 0;
    let interrupt_enabled = !dlab && serial.read(IER) & IER_RECEIVED_DATA != 0;
    if data_left && interrupt_enabled {
        (value & !IIR_ID_BITS) | IIR_RECEIVED_DATA
    } else {
        value
    }
}

fn writer(output: SerialOutput) -> SerialWriter {
    let out: Box<dyn Write + Send> = match output {
        SerialOutput::Stdout => Box::new(io::stdout()),
        SerialOutput::File(f) => Box::new(f),
        SerialOutput::Sink => Box::new(io::sink()),
    };
    SerialWriter(LineWriter::new(out))
}

/// Builds COM1 with its interrupt trigger and output.
pub fn new_serial(trigger: EventFdTrigger, output: SerialOutput) -> io::Result<SerialDevice> {
    let ready = InputReady(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok(Serial::with_events(trigger, ready, writer(output)))
}

/// Rebuilds COM1 from saved registers and FIFO contents.
pub fn restore_serial(
    trigger: EventFdTrigger,
    output: SerialOutput,
    state: &crate::persist::SerialState,
) -> Result<SerialDevice, RestoreSerialError> {
    let ready = InputReady(EventFd::new(libc::EFD_NONBLOCK).map_err(RestoreSerialError::EventFd)?);
    Serial::from_state(&state.into(), trigger, ready, writer(output))
        .map_err(|e| RestoreSerialError::State(format!("{e:?}")))
}

/// Why COM1 could not be rebuilt from saved state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreSerialError {
    /// The input-ready eventfd could not be made.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    /// vm-superio refused the saved registers or FIFO.
    #[error("saved serial state refused: {0}")]
    State(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: u8 = 0;

    fn com1() -> (SerialDevice, EventFd) {
        let trigger = EventFdTrigger::new().unwrap();
        let irq = trigger.0.try_clone().unwrap();
        let mut serial = new_serial(trigger, SerialOutput::Sink).unwrap();
        serial.write(IER, IER_RECEIVED_DATA).unwrap();
        (serial, irq)
    }

    fn raised(irq: &EventFd) -> bool {
        irq.read().is_ok()
    }

    #[test]
    fn received_data_stays_identified_until_the_fifo_is_empty() {
        let (mut serial, irq) = com1();
        serial.enqueue_raw_bytes(b"abc").unwrap();
        assert!(raised(&irq));
        assert_eq!(
            guest_read(&mut serial, IIR) & IIR_ID_BITS,
            IIR_RECEIVED_DATA
        );
        assert_eq!(guest_read(&mut serial, DATA), b'a');
        // A driver that stops reading here (Linux's 256-byte budget) and
        // asks again is told there is more.
        assert_eq!(
            guest_read(&mut serial, IIR) & IIR_ID_BITS,
            IIR_RECEIVED_DATA
        );
        assert_eq!(guest_read(&mut serial, DATA), b'b');
        assert_eq!(guest_read(&mut serial, DATA), b'c');
        // The last byte read: nothing identified, and no interrupt raised
        // along the way.
        assert_eq!(guest_read(&mut serial, IIR) & IIR_ID_BITS, IIR_NO_INTERRUPT);
        assert!(!raised(&irq));
    }

    #[test]
    fn with_the_receive_interrupt_disabled_reads_are_vm_superios() {
        let (mut serial, irq) = com1();
        serial.write(IER, 0).unwrap();
        serial.enqueue_raw_bytes(b"ab").unwrap();
        assert!(!raised(&irq));
        assert_eq!(guest_read(&mut serial, DATA), b'a');
        assert!(!raised(&irq));
        assert_eq!(guest_read(&mut serial, IIR) & IIR_ID_BITS, IIR_NO_INTERRUPT);
    }

    #[test]
    fn with_dlab_set_the_divisor_reads_through() {
        let (mut serial, irq) = com1();
        serial.enqueue_raw_bytes(b"ab").unwrap();
        let _ = raised(&irq);
        serial.write(LCR, LCR_DLAB).unwrap();
        serial.write(DATA, 0x0c).unwrap();
        assert_eq!(guest_read(&mut serial, DATA), 0x0c);
        assert!(!raised(&irq));
    }
}
