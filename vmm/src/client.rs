//! CLI verbs that talk to a running VM over its API socket.

use std::path::Path;

use serde_json::{json, Value};

use crate::CliError;

/// Sends `request`, prints the result as JSON on stdout, maps errors to exit codes.
pub fn call(api: &Path, request: Value) -> Result<(), CliError> {
    let reply = crate::api::request(api, &request)?;
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        let result = reply.get("result").cloned().unwrap_or(Value::Null);
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
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

/// `cryo save`.
pub fn save(args: crate::cli::SaveArgs) -> Result<(), CliError> {
    // The VM resolves a path in its own working directory: send it absolute.
    let to = match crate::image::SaveTarget::parse(&args.to).map_err(CliError::bad_input)? {
        crate::image::SaveTarget::Peer(_) => args.to.clone(),
        crate::image::SaveTarget::File(p) if p.is_absolute() => args.to.clone(),
        crate::image::SaveTarget::File(p) => std::env::current_dir()
            .map_err(|e| CliError::failure(format!("cannot read the current directory: {e}")))?
            .join(p)
            .display()
            .to_string(),
    };
    let mut req = json!({"cmd": "save", "path": to, "format": args.format, "keep_running": args.keep_running});
    if let Some(n) = args.channels {
        req["channels"] = json!(n);
    }
    if let Some(d) = args.direct_io {
        req["direct_io"] = json!(d);
    }
    if let Some(c) = args.compress {
        req["compression"] = json!(c);
    }
    call(&args.api, req)
}

/// `cryo snapshot`.
pub fn snapshot(args: crate::cli::SnapshotArgs) -> Result<(), CliError> {
    let to = if args.to.is_absolute() {
        args.to.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| CliError::failure(format!("cannot read the current directory: {e}")))?
            .join(&args.to)
    };
    let mut req = json!({"cmd": "snapshot", "path": to});
    if let Some(n) = args.channels {
        req["channels"] = json!(n);
    }
    if let Some(d) = args.direct_io {
        req["direct_io"] = json!(d);
    }
    call(&args.api, req)
}
