//! The control socket: a unix socket (mode 0600) serving one JSON request per
//! line and one JSON reply per line, with optional progress events before
//! the reply of a long operation (see docs/api.md). Each client gets its own
//! thread; requests act on the VM through its [`VmController`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use microvm::{RunState, VmController};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::image as save;
use crate::progress::Progress;

/// Version of the control protocol, reported by `status`.
pub const API_VERSION: u32 = 1;
/// Longest request line accepted (bytes).
const MAX_REQUEST: usize = 64 * 1024;
/// How often progress events are sent during a long operation.
const EVENT_INTERVAL: Duration = Duration::from_millis(250);

/// O_DIRECT choice as the API and CLI spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DirectIoArg {
    /// O_DIRECT where the filesystem supports it, buffered (with a warning) elsewhere.
    Auto,
    /// O_DIRECT, or a clear error where the filesystem refuses it.
    On,
    /// Buffered I/O through the page cache.
    Off,
}

impl From<DirectIoArg> for multifd::DirectIo {
    fn from(d: DirectIoArg) -> Self {
        match d {
            DirectIoArg::Auto => multifd::DirectIo::Auto,
            DirectIoArg::On => multifd::DirectIo::On,
            DirectIoArg::Off => multifd::DirectIo::Off,
        }
    }
}

/// What a request asks for. Every request may carry an `id` (echoed in the
/// reply and in events); long operations may ask for `progress` events.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Run state, vCPUs, memory, uptime.
    Status {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Pause all vCPUs.
    Pause {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Resume all vCPUs.
    Resume {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Save the whole VM to a file, or send it to a listening peer.
    Save {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
        /// Target file, or `tcp:HOST:PORT` / `unix:PATH` of a `cryo restore --listen`.
        path: String,
        /// Image format (files only; default fixed-ram).
        #[serde(default)]
        format: Option<save::SaveFormat>,
        /// Resume the VM afterwards instead of ending it.
        #[serde(default)]
        keep_running: bool,
        /// Channel threads (default: one per host CPU).
        #[serde(default)]
        channels: Option<usize>,
        /// O_DIRECT for file channels.
        #[serde(default)]
        direct_io: Option<DirectIoArg>,
        /// Per-packet compression for peers.
        #[serde(default)]
        compression: Option<save::migrate::CompressionArg>,
        /// Save while the VM runs (pre-copy into a fixed-ram file): the image
        /// is the VM at the end of the save.
        #[serde(default)]
        live: bool,
        /// Live save: the longest pause the guest may see, ms (default 50).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Live save: write bandwidth limit, MB/s (10^6 bytes; default none).
        #[serde(default)]
        max_bandwidth: Option<u64>,
        /// Live save: give up after this many seconds, the VM running on.
        #[serde(default)]
        timeout_s: Option<u64>,
        /// Live save: who goes first for the host's CPUs while the guest
        /// runs, `guest` (default) or `transfer`.
        #[serde(default)]
        priority: Option<save::precopy::CpuPriority>,
        /// With `keep_running`, to a file: a copy of each disk at the
        /// save's instant (one per disk, in slot order), which the image
        /// names.
        #[serde(default)]
        disk_snapshots: Vec<PathBuf>,
        /// Send progress events before the reply.
        #[serde(default)]
        progress: bool,
    },
    /// Save into the VM's state directory and end it; `cryo run --name` restores it.
    ManagedSave {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
        /// Channel threads.
        #[serde(default)]
        channels: Option<usize>,
        /// O_DIRECT.
        #[serde(default)]
        direct_io: Option<DirectIoArg>,
        /// Send progress events before the reply.
        #[serde(default)]
        progress: bool,
    },
    /// Take a live snapshot to a file: the VM at this instant, written while it runs.
    Snapshot {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
        /// Target file.
        path: PathBuf,
        /// Walker threads.
        #[serde(default)]
        channels: Option<usize>,
        /// O_DIRECT.
        #[serde(default)]
        direct_io: Option<DirectIoArg>,
        /// A copy of each disk at the snapshot's instant, in slot order.
        #[serde(default)]
        disk_snapshots: Vec<PathBuf>,
        /// Send progress events before the reply.
        #[serde(default)]
        progress: bool,
    },
    /// Live-migrate the running VM to a `cryo restore --listen` peer; the VM
    /// ends here once the peer confirmed.
    Migrate {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
        /// `tcp:HOST:PORT` or `unix:PATH` of a `cryo restore --listen`.
        to: String,
        /// Data channels (default: one per host CPU).
        #[serde(default)]
        channels: Option<usize>,
        /// Per-packet compression.
        #[serde(default)]
        compression: Option<save::migrate::CompressionArg>,
        /// The longest pause the guest may see, ms (default 50).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Bandwidth limit, MB/s (10^6 bytes; default none).
        #[serde(default)]
        max_bandwidth: Option<u64>,
        /// Give up after this many seconds, the VM running on (default none).
        #[serde(default)]
        timeout_s: Option<u64>,
        /// Who goes first for the host's CPUs while the guest runs,
        /// `guest` (default) or `transfer`.
        #[serde(default)]
        priority: Option<save::precopy::CpuPriority>,
        /// Send progress events before the reply.
        #[serde(default)]
        progress: bool,
    },
    /// Cancel a running live snapshot.
    Cancel {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Progress of the running save or snapshot, if any.
    QueryProgress {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
    /// End the VM.
    Quit {
        /// Echoed.
        #[serde(default)]
        id: Option<Value>,
    },
}

impl Request {
    fn id(&self) -> Option<Value> {
        match self {
            Request::Status { id }
            | Request::Pause { id }
            | Request::Resume { id }
            | Request::Save { id, .. }
            | Request::ManagedSave { id, .. }
            | Request::Snapshot { id, .. }
            | Request::Migrate { id, .. }
            | Request::Cancel { id }
            | Request::QueryProgress { id }
            | Request::Quit { id } => id.clone(),
        }
    }
}

/// The managed-save identity of a VM started with `cryo run --name`.
#[derive(Clone, Debug)]
pub struct Managed {
    /// The VM's name.
    pub name: String,
    /// Where its managed image goes.
    pub image: PathBuf,
}

/// Shared by the client threads.
struct ApiState {
    controller: VmController,
    started: Instant,
    busy: AtomicBool,
    cancel: save::live::CancelSlot,
    /// The stopped save in progress, if any: it holds the VM paused, and
    /// `cancel` (or the VM ending) stops it.
    save: Mutex<Option<save::SaveControl>>,
    current: Mutex<Option<Arc<Progress>>>,
    managed: Option<Managed>,
}

impl ApiState {
    fn save_running(&self) -> Option<save::SaveControl> {
        self.save.lock().ok().and_then(|s| s.clone())
    }

    fn set_save(&self, control: Option<save::SaveControl>) {
        if let Ok(mut s) = self.save.lock() {
            *s = control;
        }
    }
}

/// How long a VM that is ending waits for a save or snapshot under way to
/// stop, remove its temporary file and answer its client.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// The API of a running VM, kept by whoever runs the VM.
pub struct ApiHandle {
    state: Arc<ApiState>,
}

impl ApiHandle {
    /// The VM is ending: cancels a save or snapshot under way and waits
    /// (bounded) until it has cleaned up and answered its client.
    pub fn shutdown(&self) {
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            // Again on every round: an operation that was just starting
            // registers its cancel handle only a moment later.
            if let Some(c) = self.state.save_running() {
                c.cancel_for_vm_end();
            }
            self.state.cancel.cancel();
            if !self.state.busy.load(Ordering::Acquire) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Takes `path` for the API socket (refusing a live socket or any other
/// file there, replacing a stale socket) and binds it, mode 0600. Done
/// before anything slow, so that a bad `--api` fails at once.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::files::claim_socket_path(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the bound socket on background threads.
pub fn serve(
    listener: UnixListener,
    controller: VmController,
    managed: Option<Managed>,
) -> std::io::Result<ApiHandle> {
    let state = Arc::new(ApiState {
        controller,
        started: Instant::now(),
        busy: AtomicBool::new(false),
        cancel: save::live::CancelSlot::default(),
        save: Mutex::new(None),
        current: Mutex::new(None),
        managed,
    });
    let handle = ApiHandle {
        state: Arc::clone(&state),
    };
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let state = Arc::clone(&state);
                        let _ = std::thread::Builder::new()
                            .name("api-client".into())
                            .spawn(move || serve_client(stream, state));
                    }
                    Err(e) => warn!("api: accept failed: {e}"),
                }
            }
        })?;
    Ok(handle)
}

/// One client's connection: replies and events share it.
struct Conn {
    out: Mutex<UnixStream>,
    gone: AtomicBool,
}

impl Conn {
    fn send(&self, v: &Value) {
        if self.gone.load(Ordering::Relaxed) {
            return;
        }
        let mut s = v.to_string();
        s.push('\n');
        let ok = self
            .out
            .lock()
            .map(|mut w| w.write_all(s.as_bytes()).and_then(|_| w.flush()).is_ok())
            .unwrap_or(false);
        if !ok {
            // The client went away; operations under way still complete.
            self.gone.store(true, Ordering::Relaxed);
        }
    }
}

fn serve_client(stream: UnixStream, state: Arc<ApiState>) {
    let conn = match stream.try_clone() {
        Ok(w) => Conn {
            out: Mutex::new(w),
            gone: AtomicBool::new(false),
        },
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n > MAX_REQUEST {
            conn.send(&error_reply(None, "bad-request", "request line too long"));
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (reply, after) = handle(text, &state, &conn);
        conn.send(&reply);
        if let Some(action) = after {
            action();
        }
        if conn.gone.load(Ordering::Relaxed) {
            return;
        }
    }
}

fn ok_reply(id: Option<Value>, result: Value) -> Value {
    json!({"id": id, "ok": true, "result": result})
}

fn error_reply(id: Option<Value>, kind: &str, message: &str) -> Value {
    json!({"id": id, "ok": false, "error": {"kind": kind, "message": message}})
}

type AfterReply = Box<dyn FnOnce() + Send>;

fn channel_options(
    channels: Option<usize>,
    direct_io: Option<DirectIoArg>,
) -> Result<save::fixed::ChannelOptions, String> {
    if channels.is_some_and(|n| n == 0 || n > 64) {
        return Err("channels must be 1 to 64".into());
    }
    let mut opts = save::fixed::ChannelOptions::default();
    if let Some(n) = channels {
        opts.channels = n;
    }
    if let Some(d) = direct_io {
        opts.direct_io = d.into();
    }
    Ok(opts)
}

/// Runs a long operation with its progress published (query-progress) and,
/// when asked, sent to the client as events.
fn with_progress<T>(
    state: &ApiState,
    conn: &Conn,
    id: &Option<Value>,
    operation: &'static str,
    events: bool,
    op: impl FnOnce(Arc<Progress>) -> T,
) -> Result<T, Value> {
    if state.busy.swap(true, Ordering::AcqRel) {
        return Err(error_reply(
            id.clone(),
            "busy",
            "a save or snapshot is already in progress",
        ));
    }
    let progress = Arc::new(Progress::new(operation, 0));
    if let Ok(mut c) = state.current.lock() {
        *c = Some(Arc::clone(&progress));
    }
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        if events {
            s.spawn(|| {
                let mut next = Instant::now() + EVENT_INTERVAL;
                while !done.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        next += EVENT_INTERVAL;
                        let mut ev = serde_json::to_value(progress.info()).unwrap_or(Value::Null);
                        ev["event"] = json!("progress");
                        ev["id"] = id.clone().unwrap_or(Value::Null);
                        conn.send(&ev);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        let r = op(Arc::clone(&progress));
        done.store(true, Ordering::Relaxed);
        r
    });
    if let Ok(mut c) = state.current.lock() {
        *c = None;
    }
    state.busy.store(false, Ordering::Release);
    Ok(result)
}

/// Refuses options that do not apply to the target instead of ignoring
/// them: compression is for peers; the image format and O_DIRECT are for files.
fn options_fit_target(
    target: &save::SaveTarget,
    format: Option<save::SaveFormat>,
    direct_io: Option<DirectIoArg>,
    compression: Option<save::migrate::CompressionArg>,
) -> Result<(), String> {
    match target {
        save::SaveTarget::File(_) if compression.is_some() => Err(
            "compression applies to a save sent to a peer (tcp: or unix:), not to a file".into(),
        ),
        save::SaveTarget::Peer(_) if format.is_some() => Err(
            "the image format applies to a save to a file; a peer receives the VM itself".into(),
        ),
        save::SaveTarget::Peer(_) if direct_io.is_some() => {
            Err("O_DIRECT applies to a save to a file, not to a peer".into())
        }
        _ => Ok(()),
    }
}

/// Runs a stopped save with its control published: `cancel` can stop it,
/// and `pause` and `resume` are refused while it holds the VM paused.
fn run_save(
    state: &ApiState,
    target: &save::SaveTarget,
    opts: &save::SaveOptions,
) -> Result<save::SaveStats, save::SaveError> {
    state.set_save(Some(opts.control.clone()));
    let result = save::save_vm(&state.controller, target, opts);
    state.set_save(None);
    result
}

fn stop_after(c: &VmController) -> Option<AfterReply> {
    let c = c.clone();
    Some(Box::new(move || {
        let _ = c.stop();
    }))
}

/// A reply, and what to do once it is sent (end the VM after a save).
type Reply = (Value, Option<AfterReply>);

/// Parses one request line; a bad one is answered at once.
fn parse_request(text: &str) -> Result<Request, Value> {
    let raw: Value = serde_json::from_str(text)
        .map_err(|e| error_reply(None, "bad-request", &format!("malformed JSON: {e}")))?;
    let raw_id = raw.get("id").cloned();
    serde_json::from_value(raw)
        .map_err(|e| error_reply(raw_id, "bad-request", &format!("invalid request: {e}")))
}

/// Answers one request line: parse, then one handler per verb.
fn handle(text: &str, state: &ApiState, conn: &Conn) -> Reply {
    let req = match parse_request(text) {
        Ok(r) => r,
        Err(reply) => return (reply, None),
    };
    let id = req.id();
    let c = &state.controller;
    match req {
        Request::Status { .. } => (status(state, id), None),
        // A stopped save holds the VM paused: resuming it would let the
        // guest change memory the save is writing.
        Request::Pause { .. } | Request::Resume { .. } if state.save_running().is_some() => (
            error_reply(
                id,
                "busy",
                "a save holds the VM paused; wait for it to end or cancel it",
            ),
            None,
        ),
        Request::Pause { .. } => (answer(id, c.pause(), "paused"), None),
        Request::Resume { .. } => (answer(id, c.resume(), "running"), None),
        Request::Quit { .. } => (ok_reply(id, json!({"state": "stopping"})), stop_after(c)),
        Request::QueryProgress { .. } => (query_progress(state, id), None),
        Request::Cancel { .. } => (cancel(state, id), None),
        Request::Save {
            path,
            format,
            keep_running,
            channels,
            direct_io,
            compression,
            live,
            max_downtime_ms,
            max_bandwidth,
            timeout_s,
            priority,
            disk_snapshots,
            progress,
            ..
        } => save(
            state,
            conn,
            id,
            SaveRequest {
                path,
                format,
                keep_running,
                channels,
                direct_io,
                compression,
                live,
                limits: LiveLimits {
                    max_downtime_ms,
                    max_bandwidth,
                    timeout_s,
                    priority,
                },
                disk_snapshots,
                progress,
            },
        ),
        Request::ManagedSave {
            channels,
            direct_io,
            progress,
            ..
        } => managed_save(state, conn, id, (channels, direct_io, progress)),
        Request::Migrate {
            to,
            channels,
            compression,
            max_downtime_ms,
            max_bandwidth,
            timeout_s,
            priority,
            progress,
            ..
        } => {
            let opts = save::precopy::MigrateOptions {
                channels: 0,
                compression,
                max_downtime_ms: max_downtime_ms.unwrap_or(50),
                max_bandwidth: max_bandwidth.map(|mb| mb.saturating_mul(1_000_000)),
                timeout: timeout_s.map(Duration::from_secs),
                priority: priority.unwrap_or_default(),
            };
            migrate(state, conn, id, (to, channels, progress), opts)
        }
        Request::Snapshot {
            path,
            channels,
            direct_io,
            disk_snapshots,
            progress,
            ..
        } => snapshot(
            state,
            conn,
            id,
            (path, channels, direct_io, progress),
            &disk_snapshots,
        ),
    }
}

fn status(state: &ApiState, id: Option<Value>) -> Value {
    match state
        .controller
        .call(|vm| (vm.state(), vm.machine().clone()))
    {
        Ok((run_state, machine)) => ok_reply(
            id,
            json!({
                "api_version": API_VERSION,
                "state": state_name(run_state),
                "vcpus": machine.vcpus,
                "mem_mib": machine.mem_mib,
                "uptime_s": state.started.elapsed().as_secs_f64(),
                "name": state.managed.as_ref().map(|m| m.name.clone()),
                "busy": state.busy.load(Ordering::Relaxed),
            }),
        ),
        Err(e) => error_reply(id, "failed", &e.to_string()),
    }
}

/// The reply to pause or resume: the new state, or why not.
fn answer(id: Option<Value>, result: Result<(), microvm::Error>, new_state: &str) -> Value {
    match result {
        Ok(()) => ok_reply(id, json!({ "state": new_state })),
        Err(e) => error_reply(id, "failed", &e.to_string()),
    }
}

fn query_progress(state: &ApiState, id: Option<Value>) -> Value {
    match state.current.lock().ok().and_then(|c| c.clone()) {
        Some(p) => {
            let mut v = serde_json::to_value(p.info()).unwrap_or(Value::Null);
            v["active"] = json!(true);
            ok_reply(id, v)
        }
        None => ok_reply(id, json!({"active": false})),
    }
}

fn cancel(state: &ApiState, id: Option<Value>) -> Value {
    let cancelled = match state.save_running() {
        Some(control) => {
            control.cancel();
            true
        }
        None => state.cancel.cancel(),
    };
    if cancelled {
        ok_reply(id, json!({"cancelled": true}))
    } else {
        error_reply(id, "bad-request", "no save or snapshot is running")
    }
}

/// The reply to a long-running verb: `busy` if another one runs, its
/// error, or its statistics (`on_ok` adds to them and says what follows).
fn finish<T: serde::Serialize>(
    id: Option<Value>,
    run: Result<Result<T, save::SaveError>, Value>,
    on_ok: impl FnOnce(&T, &mut Value) -> Option<AfterReply>,
) -> Reply {
    match run {
        Err(busy) => (busy, None),
        Ok(Ok(stats)) => {
            let mut v = serde_json::to_value(&stats).unwrap_or(Value::Null);
            let after = on_ok(&stats, &mut v);
            (ok_reply(id, v), after)
        }
        Ok(Err(e)) => (error_reply(id, e.kind(), &e.to_string()), None),
    }
}

/// The fields of a `save` request.
struct SaveRequest {
    path: String,
    format: Option<save::SaveFormat>,
    keep_running: bool,
    channels: Option<usize>,
    direct_io: Option<DirectIoArg>,
    compression: Option<save::migrate::CompressionArg>,
    /// A live save, with its limits.
    live: bool,
    limits: LiveLimits,
    /// Disk copies made inside the pause (with `keep_running`).
    disk_snapshots: Vec<PathBuf>,
    progress: bool,
}

/// The limits of a live save as the request gives them.
struct LiveLimits {
    max_downtime_ms: Option<u64>,
    max_bandwidth: Option<u64>,
    timeout_s: Option<u64>,
    priority: Option<save::precopy::CpuPriority>,
}

impl LiveLimits {
    fn any(&self) -> bool {
        self.max_downtime_ms.is_some()
            || self.max_bandwidth.is_some()
            || self.timeout_s.is_some()
            || self.priority.is_some()
    }
}

/// Refuses a live save that cannot be one: to a peer (that is `migrate`),
/// or in the stream format (pages are rewritten in place).
fn live_fits_target(
    target: &save::SaveTarget,
    format: Option<save::SaveFormat>,
) -> Result<PathBuf, String> {
    match target {
        save::SaveTarget::Peer(_) => {
            Err("a live save writes a file; to move a running VM to a peer use migrate".into())
        }
        save::SaveTarget::File(_) if format == Some(save::SaveFormat::Stream) => {
            Err("a live save rewrites pages in place: it writes the fixed-ram format only".into())
        }
        save::SaveTarget::File(p) => Ok(p.clone()),
    }
}

fn save(state: &ApiState, conn: &Conn, id: Option<Value>, r: SaveRequest) -> Reply {
    let target = match save::SaveTarget::parse(&r.path) {
        Ok(t) => t,
        Err(e) => return (error_reply(id, "bad-request", &e.to_string()), None),
    };
    if let Err(e) = options_fit_target(&target, r.format, r.direct_io, r.compression) {
        return (error_reply(id, "bad-request", &e), None);
    }
    let channels = match channel_options(r.channels, r.direct_io) {
        Ok(c) => c,
        Err(e) => return (error_reply(id, "bad-request", &e), None),
    };
    if r.live && !r.disk_snapshots.is_empty() {
        let e = "disk_snapshots apply to a stopped save with keep_running (a live save of a VM with disks is refused)";
        return (error_reply(id, "bad-request", e), None);
    }
    if r.live {
        return match live_fits_target(&target, r.format) {
            Ok(path) => save_live(state, conn, id, &r, path, channels),
            Err(e) => (error_reply(id, "bad-request", &e), None),
        };
    }
    if r.limits.any() {
        let e = "max_downtime_ms, max_bandwidth, timeout_s and priority apply to a live save (live: true)";
        return (error_reply(id, "bad-request", e), None);
    }
    let run = with_progress(state, conn, &id, "save", r.progress, |p| {
        let opts = save::SaveOptions {
            format: r.format.unwrap_or_default(),
            keep_running: r.keep_running,
            channels,
            compression: r.compression,
            progress: Some(p),
            control: save::SaveControl::default(),
            disk_targets: r.disk_snapshots.clone(),
        };
        run_save(state, &target, &opts)
    });
    finish(id, run, |stats, _| {
        info!("saved to {}: {stats:?}", r.path);
        if r.keep_running {
            None
        } else {
            stop_after(&state.controller)
        }
    })
}

/// `save` with `live`: the pre-copy into a fixed-ram file, with its
/// control published so that `cancel` stops it.
fn save_live(
    state: &ApiState,
    conn: &Conn,
    id: Option<Value>,
    r: &SaveRequest,
    path: PathBuf,
    channels: save::fixed::ChannelOptions,
) -> Reply {
    let limits = &r.limits;
    let opts = save::live_save::LiveSaveOptions {
        channels,
        max_downtime_ms: limits.max_downtime_ms.unwrap_or(50),
        max_bandwidth: limits.max_bandwidth.map(|mb| mb.saturating_mul(1_000_000)),
        timeout: limits.timeout_s.map(Duration::from_secs),
        keep_running: r.keep_running,
        priority: limits.priority.unwrap_or_default(),
    };
    let c = &state.controller;
    let run = with_progress(state, conn, &id, "save", r.progress, |p| {
        let control = save::SaveControl::default();
        state.set_save(Some(control.clone()));
        let result = save::live_save::save_vm_live(c, &path, &opts, &control, Some(&p));
        state.set_save(None);
        result
    });
    finish(id, run, |stats, _| {
        info!("live save to {}: {stats:?}", path.display());
        if opts.keep_running {
            None
        } else {
            stop_after(c)
        }
    })
}

fn managed_save(
    state: &ApiState,
    conn: &Conn,
    id: Option<Value>,
    (channels, direct_io, progress): (Option<usize>, Option<DirectIoArg>, bool),
) -> Reply {
    let Some(managed) = state.managed.clone() else {
        return (
            error_reply(
                id,
                "bad-request",
                "this VM was not started with --name: it has no managed save image",
            ),
            None,
        );
    };
    let channels = match channel_options(channels, direct_io) {
        Ok(c) => c,
        Err(e) => return (error_reply(id, "bad-request", &e), None),
    };
    let run = with_progress(state, conn, &id, "managed-save", progress, |p| {
        let opts = save::SaveOptions {
            format: save::SaveFormat::FixedRam,
            keep_running: false,
            channels,
            compression: None,
            progress: Some(p),
            control: save::SaveControl::default(),
            disk_targets: Vec::new(),
        };
        run_save(state, &save::SaveTarget::File(managed.image.clone()), &opts)
    });
    finish(id, run, |stats, v| {
        info!("managed save of {}: {stats:?}", managed.name);
        v["name"] = json!(managed.name);
        stop_after(&state.controller)
    })
}

fn migrate(
    state: &ApiState,
    conn: &Conn,
    id: Option<Value>,
    (to, channels, progress): (String, Option<usize>, bool),
    mut opts: save::precopy::MigrateOptions,
) -> Reply {
    let endpoint = match save::SaveTarget::parse(&to) {
        Ok(save::SaveTarget::Peer(e)) => e,
        Ok(save::SaveTarget::File(_)) => {
            return (
                error_reply(
                    id,
                    "bad-request",
                    "migrate sends to a peer: tcp:HOST:PORT or unix:PATH",
                ),
                None,
            )
        }
        Err(e) => return (error_reply(id, "bad-request", &e.to_string()), None),
    };
    opts.channels = match channel_options(channels, None) {
        Ok(c) => c.channels,
        Err(e) => return (error_reply(id, "bad-request", &e), None),
    };
    let c = &state.controller;
    let run = with_progress(state, conn, &id, "migrate", progress, |p| {
        let control = save::SaveControl::default();
        state.set_save(Some(control.clone()));
        let r = save::precopy::migrate_vm(c, &endpoint, &opts, &control, Some(&p));
        state.set_save(None);
        r
    });
    finish(id, run, |stats, _| {
        info!("migrated to {to}: {stats:?}");
        stop_after(c)
    })
}

fn snapshot(
    state: &ApiState,
    conn: &Conn,
    id: Option<Value>,
    (path, channels, direct_io, progress): (PathBuf, Option<usize>, Option<DirectIoArg>, bool),
    disks: &[PathBuf],
) -> Reply {
    let channels = match channel_options(channels, direct_io) {
        Ok(c) => c,
        Err(e) => return (error_reply(id, "bad-request", &e), None),
    };
    let c = &state.controller;
    let run = with_progress(state, conn, &id, "snapshot", progress, |p| {
        save::live::snapshot_vm(
            c,
            &path,
            &channels,
            disks,
            save::live::Walk::default(),
            &state.cancel,
            Some(&p),
        )
    });
    finish(id, run, |stats, _| {
        info!(
            "snapshot of the running VM in {}: {stats:?}",
            path.display()
        );
        None
    })
}

fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Created => "created",
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Stopped => "stopped",
    }
}

/// Sends one request and returns the reply, calling `on_event` for each
/// event line before it (client side of the CLI verbs).
pub fn request_with_events(
    path: &Path,
    req: &Value,
    on_event: &mut dyn FnMut(&Value),
) -> Result<Value, crate::error::CliError> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        crate::error::CliError::bad_input(format!(
            "cannot connect to the API socket {}: {e}",
            path.display()
        ))
    })?;
    let mut line = req.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| crate::error::CliError::failure(format!("API socket write failed: {e}")))?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut reply = String::new();
        reader
            .read_line(&mut reply)
            .map_err(|e| crate::error::CliError::failure(format!("API socket read failed: {e}")))?;
        if reply.is_empty() {
            return Err(crate::error::CliError::failure(
                "the VM closed the API connection without a reply",
            ));
        }
        let v: Value = serde_json::from_str(&reply).map_err(|e| {
            crate::error::CliError::failure(format!("malformed reply from the VM: {e}"))
        })?;
        if v.get("event").is_some() {
            on_event(&v);
            continue;
        }
        return Ok(v);
    }
}
