//! The VMM's standard input as the guest's console input.
//!
//! Bytes read from stdin go into COM1's receive FIFO. The FIFO is small (64
//! bytes), so input that does not fit is held back, and stdin is not read
//! again, until the guest has emptied the FIFO (the serial device signals
//! that through [`super::serial::InputReady`]). Nothing typed or piped in is
//! dropped, however fast it comes.
//!
//! When stdin is a terminal, [`TerminalMode`] switches it to non-canonical,
//! no-echo mode for the life of the VM, so that each key reaches the guest
//! as it is typed and the guest's own echo is the only one. Signal keys
//! (Ctrl-C) keep their meaning for the VMM. A VMM started in the background
//! of a shell leaves the terminal alone: reading it would stop the process
//! (SIGTTIN).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::debug;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::PioDevices;

/// Largest read from stdin at a time.
const READ_CHUNK: usize = 256;

/// Feeds the VMM's stdin to COM1 without losing bytes.
pub struct ConsoleInput {
    devices: Arc<Mutex<PioDevices>>,
    input_ready: EventFd,
    pending: VecDeque<u8>,
    watching_stdin: bool,
    stdin_open: bool,
}

impl ConsoleInput {
    /// Console input for `devices`' COM1, or `None` when stdin should not be
    /// read (a terminal that belongs to another, foreground process group).
    pub fn new(devices: Arc<Mutex<PioDevices>>) -> io::Result<Option<Self>> {
        if stdin_is_background_terminal() {
            debug!("stdin is a terminal owned by another process group: no console input");
            return Ok(None);
        }
        let input_ready = {
            let d = devices
                .lock()
                .map_err(|_| io::Error::other("device lock poisoned"))?;
            d.serial.events().0.try_clone()?
        };
        Ok(Some(ConsoleInput {
            devices,
            input_ready,
            pending: VecDeque::new(),
            watching_stdin: true,
            stdin_open: true,
        }))
    }

    /// Moves held-back input into the FIFO, as far as it has room.
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Ok(mut d) = self.devices.lock() else {
            return;
        };
        let room = d.serial.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        if let Err(e) = d.serial.enqueue_raw_bytes(&chunk) {
            // Only the interrupt trigger can fail here; the bytes are queued.
            debug!("console input: raising the receive interrupt failed: {e:?}");
        }
    }

    fn read_stdin(&mut self) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        match read_stdin_fd(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => {
                debug!("console input: stdin: {e}");
                false
            }
        }
    }

    /// Watches stdin only while nothing is held back.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = self.stdin_open && self.pending.is_empty();
        if want != self.watching_stdin {
            let stdin = io::stdin();
            let event = Events::new(&stdin, EventSet::IN);
            let result = if want {
                ops.add(event)
            } else {
                ops.remove(event)
            };
            if let Err(e) = result {
                debug!("console input: cannot change the stdin watch: {e:?}");
            }
            self.watching_stdin = want;
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
        } else if events.event_set().contains(EventSet::IN) {
            self.stdin_open = self.read_stdin();
        } else {
            // Hang-up or error without data: the input has ended.
            self.stdin_open = false;
        }
        self.flush_pending();
        self.update_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            debug!("console input: cannot watch the input-ready event: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&io::stdin(), EventSet::IN)) {
            // A stdin that epoll cannot watch (a regular file, /dev/null) is
            // read nowhere: the guest gets no console input.
            debug!("console input: cannot watch stdin: {e:?}");
            self.stdin_open = false;
            self.watching_stdin = false;
        }
    }
}

/// Reads fd 0 itself, not through `std::io::stdin()`: std's stdin is
/// buffered (8 KiB), so a 256-byte read through it takes everything the
/// pipe holds and hands back 256 bytes; the rest sits in std's buffer,
/// where epoll cannot see it, until more input arrives. A line longer than
/// 256 bytes stopped at its 256th byte that way.
fn read_stdin_fd(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads at most buf.len() bytes into memory we own.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(libc::STDIN_FILENO) }
}

fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// Whether stdin is a terminal whose foreground process group is not ours.
fn stdin_is_background_terminal() -> bool {
    let fd = stdin_fd();
    if !is_terminal(fd) {
        return false;
    }
    // SAFETY: tcgetpgrp and getpgrp only query process state.
    let (foreground, ours) = unsafe { (libc::tcgetpgrp(fd.as_raw_fd()), libc::getpgrp()) };
    foreground != ours
}

/// Puts a terminal stdin into non-canonical, no-echo mode until dropped.
pub struct TerminalMode {
    saved: Option<libc::termios>,
}

impl TerminalMode {
    /// Switches stdin if it is a terminal in our foreground; otherwise does nothing.
    pub fn enter() -> TerminalMode {
        let fd = stdin_fd();
        if !is_terminal(fd) || stdin_is_background_terminal() {
            return TerminalMode { saved: None };
        }
        // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the termios we own.
        if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut saved) } != 0 {
            return TerminalMode { saved: None };
        }
        let mut raw = saved;
        // Keys go to the guest one by one and unechoed; the guest echoes.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        // Ctrl-S/Ctrl-Q and carriage returns are the guest's to interpret.
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: tcsetattr reads the termios we own.
        if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &raw) } != 0 {
            return TerminalMode { saved: None };
        }
        TerminalMode { saved: Some(saved) }
    }
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: tcsetattr reads the termios we saved at entry.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}
