//! `cryo inspect`: what a saved file holds.

use std::fs::File;
use std::io::BufReader;

use crate::cli::InspectArgs;
use crate::CliError;

/// Prints the header, the sections with versions and sizes, and the RAM layout.
pub fn inspect(args: InspectArgs) -> Result<(), CliError> {
    let file = File::open(&args.file)
        .map_err(|e| CliError::bad_input(format!("cannot read {}: {e}", args.file.display())))?;
    let s = migration_stream::summarize(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| CliError::bad_input(format!("{}: {e}", args.file.display())))?;
    if args.json {
        let sections: Vec<serde_json::Value> = s
            .sections
            .iter()
            .map(|x| serde_json::json!({"name": x.name, "instance": x.instance, "version": x.version, "bytes": x.size}))
            .collect();
        let regions: Vec<serde_json::Value> = s
            .ram_layout
            .iter()
            .map(|r| serde_json::json!({"guest_addr": r.guest_addr, "size": r.size}))
            .collect();
        let v = serde_json::json!({
            "format": "stream",
            "format_version": s.format_version,
            "page_size": s.page_size,
            "sections": sections,
            "ram_layout": regions,
            "raw_pages": s.raw_pages,
            "zero_pages": s.zero_pages,
            "total_bytes": s.total_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("{}: cryo migration stream", args.file.display());
    println!(
        "  format version {}, page size {}",
        s.format_version, s.page_size
    );
    println!("  {} bytes in all", s.total_bytes);
    println!("sections:");
    let mut device_bytes = 0u64;
    for x in &s.sections {
        println!(
            "  {:<10} instance {:<3} version {:<3} {:>8} bytes",
            x.name, x.instance, x.version, x.size
        );
        device_bytes += x.size;
    }
    println!("  ({device_bytes} bytes of device state)");
    println!("RAM layout:");
    for (i, r) in s.ram_layout.iter().enumerate() {
        println!(
            "  region {i}: guest {:#012x}..{:#012x} ({} MiB)",
            r.guest_addr,
            r.guest_addr + r.size,
            r.size >> 20
        );
    }
    println!(
        "RAM pages: {} stored, {} zero ({} MiB stored)",
        s.raw_pages,
        s.zero_pages,
        (s.raw_pages * u64::from(s.page_size)) >> 20
    );
    Ok(())
}
