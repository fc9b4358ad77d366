//! A stopped migration between two processes over sockets: the saving VM
//! sends its RAM through multifd data channels and its device state on the
//! main channel; `cryo restore --listen` receives straight into fresh guest
//! memory and resumes the VM only after the whole transfer verified.

use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm::devices::virtio::net::NetConfig;
use microvm::persist::VmSnapshot;
use microvm::{create_guest_memory, open_restore_taps, GuestMemory, MemoryBacking, VmShell};
use serde::{Deserialize, Serialize};

use super::fixed::mem_regions;
use super::{snapshot, ImageError, Loaded, SaveError, SaveOptions, Written, PAGE_SIZE};

/// How long the receiver waits for each data connection once the main one is up.
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-packet compression on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionArg {
    /// Raw pages.
    None,
    /// zstd, level 1.
    Zstd,
    /// lz4.
    Lz4,
}

impl CompressionArg {
    pub(crate) fn multifd(self) -> multifd::Compression {
        match self {
            CompressionArg::None => multifd::Compression::None,
            CompressionArg::Zstd => multifd::Compression::Zstd(1),
            CompressionArg::Lz4 => multifd::Compression::Lz4,
        }
    }
}

/// Sends a paused VM to a listening `cryo restore --listen`. Succeeds only
/// once the receiver confirmed it loaded everything.
pub fn send_vm(
    endpoint: &multifd::Endpoint,
    snap: &VmSnapshot,
    memory: &GuestMemory,
    opts: &SaveOptions,
) -> Result<Written, SaveError> {
    let target = PathBuf::from(endpoint.to_string());
    let device_state = snapshot::encode(snap, PAGE_SIZE as u32).map_err(|e| SaveError::Image {
        path: target.clone(),
        source: e.into(),
    })?;
    let socket_opts = multifd::SocketOptions {
        channels: opts.channels.channels.clamp(1, 64),
        compression: opts.compression.unwrap_or(CompressionArg::None).multifd(),
    };
    let stats = multifd::send(
        &mut || endpoint.connect(),
        &mem_regions(memory),
        &device_state,
        &socket_opts,
    )
    .map_err(|e| SaveError::Image {
        path: target.clone(),
        source: e.into(),
    })?;
    log::info!(
        "sent {} pages ({} zero) over {} channels in {:?}: {:.0} MB/s on the wire",
        stats.present_pages,
        stats.zero_pages,
        stats.channels,
        stats.elapsed,
        stats.mb_per_s()
    );
    Ok(Written {
        bytes: stats.bytes,
        allocated_bytes: 0,
        device_state_bytes: device_state.len() as u64,
        ram_pages: stats.present_pages,
        zero_pages: stats.zero_pages,
        phases: Default::default(),
    })
}

/// Decodes a received device state and checks every disk it names as a
/// restore would (missing, or changed unless `disk_changed_ok`); both
/// refusals are bad input, as a restore from a file's are.
fn runnable_state(
    state: &[u8],
    disk_changed_ok: bool,
    endpoint: &Path,
) -> Result<VmSnapshot, SaveError> {
    let snap = snapshot::decode(state).map_err(|source| SaveError::DeviceState {
        path: endpoint.to_path_buf(),
        source,
    })?;
    for block in &snap.blocks {
        microvm::devices::virtio::block::check_identity(&block.disk, disk_changed_ok).map_err(
            |source| SaveError::DiskRefused {
                endpoint: endpoint.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(snap)
}

/// Makes `mib` of guest memory and faults it all in, saying how long that
/// took.
fn preallocate(mib: u64) -> Result<GuestMemory, SaveError> {
    // Faulting in more than the host has would call the OOM killer, not
    // fail the call.
    if let Some(available) = available_mib().filter(|a| mib > *a) {
        return Err(SaveError::BadRequest(format!(
            "--prealloc-mib {mib}: this host has only {available} MiB of memory available"
        )));
    }
    let refused =
        |e: microvm::MemoryError| SaveError::BadRequest(format!("--prealloc-mib {mib}: {e}"));
    let start = std::time::Instant::now();
    let mem = create_guest_memory(mib, &MemoryBacking::Anonymous).map_err(refused)?;
    microvm::populate(&mem).map_err(refused)?;
    eprintln!(
        "cryo: {mib} MiB of guest memory faulted in ahead in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(mem)
}

/// `MemAvailable` of `/proc/meminfo`, MiB (None: unknown).
fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

/// Waits on `listen` for one migration and returns the received VM.
/// Before the ACK (while the sender can still keep its VM) the device state
/// is decoded, each disk it names is checked as the restore will check it
/// (missing, or changed unless `disk_changed_ok`), and the taps its net
/// devices attach to (`nets`, or those the save recorded) are opened
/// ([`microvm::open_restore_taps`]): a refused disk or tap fails the
/// migration with the source running, instead of after it has ended.
/// With `prealloc_mib`, that much guest memory is made and faulted in
/// ([`microvm::populate`]) before listening, and a VM of that size is
/// received into it (one of another size into fresh memory, as without).
pub fn receive_vm(
    listen: &str,
    disk_changed_ok: bool,
    nets: &[NetConfig],
    prealloc_mib: Option<u64>,
) -> Result<Loaded, SaveError> {
    let path = PathBuf::from(listen);
    let invalid = |reason: String| SaveError::Invalid {
        path: path.clone(),
        reason,
    };
    let bad_image = |e: ImageError| SaveError::BadImage {
        path: path.clone(),
        source: e,
    };
    let endpoint = multifd::parse_endpoint(listen).map_err(|e| bad_image(e.into()))?;
    // A stale socket file of a dead receiver is replaced; a live one, or any
    // other file, is refused.
    if let multifd::Endpoint::Unix(socket) = &endpoint {
        crate::files::claim_socket_path(socket).map_err(|e| invalid(e.to_string()))?;
    }
    let mut prepared = prealloc_mib.map(preallocate).transpose()?;
    let listener = endpoint.listen().map_err(|e| bad_image(e.into()))?;
    eprintln!("cryo: waiting for a migration on {listen}");
    let mut shell: Option<VmShell> = None;
    // The state decoded once, before the ACK; or why it was refused, kept
    // typed (the sender is told the message).
    let mut checked: Option<Result<VmSnapshot, SaveError>> = None;
    let mut taps = Vec::new();
    let mut check_state = |state: &[u8]| -> Result<(), multifd::CallerError> {
        let result = runnable_state(state, disk_changed_ok, &path).and_then(|snap| {
            taps = open_restore_taps(&snap.nets, nets).map_err(|source| SaveError::NetRefused {
                endpoint: path.clone(),
                source,
            })?;
            Ok(snap)
        });
        let refusal = result.as_ref().err().map(|e| e.to_string());
        checked = Some(result);
        refusal.map_or(Ok(()), |why| Err(why.into()))
    };
    let (_, stats) = listener
        .receive_checked(
            DATA_CONNECT_TIMEOUT,
            &mut |layout| {
                let total: u64 = layout.iter().map(|(_, size)| *size).sum();
                if !total.is_multiple_of(1 << 20) {
                    return Err(format!("RAM of {total} bytes is not a whole number of MiB").into());
                }
                let mem = match prepared.take() {
                    Some(m) if microvm::region_list(&m) == layout => m,
                    other => {
                        if other.is_some() {
                            log::warn!(
                                "the VM has {} MiB, not the {} MiB faulted in ahead: receiving into fresh memory",
                                total >> 20,
                                prealloc_mib.unwrap_or(0)
                            );
                        }
                        create_guest_memory(total >> 20, &MemoryBacking::Anonymous)?
                    }
                };
                let ours = microvm::region_list(&mem);
                if ours != layout {
                    return Err(format!(
                        "RAM layout {layout:x?} is not the one cryo builds for {} MiB ({ours:x?})",
                        total >> 20
                    )
                    .into());
                }
                let regions = mem_regions(&mem);
                // The KVM VM now, while the RAM arrives: not in the pause.
                shell = Some(VmShell::new(mem)?);
                Ok(regions)
            },
            &mut check_state,
        )
        .map_err(|e| match checked.take() {
            Some(Err(refused)) => refused,
            _ => SaveError::Receive {
                path: path.clone(),
                source: e.into(),
            },
        })?;
    drop(listener);
    log::info!(
        "received {} pages over {} channels in {:?}: {:.0} MB/s",
        stats.present_pages,
        stats.channels,
        stats.elapsed,
        stats.mb_per_s()
    );
    let snap = match checked {
        Some(Ok(snap)) => snap,
        _ => return Err(invalid("no device state was received".into())),
    };
    let shell = shell.ok_or_else(|| invalid("no RAM layout was received".into()))?;
    let memory = shell.memory().clone();
    let ours = microvm::region_list(&memory);
    if ours != snap.machine.regions {
        return Err(invalid(format!(
            "received RAM {ours:x?} does not match the machine section's {:x?}",
            snap.machine.regions
        )));
    }
    Ok(Loaded {
        snapshot: snap,
        memory,
        prefetch: None,
        shell: Some(shell.with_taps(taps)),
    })
}
