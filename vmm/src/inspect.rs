//! `cryo inspect` and `cryo verify`: what a saved file holds, and whether it is intact.

use std::fs::File;
use std::io::BufReader;

use serde_json::json;

use crate::cli::{InspectArgs, VerifyArgs};
use microvm::persist::MachineState;

use crate::error::CliError;
use crate::image::snapshot::{DeviceStateError, SnapshotBuilder};
use crate::image::{self, SaveFormat};

fn input_err(e: image::SaveError) -> CliError {
    e.into()
}

/// Prints the header, the sections with versions and sizes, and the RAM layout.
pub fn inspect(args: InspectArgs) -> Result<(), CliError> {
    match image::detect_format(&args.file).map_err(input_err)? {
        SaveFormat::Stream => inspect_stream(&args),
        SaveFormat::FixedRam => inspect_fixed(&args),
    }
}

/// The sections that are devices (not the machine, the KVM VM or a vCPU).
fn devices(s: &migration_stream::StreamSummary) -> Vec<String> {
    let mut d: Vec<String> = s
        .sections
        .iter()
        .filter(|x| {
            ![
                image::sections::MACHINE,
                image::sections::KVM_VM,
                image::sections::VCPU,
            ]
            .contains(&x.name.as_str())
        })
        .map(|x| x.name.clone())
        .collect();
    d.dedup();
    d
}

/// The machine section of a stream: the first section of every image.
fn machine_of_stream(r: impl std::io::Read) -> Result<MachineState, DeviceStateError> {
    let mut reader = migration_stream::StreamReader::new(r)?;
    let mut builder = SnapshotBuilder::default();
    while let Some(rec) = reader.next_record()? {
        if let migration_stream::Record::Section(s) = rec {
            builder.add(&s)?;
            if let Some(m) = builder.machine() {
                return Ok(m.clone());
            }
        }
    }
    Err(DeviceStateError::Missing(image::sections::MACHINE.into()))
}

/// What wrote the image, as recorded (older images did not record it).
fn writer(m: &MachineState) -> String {
    if m.writer.is_empty() {
        "not recorded (written before cryo recorded its version)".into()
    } else {
        m.writer.clone()
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(not recorded)"
    } else {
        s
    }
}

fn config_json(m: &MachineState, s: &migration_stream::StreamSummary) -> serde_json::Value {
    json!({
        "vcpus": m.vcpus,
        "mem_mib": m.mem_mib,
        "cmdline": m.cmdline,
        "kernel": m.kernel,
        "tsc_khz": m.tsc_khz,
        "devices": devices(s),
    })
}

fn print_config(m: &MachineState, s: &migration_stream::StreamSummary) {
    println!("  writer: {}", writer(m));
    println!("VM:");
    println!("  {} vCPUs, {} MiB of RAM", m.vcpus, m.mem_mib);
    println!("  kernel: {}", or_unknown(&m.kernel));
    println!("  command line: {}", m.cmdline);
    println!("  devices: {}", devices(s).join(", "));
}

fn print_sections(s: &migration_stream::StreamSummary) {
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
}

fn sections_json(s: &migration_stream::StreamSummary) -> serde_json::Value {
    s.sections
        .iter()
        .map(|x| json!({"name": x.name, "instance": x.instance, "version": x.version, "bytes": x.size}))
        .collect()
}

fn inspect_stream(args: &InspectArgs) -> Result<(), CliError> {
    let file = File::open(&args.file)
        .map_err(|e| CliError::bad_input(format!("cannot read {}: {e}", args.file.display())))?;
    let s = migration_stream::summarize(BufReader::with_capacity(1 << 20, &file))
        .map_err(|e| CliError::bad_input(format!("{}: {e}", args.file.display())))?;
    std::io::Seek::rewind(&mut &file)
        .map_err(|e| CliError::failure(format!("cannot read {}: {e}", args.file.display())))?;
    let machine = machine_of_stream(BufReader::new(&file))
        .map_err(|e| CliError::bad_input(format!("{}: {e}", args.file.display())))?;
    if args.json {
        let regions: Vec<serde_json::Value> = s
            .ram_layout
            .iter()
            .map(|r| json!({"guest_addr": r.guest_addr, "size": r.size}))
            .collect();
        let v = json!({
            "format": "stream",
            "format_version": s.format_version,
            "writer": machine.writer,
            "vm": config_json(&machine, &s),
            "page_size": s.page_size,
            "sections": sections_json(&s),
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
    print_config(&machine, &s);
    print_sections(&s);
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

fn inspect_fixed(args: &InspectArgs) -> Result<(), CliError> {
    let img = image::fixed::open_for_inspect(&args.file).map_err(input_err)?;
    let h = img.header();
    let bad = |e: &dyn std::fmt::Display| {
        CliError::bad_input(format!("{}: device state: {e}", args.file.display()))
    };
    let state = img
        .device_state()
        .map_err(|e| CliError::bad_input(format!("{}: {e}", args.file.display())))?;
    let device = migration_stream::summarize(state.as_slice()).map_err(|e| bad(&e))?;
    let machine = machine_of_stream(state.as_slice()).map_err(|e| bad(&e))?;
    let regions: Vec<(usize, &fixed_ram::RegionLayout, u64)> = img
        .layout()
        .regions()
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r, img.present_pages(i)))
        .collect();
    let present: u64 = regions.iter().map(|r| r.2).sum();
    if args.json {
        let rj: Vec<serde_json::Value> = regions
            .iter()
            .map(|(i, r, p)| {
                json!({"index": i, "guest_addr": r.guest_addr, "size": r.size, "pages": r.size / u64::from(h.page_size),
                       "present_pages": p, "bitmap_offset": r.bitmap_offset, "pages_offset": r.pages_offset})
            })
            .collect();
        let v = json!({
            "format": "fixed-ram",
            "format_version": h.format_version,
            "writer": machine.writer,
            "vm": config_json(&machine, &device),
            "page_size": h.page_size,
            "alignment": h.alignment,
            "chunk_size": h.chunk_size,
            "regions": rj,
            "present_pages": present,
            "device_state_offset": h.device_state_offset,
            "device_state_bytes": h.device_state_len,
            "sections": sections_json(&device),
            "apparent_bytes": img.apparent_size(),
            "allocated_bytes": img.allocated_size(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("{}: cryo fixed-ram image", args.file.display());
    println!(
        "  format version {}, page size {}, alignment {} KiB, checksum chunk {} KiB",
        h.format_version,
        h.page_size,
        h.alignment >> 10,
        h.chunk_size >> 10
    );
    println!(
        "  apparent size {} bytes ({} MiB), allocated {} bytes ({} MiB)",
        img.apparent_size(),
        img.apparent_size() >> 20,
        img.allocated_size(),
        img.allocated_size() >> 20
    );
    print_config(&machine, &device);
    println!("regions:");
    for (i, r, p) in &regions {
        let pages = r.size / u64::from(h.page_size);
        println!(
            "  region {i}: guest {:#012x}..{:#012x} ({} MiB), {p} of {pages} pages present, bitmap at {:#x}, pages at {:#x}",
            r.guest_addr,
            r.guest_addr + r.size,
            r.size >> 20,
            r.bitmap_offset,
            r.pages_offset
        );
    }
    println!(
        "  {present} pages present ({} MiB)",
        (present * u64::from(h.page_size)) >> 20
    );
    println!(
        "device state: {} bytes at {:#x}",
        h.device_state_len, h.device_state_offset
    );
    print_sections(&device);
    Ok(())
}

/// Checks a fixed-ram image: exits 0 when intact, 2 naming the first bad chunk otherwise.
pub fn verify(args: VerifyArgs) -> Result<(), CliError> {
    match image::detect_format(&args.file).map_err(input_err)? {
        SaveFormat::FixedRam => {}
        SaveFormat::Stream => {
            // A stream is verified by reading it through: every record has a CRC.
            let file = File::open(&args.file).map_err(|e| {
                CliError::bad_input(format!("cannot read {}: {e}", args.file.display()))
            })?;
            let s = migration_stream::summarize(BufReader::with_capacity(1 << 20, file))
                .map_err(|e| CliError::bad_input(format!("{}: {e}", args.file.display())))?;
            println!(
                "{}: OK (stream: header and every record checksum verified, {} bytes)",
                args.file.display(),
                s.total_bytes
            );
            return Ok(());
        }
    }
    let report = image::fixed::verify(&args.file).map_err(input_err)?;
    println!(
        "{}: OK ({} chunks, {} bytes checked, {} pages present, header and device state intact)",
        args.file.display(),
        report.chunks,
        report.bytes_checked,
        report.present_pages
    );
    Ok(())
}
