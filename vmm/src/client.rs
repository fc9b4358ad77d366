//! CLI verbs that talk to a running VM over its API socket.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::CliError;
use crate::image::precopy::CpuPriority;
use crate::progress::{Display, ProgressInfo};

/// How results are printed.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// JSON for scripts instead of text for people.
    pub json: bool,
}

fn info_of(ev: &Value) -> Option<ProgressInfo> {
    serde_json::from_value(ev.clone()).ok()
}

/// Sends `request` (with progress events for long operations), shows
/// progress on stderr, prints the result, maps errors to exit codes.
pub fn call(api: &Path, mut request: Value, out: Output) -> Result<(), CliError> {
    let long = matches!(
        request.get("cmd").and_then(Value::as_str),
        Some("save" | "snapshot" | "managed-save" | "migrate")
    );
    if long {
        request["progress"] = json!(true);
    }
    let mut display: Option<Display> = None;
    let reply = crate::api::request_with_events(api, &request, &mut |ev| {
        if let Some(info) = info_of(ev) {
            display
                .get_or_insert_with(|| Display::new(&info.operation, info.bytes_total))
                .update(&info);
        }
    });
    if let Some(d) = display {
        d.finish();
    }
    let reply = reply?;
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        let result = reply.get("result").cloned().unwrap_or(Value::Null);
        if out.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&result).unwrap_or_default()
            );
        } else {
            let cmd = request.get("cmd").and_then(Value::as_str).unwrap_or("");
            println!("{}", human(cmd, &result));
        }
        Ok(())
    } else {
        let err = reply.get("error");
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("unknown error")
            .to_string();
        match err.and_then(|e| e.get("kind")).and_then(Value::as_str) {
            Some("bad-request") => Err(CliError::bad_input(message)),
            _ => Err(CliError::failure(message)),
        }
    }
}

fn mib(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0) >> 20
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The disk copies of a snapshot, for [`human`].
fn disk_copies(r: &Value) -> String {
    let disks = r.get("disks").and_then(Value::as_array);
    disks
        .into_iter()
        .flatten()
        .map(|d| {
            let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            format!(
                "; disk copy {} ({} MiB, {}, {} chunks copied before guest writes, {:.0} ms)",
                s("path"),
                mib(d, "bytes"),
                s("method"),
                d.get("chunks_before_write")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                num(d, "copy_ms"),
            )
        })
        .collect()
}

/// A one-line summary of a result for people.
fn human(cmd: &str, r: &Value) -> String {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match cmd {
        "status" => format!(
            "{}: {} vCPUs, {} MiB, up {:.1} s{}",
            s("state"),
            r.get("vcpus").and_then(Value::as_u64).unwrap_or(0),
            r.get("mem_mib").and_then(Value::as_u64).unwrap_or(0),
            num(r, "uptime_s"),
            r.get("name")
                .and_then(Value::as_str)
                .map(|n| format!(", name {n}"))
                .unwrap_or_default()
        ),
        "save" if r.get("rounds").is_some() => format!(
            "saved live to {} in {:.2} s: {} rounds, {:.2}x RAM written, file {} MiB ({} MiB allocated); VM paused {:.1} ms",
            s("path"),
            num(r, "total_ms") / 1000.0,
            r.get("rounds").and_then(Value::as_u64).unwrap_or(0),
            (num(r, "pages_sent") * 4096.0) / num(r, "ram_bytes").max(1.0),
            mib(r, "bytes"),
            mib(r, "allocated_bytes"),
            num(r, "paused_ms"),
        ),
        "save" | "managed-save" => format!(
            "saved to {} ({}): {} MiB of RAM data, file {} MiB ({} MiB allocated), device state {} bytes; VM paused {:.0} ms",
            s("path"),
            s("format"),
            (r.get("ram_pages").and_then(Value::as_u64).unwrap_or(0) * 4096) >> 20,
            mib(r, "bytes"),
            mib(r, "allocated_bytes"),
            r.get("device_state_bytes").and_then(Value::as_u64).unwrap_or(0),
            num(r, "paused_ms"),
        ) + &disk_copies(r),
        "snapshot" => format!(
            "snapshot in {}: vCPUs paused {:.1} ms, written in {:.2} s while running; {} blocks by walkers, {} by guest writes, {} pages copied for guest writes (fault latency median {:.0} us)",
            s("path"),
            num(r, "paused_ms"),
            num(r, "total_ms") / 1000.0,
            r.get("blocks_by_walkers").and_then(Value::as_u64).unwrap_or(0),
            r.get("blocks_by_faults").and_then(Value::as_u64).unwrap_or(0),
            r.get("pages_by_faults").and_then(Value::as_u64).unwrap_or(0),
            num(r, "fault_latency_median_us"),
        ) + &disk_copies(r),
        "migrate" => format!(
            "migrated to {} in {:.2} s: {} rounds, {:.2}x RAM sent, VM paused {:.1} ms",
            s("to"),
            num(r, "total_ms") / 1000.0,
            r.get("rounds").and_then(Value::as_u64).unwrap_or(0),
            num(r, "bytes") / num(r, "ram_bytes").max(1.0),
            num(r, "downtime_ms"),
        ),
        "pause" | "resume" | "quit" => s("state"),
        "cancel" => "cancelled".into(),
        _ => r.to_string(),
    }
}

fn absolutes(paths: &[PathBuf]) -> Result<Vec<String>, CliError> {
    paths.iter().map(|p| absolute(p)).collect()
}

fn absolute(p: &Path) -> Result<String, CliError> {
    if p.is_absolute() {
        return Ok(p.display().to_string());
    }
    Ok(std::env::current_dir()
        .map_err(|e| CliError::failure(format!("cannot read the current directory: {e}")))?
        .join(p)
        .display()
        .to_string())
}

/// `cryo save`.
pub fn save(args: crate::cli::SaveArgs, out: Output) -> Result<(), CliError> {
    // The VM resolves a path in its own working directory: send it absolute.
    let to = match crate::image::SaveTarget::parse(&args.to)
        .map_err(|e| CliError::bad_input(e.to_string()))?
    {
        crate::image::SaveTarget::Peer(_) => args.to.clone(),
        crate::image::SaveTarget::File(p) => absolute(&p)?,
    };
    let mut req = json!({"cmd": "save", "path": to, "keep_running": args.keep_running});
    if !args.disk_snapshot.is_empty() {
        req["disk_snapshots"] = json!(absolutes(&args.disk_snapshot)?);
    }
    if let Some(f) = args.format {
        req["format"] = json!(crate::image::SaveFormat::from(f));
    }
    if let Some(n) = args.channels {
        req["channels"] = json!(n);
    }
    if let Some(d) = args.direct_io {
        req["direct_io"] = json!(d);
    }
    if let Some(c) = args.compress {
        req["compression"] = json!(crate::image::migrate::CompressionArg::from(c));
    }
    put(&mut req, "live", args.live.then_some(true));
    put(&mut req, "max_downtime_ms", args.max_downtime_ms);
    put(&mut req, "max_bandwidth", args.max_bandwidth);
    put(&mut req, "timeout_s", args.timeout_s);
    put(&mut req, "priority", args.priority.map(CpuPriority::from));
    call(&args.api, req, out)
}

/// Sets `req[key]` when the option was given.
fn put<T: serde::Serialize>(req: &mut Value, key: &str, value: Option<T>) {
    if let Some(v) = value {
        req[key] = json!(v);
    }
}

/// `cryo migrate`.
pub fn migrate(args: crate::cli::MigrateArgs, out: Output) -> Result<(), CliError> {
    let mut req = json!({
        "cmd": "migrate",
        "to": args.to,
        "max_downtime_ms": args.max_downtime_ms,
    });
    put(&mut req, "channels", args.channels);
    put(&mut req, "max_bandwidth", args.max_bandwidth);
    put(&mut req, "timeout_s", args.timeout_s);
    put(&mut req, "priority", args.priority.map(CpuPriority::from));
    if let Some(c) = args.compress {
        req["compression"] = json!(crate::image::migrate::CompressionArg::from(c));
    }
    call(&args.api, req, out)
}

/// `cryo snapshot`.
pub fn snapshot(args: crate::cli::SnapshotArgs, out: Output) -> Result<(), CliError> {
    let mut req = json!({"cmd": "snapshot", "path": absolute(&args.to)?});
    if !args.disk_snapshot.is_empty() {
        req["disk_snapshots"] = json!(absolutes(&args.disk_snapshot)?);
    }
    if let Some(n) = args.channels {
        req["channels"] = json!(n);
    }
    if let Some(d) = args.direct_io {
        req["direct_io"] = json!(d);
    }
    call(&args.api, req, out)
}

/// The API socket `cryo managed-save` talks to: `--api`, a path given in
/// place of the name, or the named VM's socket in its state directory.
fn managed_api(args: &crate::cli::ManagedSaveArgs) -> Result<std::path::PathBuf, CliError> {
    if let Some(api) = &args.api {
        return Ok(api.clone());
    }
    let name = args
        .name
        .as_deref()
        .ok_or_else(|| CliError::bad_input("managed-save needs a VM name or --api PATH"))?;
    if name.contains('/') {
        return Ok(std::path::PathBuf::from(name));
    }
    crate::managed::check_name(name)?;
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(crate::managed::default_state_dir);
    let api = dir.join(name).join("api.sock");
    if !api.exists() {
        return Err(CliError::bad_input(format!(
            "no running VM named {name} (no API socket at {})",
            api.display()
        )));
    }
    Ok(api)
}

/// `cryo managed-save`.
pub fn managed_save(args: crate::cli::ManagedSaveArgs, out: Output) -> Result<(), CliError> {
    let api = managed_api(&args)?;
    let mut req = json!({"cmd": "managed-save"});
    if let Some(n) = args.channels {
        req["channels"] = json!(n);
    }
    if let Some(d) = args.direct_io {
        req["direct_io"] = json!(d);
    }
    call(&api, req, out)
}
