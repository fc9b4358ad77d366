//! vCPU threads: each runs KVM_RUN in a loop, handles port I/O exits against
//! the device bus, and obeys pause / resume / exit requests from other threads.
//!
//! Pausing is race free: a request is queued first, then the thread is kicked
//! with a real-time signal whose handler sets `kvm_run.immediate_exit`. A
//! KVM_RUN that starts after the signal returns EINTR at once; one already
//! running is interrupted. Before reporting "paused" the thread enters KVM_RUN
//! once more with `immediate_exit` set, so that KVM completes any pending
//! port I/O: the saved register state is then exact.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::virtio::bus::MmioBus;
use crate::devices::PioDevices;
use crate::memory::GuestMemory;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset itself (i8042 reset line, or a KVM reset system event).
    Reset,
    /// The guest asked to power off.
    PowerOff,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN); Linux does this on `reboot=t`.
    TripleFault,
    /// The host asked the VM to stop.
    Stopped,
    /// Something failed: an unhandled exit, a KVM error, a guest crash event.
    Error(String),
}

impl VmExitReason {
    /// Whether this is a clean end (the guest or host asked for it).
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExitReason::Error(_))
    }
}

/// What the controller asks of a vCPU thread.
pub enum VcpuRequest {
    /// Stop running guest code and wait.
    Pause,
    /// Go on running guest code.
    Resume,
    /// Run a closure on the vCPU (only while paused), e.g. to read or write its state.
    With(Box<dyn FnOnce(&mut VcpuFd) + Send>),
    /// End the thread.
    Exit,
}

/// What a vCPU thread answers.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    /// Paused: guest state is stable.
    Paused,
    /// Running again.
    Resumed,
    /// A `With` closure ran.
    Done,
}

thread_local! {
    // The running vCPU's kvm_run page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches a const-initialized thread local and a byte of the
    // kvm_run page: async-signal-safe.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` points at this thread's kvm_run mapping, which lives
            // as long as the VcpuFd the thread owns; the pointer is cleared
            // before the VcpuFd is dropped. A volatile byte store is what
            // KVM documents for immediate_exit.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
        }
    });
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler);
    });
    result
}

/// Shared by the vCPU threads: where they report why the VM ended.
pub struct ExitNotifier {
    reason: Mutex<Option<VmExitReason>>,
    event: EventFd,
}

impl ExitNotifier {
    /// A notifier with a fresh eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` (the first one wins) and wakes the event loop.
    pub fn notify(&self, reason: VmExitReason) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some(reason);
            }
        }
        let _ = self.event.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// The eventfd that becomes readable on notify.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// Errors controlling vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be started.
    #[error("cannot start vCPU {0} thread: {1}")]
    Spawn(u8, std::io::Error),
    /// The signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The thread is gone (the VM stopped).
    #[error("vCPU {0} is not running (the VM has stopped)")]
    Gone(u8),
    /// The thread did not answer in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// The thread answered something unexpected.
    #[error("vCPU {0} answered {1:?}, expected {2:?}")]
    Unexpected(u8, VcpuResponse, VcpuResponse),
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    index: u8,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

/// How long a vCPU may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// Starts a thread running `fd` as vCPU `index`; with `paused`, the
    /// thread pauses before it runs any guest code (answering `Paused`)
    /// until it is resumed.
    pub fn spawn(
        index: u8,
        fd: VcpuFd,
        devices: Arc<Mutex<PioDevices>>,
        mmio: MmioBus,
        memory: GuestMemory,
        exit: Arc<ExitNotifier>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler().map_err(VcpuError::Signal)?;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        if paused {
            // Queued before the thread exists: its first act is to pause.
            let _ = req_tx.send(VcpuRequest::Pause);
        }
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let mut vcpu = VcpuThread {
                    index,
                    fd,
                    devices,
                    mmio,
                    memory,
                    exit,
                    requests: req_rx,
                    responses: resp_tx,
                };
                vcpu.run();
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            requests: req_tx,
            responses: resp_rx,
            thread: Some(thread),
        })
    }

    /// The vCPU index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t belongs to a thread we own and have not
            // joined yet, so it is valid; the signal has a handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Sends a request (kicking the thread out of KVM_RUN) without waiting.
    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.requests
            .send(req)
            .map_err(|_| VcpuError::Gone(self.index))?;
        self.kick();
        Ok(())
    }

    /// Waits for the thread's answer.
    pub fn wait_for(&self, expected: VcpuResponse) -> Result<(), VcpuError> {
        match self.responses.recv_timeout(ANSWER_TIMEOUT) {
            Ok(r) if r == expected => Ok(()),
            Ok(r) => Err(VcpuError::Unexpected(self.index, r, expected)),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.index, ANSWER_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Runs `f` on the paused vCPU's fd and returns its result.
    pub fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> T + Send + 'static,
    ) -> Result<T, VcpuError> {
        let (tx, rx) = channel();
        self.send(VcpuRequest::With(Box::new(move |fd| {
            let _ = tx.send(f(fd));
        })))?;
        self.wait_for(VcpuResponse::Done)?;
        rx.recv().map_err(|_| VcpuError::Gone(self.index))
    }

    /// Asks the thread to end and joins it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuRequest::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct VcpuThread {
    index: u8,
    fd: VcpuFd,
    devices: Arc<Mutex<PioDevices>>,
    mmio: MmioBus,
    memory: GuestMemory,
    exit: Arc<ExitNotifier>,
    requests: Receiver<VcpuRequest>,
    responses: Sender<VcpuResponse>,
}

/// What the run loop does next.
enum Next {
    Continue,
    Stop(VmExitReason),
}

impl VcpuThread {
    fn run(&mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        // Starts running at once; the controller pauses it if it wants.
        let end = self.run_loop();
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        if let Some(reason) = end {
            self.exit.notify(reason);
        }
    }

    /// Returns the reason the VM must end, or None when asked to exit.
    fn run_loop(&mut self) -> Option<VmExitReason> {
        loop {
            while let Ok(req) = self.requests.try_recv() {
                match req {
                    VcpuRequest::Pause => {
                        if !self.paused()? {
                            return None;
                        }
                    }
                    VcpuRequest::Exit => return None,
                    // Resume while running: nothing to do but answer.
                    VcpuRequest::Resume => {
                        let _ = self.responses.send(VcpuResponse::Resumed);
                    }
                    VcpuRequest::With(f) => {
                        f(&mut self.fd);
                        let _ = self.responses.send(VcpuResponse::Done);
                    }
                }
            }
            match self.run_once() {
                Next::Continue => {}
                Next::Stop(reason) => {
                    // Stay around, paused, so the controller can still read state.
                    self.exit.notify(reason);
                    self.wait_after_stop();
                    return None;
                }
            }
        }
    }

    /// Completes pending I/O, reports Paused, serves requests until Resume.
    /// Returns Some(false) to exit the thread, None on a KVM failure (reported).
    fn paused(&mut self) -> Option<bool> {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(_) => {}
            Err(e) => {
                self.exit.notify(VmExitReason::Error(format!(
                    "vCPU {}: KVM_RUN failed while pausing: {e}",
                    self.index
                )));
                return None;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        let _ = self.responses.send(VcpuResponse::Paused);
        loop {
            match self.requests.recv() {
                Ok(VcpuRequest::Resume) => {
                    self.fd.set_kvm_immediate_exit(0);
                    let _ = self.responses.send(VcpuResponse::Resumed);
                    return Some(true);
                }
                Ok(VcpuRequest::Pause) => {
                    let _ = self.responses.send(VcpuResponse::Paused);
                }
                Ok(VcpuRequest::With(f)) => {
                    f(&mut self.fd);
                    let _ = self.responses.send(VcpuResponse::Done);
                }
                Ok(VcpuRequest::Exit) | Err(_) => return Some(false),
            }
        }
    }

    fn wait_after_stop(&mut self) {
        loop {
            match self.requests.recv() {
                Ok(VcpuRequest::Pause) => {
                    let _ = self.responses.send(VcpuResponse::Paused);
                }
                Ok(VcpuRequest::Resume) => {
                    let _ = self.responses.send(VcpuResponse::Resumed);
                }
                Ok(VcpuRequest::With(f)) => {
                    f(&mut self.fd);
                    let _ = self.responses.send(VcpuResponse::Done);
                }
                Ok(VcpuRequest::Exit) | Err(_) => return,
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let index = self.index;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    if let Ok(mut d) = self.devices.lock() {
                        d.write(port, data);
                    }
                    Next::Continue
                }
                VcpuExit::IoIn(port, data) => {
                    if let Ok(mut d) = self.devices.lock() {
                        d.read(port, data);
                    }
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        debug!("vCPU {index}: MMIO read of unmapped {addr:#x}");
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        debug!("vCPU {index}: MMIO write to unmapped {addr:#x}");
                    }
                    Next::Continue
                }
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
                VcpuExit::IoapicEoi(_) => Next::Continue,
                VcpuExit::Shutdown => {
                    warn!("vCPU {index}: guest triple fault (KVM_EXIT_SHUTDOWN)");
                    Next::Stop(VmExitReason::TripleFault)
                }
                VcpuExit::SystemEvent(kind, data) => {
                    match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VmExitReason::PowerOff),
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(VmExitReason::Reset),
                        other => Next::Stop(VmExitReason::Error(format!(
                            "vCPU {index}: guest system event {other} ({data:x?})"
                        ))),
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => Next::Stop(VmExitReason::Error(format!(
                    "vCPU {index}: KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                ))),
                VcpuExit::InternalError => Next::Stop(VmExitReason::Error(self.describe_internal_error())),
                other => Next::Stop(VmExitReason::Error(format!(
                    "vCPU {index}: unexpected VM exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Stop(VmExitReason::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, KVM's data words, the
    /// guest RIP and the instruction bytes there (this is how an instruction
    /// the emulator cannot handle shows up).
    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the union for this exit reason.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let suberror = internal.suberror;
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..ndata]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let what = match suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
            _ => "unknown",
        };
        let mut msg = format!(
            "vCPU {}: KVM internal error, suberror {suberror} ({what}), data [{}]",
            self.index,
            data.join(", ")
        );
        if let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            let linear = sregs.cs.base.wrapping_add(regs.rip);
            msg.push_str(&format!(
                ", RIP {:#x} (CS base {:#x})",
                regs.rip, sregs.cs.base
            ));
            let phys = if sregs.cr0 & (1 << 31) != 0 {
                self.fd
                    .translate_gva(linear)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address)
            } else {
                Some(linear)
            };
            if let Some(p) = phys {
                let mut bytes = [0u8; 15];
                if self.memory.read_slice(&mut bytes, GuestAddress(p)).is_ok() {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    msg.push_str(&format!(", instruction bytes at {p:#x}: {}", hex.join(" ")));
                }
            }
        }
        msg
    }
}
