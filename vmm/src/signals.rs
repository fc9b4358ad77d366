//! SIGINT and SIGTERM end the VM cleanly: the handler only writes to an
//! eventfd (async-signal-safe); the event loop does the rest.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use log::info;
use microvm::event_manager::{EventOps, Events, MutEventSubscriber};
use microvm::{StopHandle, VmExitReason};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd that lives
        // for the rest of the process (it is leaked on purpose), and the
        // buffer is a valid 8-byte value.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Watches SIGINT/SIGTERM and stops the VM when one arrives.
pub struct SignalWatcher {
    evt: EventFd,
    stop: StopHandle,
}

impl SignalWatcher {
    /// Installs the handlers; returns the subscriber for the VM's event loop.
    pub fn install(stop: StopHandle) -> std::io::Result<Arc<Mutex<SignalWatcher>>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        // The handler's copy of the fd is never closed.
        let handler_fd = evt.try_clone()?;
        SIGNAL_FD.store(handler_fd.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(handler_fd);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            vmm_sys_util::signal::register_signal_handler(sig, on_signal)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(Arc::new(Mutex::new(SignalWatcher { evt, stop })))
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        info!("signal received: stopping the VM");
        self.stop.stop(VmExitReason::Stopped);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}
