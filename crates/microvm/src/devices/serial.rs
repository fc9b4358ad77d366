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
