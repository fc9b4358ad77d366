//! The control socket: a unix socket (mode 0600) serving one JSON request per
//! line and one JSON reply per line (see docs/api.md). Each client gets its
//! own thread; requests act on the VM through its [`VmController`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{info, warn};
use microvm::{RunState, VmController};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::image as save;

/// Version of the control protocol, reported by `status`.
pub const API_VERSION: u32 = 1;
/// Longest request line accepted (bytes).
const MAX_REQUEST: usize = 64 * 1024;

/// What a request asks for.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Run state, vCPUs, memory, uptime.
    Status {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Pause all vCPUs.
    Pause {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Resume all vCPUs.
    Resume {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
    },
    /// Save the whole VM to a file, or send it to a listening peer.
    Save {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
        /// Target file, or `tcp:HOST:PORT` / `unix:PATH` of a `cryo restore --listen`.
        path: String,
        /// Image format (files).
        #[serde(default)]
        format: save::SaveFormat,
        /// Resume the VM afterwards instead of ending it.
        #[serde(default)]
        keep_running: bool,
        /// Channel threads (default: one per host CPU).
        #[serde(default)]
        channels: Option<usize>,
        /// O_DIRECT for file channels: "auto" (default), "on", "off".
        #[serde(default)]
        direct_io: Option<DirectIoArg>,
        /// Per-packet compression for peers: "none" (default), "zstd", "lz4".
        #[serde(default)]
        compression: Option<save::migrate::CompressionArg>,
    },
    /// Take a live snapshot to a file: the VM at this instant, written while it runs.
    Snapshot {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
        /// Target file.
        path: PathBuf,
        /// Walker threads (default: one per host CPU).
        #[serde(default)]
        channels: Option<usize>,
        /// O_DIRECT: "auto" (default), "on", "off".
        #[serde(default)]
        direct_io: Option<DirectIoArg>,
    },
    /// Cancel a running live snapshot.
    Cancel {
        /// Echoed in the reply.
        #[serde(default)]
        id: Option<Value>,
    },
    /// End the VM.
    Quit {
        /// Echoed in the reply.
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
            | Request::Snapshot { id, .. }
            | Request::Cancel { id }
            | Request::Quit { id } => id.clone(),
        }
    }
}

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

/// Shared by the client threads.
struct ApiState {
    controller: VmController,
    started: Instant,
    saving: AtomicBool,
    cancel: save::live::CancelSlot,
}

/// Binds the socket and serves it on background threads.
pub fn serve(path: &Path, controller: VmController) -> std::io::Result<()> {
    if path.exists() {
        // A live server owns it: refuse. A stale socket from a dead cryo: replace it.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is already served by a running cryo", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let state = Arc::new(ApiState {
        controller,
        started: Instant::now(),
        saving: AtomicBool::new(false),
        cancel: save::live::CancelSlot::default(),
    });
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
    Ok(())
}

fn serve_client(stream: UnixStream, state: Arc<ApiState>) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
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
            let _ = send(
                &mut writer,
                &error_reply(None, "bad-request", "request line too long"),
            );
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (reply, after) = handle(text, &state);
        if send(&mut writer, &reply).is_err() {
            // The client went away; an action already under way still completes.
            if let Some(action) = after {
                action();
            }
            return;
        }
        if let Some(action) = after {
            action();
        }
    }
}

fn send(w: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    w.write_all(s.as_bytes())?;
    w.flush()
}

fn ok_reply(id: Option<Value>, result: Value) -> Value {
    json!({"id": id, "ok": true, "result": result})
}

fn error_reply(id: Option<Value>, kind: &str, message: &str) -> Value {
    json!({"id": id, "ok": false, "error": {"kind": kind, "message": message}})
}

type AfterReply = Box<dyn FnOnce() + Send>;

/// Handles one request line; returns the reply and what to do once it is sent.
fn handle(text: &str, state: &ApiState) -> (Value, Option<AfterReply>) {
    let raw: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return (
                error_reply(None, "bad-request", &format!("malformed JSON: {e}")),
                None,
            )
        }
    };
    let raw_id = raw.get("id").cloned();
    let req: Request = match serde_json::from_value(raw) {
        Ok(r) => r,
        Err(e) => {
            return (
                error_reply(raw_id, "bad-request", &format!("invalid request: {e}")),
                None,
            )
        }
    };
    let id = req.id();
    let c = &state.controller;
    match req {
        Request::Status { .. } => match c.call(|vm| (vm.state(), vm.machine().clone())) {
            Ok((run_state, machine)) => (
                ok_reply(
                    id,
                    json!({
                        "api_version": API_VERSION,
                        "state": state_name(run_state),
                        "vcpus": machine.vcpus,
                        "mem_mib": machine.mem_mib,
                        "uptime_s": state.started.elapsed().as_secs_f64(),
                    }),
                ),
                None,
            ),
            Err(e) => (error_reply(id, "failed", &e.to_string()), None),
        },
        Request::Pause { .. } => match c.pause() {
            Ok(()) => (ok_reply(id, json!({"state": "paused"})), None),
            Err(e) => (error_reply(id, "failed", &e.to_string()), None),
        },
        Request::Resume { .. } => match c.resume() {
            Ok(()) => (ok_reply(id, json!({"state": "running"})), None),
            Err(e) => (error_reply(id, "failed", &e.to_string()), None),
        },
        Request::Cancel { .. } => {
            if state.cancel.cancel() {
                (ok_reply(id, json!({"cancelled": true})), None)
            } else {
                (
                    error_reply(id, "bad-request", "no live snapshot is running"),
                    None,
                )
            }
        }
        Request::Snapshot {
            path,
            channels,
            direct_io,
            ..
        } => {
            if channels.is_some_and(|n| n == 0 || n > 64) {
                return (
                    error_reply(id, "bad-request", "channels must be 1 to 64"),
                    None,
                );
            }
            let mut opts = save::fixed::ChannelOptions::default();
            if let Some(n) = channels {
                opts.channels = n;
            }
            if let Some(d) = direct_io {
                opts.direct_io = d.into();
            }
            if state.saving.swap(true, Ordering::AcqRel) {
                return (
                    error_reply(id, "busy", "a save or snapshot is already in progress"),
                    None,
                );
            }
            let result = save::live::snapshot_vm(c, &path, &opts, &state.cancel);
            state.saving.store(false, Ordering::Release);
            match result {
                Ok(stats) => {
                    info!(
                        "snapshot of the running VM in {}: {stats:?}",
                        path.display()
                    );
                    (
                        ok_reply(id, serde_json::to_value(&stats).unwrap_or(Value::Null)),
                        None,
                    )
                }
                Err(save::SaveError::Image { reason, .. }) if reason.contains("cancelled") => (
                    error_reply(id, "cancelled", "the snapshot was cancelled"),
                    None,
                ),
                Err(e) => (error_reply(id, e.kind(), &e.to_string()), None),
            }
        }
        Request::Quit { .. } => {
            let c = c.clone();
            (
                ok_reply(id, json!({"state": "stopping"})),
                Some(Box::new(move || {
                    let _ = c.stop();
                })),
            )
        }
        Request::Save {
            path,
            format,
            keep_running,
            channels,
            direct_io,
            compression,
            ..
        } => {
            let target = match save::SaveTarget::parse(&path) {
                Ok(t) => t,
                Err(e) => return (error_reply(id, "bad-request", &e), None),
            };
            if channels.is_some_and(|n| n == 0 || n > 64) {
                return (
                    error_reply(id, "bad-request", "channels must be 1 to 64"),
                    None,
                );
            }
            let mut channel_opts = save::fixed::ChannelOptions::default();
            if let Some(n) = channels {
                channel_opts.channels = n;
            }
            if let Some(d) = direct_io {
                channel_opts.direct_io = d.into();
            }
            let opts = save::SaveOptions {
                format,
                keep_running,
                channels: channel_opts,
                compression,
            };
            if state.saving.swap(true, Ordering::AcqRel) {
                return (
                    error_reply(id, "busy", "a save or snapshot is already in progress"),
                    None,
                );
            }
            let result = save::save_vm(c, &target, &opts);
            state.saving.store(false, Ordering::Release);
            match result {
                Ok(stats) => {
                    info!("saved to {path}: {stats:?}");
                    let after: Option<AfterReply> = if keep_running {
                        None
                    } else {
                        let c = c.clone();
                        Some(Box::new(move || {
                            let _ = c.stop();
                        }))
                    };
                    (
                        ok_reply(id, serde_json::to_value(&stats).unwrap_or(Value::Null)),
                        after,
                    )
                }
                Err(e) => (error_reply(id, e.kind(), &e.to_string()), None),
            }
        }
    }
}

fn state_name(s: RunState) -> &'static str {
    match s {
        RunState::Created => "created",
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Stopped => "stopped",
    }
}

/// Sends one request and returns the reply (client side of the CLI verbs).
pub fn request(path: &Path, req: &Value) -> Result<Value, crate::CliError> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        crate::CliError::bad_input(format!(
            "cannot connect to the API socket {}: {e}",
            path.display()
        ))
    })?;
    let mut line = req.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| crate::CliError::failure(format!("API socket write failed: {e}")))?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(|e| crate::CliError::failure(format!("API socket read failed: {e}")))?;
    if reply.is_empty() {
        return Err(crate::CliError::failure(
            "the VM closed the API connection without a reply",
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| crate::CliError::failure(format!("malformed reply from the VM: {e}")))
}
