//! cryo's multi-channel page transfer ("multifd"): N channel threads move
//! guest pages between guest memory and a fixed-ram file or sockets.
//!
//! It knows nothing of VMs: memory is given as [`MemRegion`]s of raw host
//! memory.
//!
//! - [`save_to_file`] / [`load_from_file`]: file channels for the fixed-ram
//!   image format, which describes itself through the [`FileLayout`] trait.
//!   Each channel has its own file descriptor (optionally `O_DIRECT`), takes
//!   chunks from a shared cursor, skips zero pages and moves runs of present
//!   pages with one system call each, straight from or into guest memory.
//!   [`save_pass_to_file`] is one pass of a live save into the same file
//!   ([`FilePass`]): all chunks, or only those holding dirty pages, rewritten
//!   in place, with a bandwidth limit and a stop flag.
//! - [`send`] / [`receive`]: socket channels for a stopped migration between
//!   two processes: a main connection (control and device state) and N data
//!   connections carrying page packets. The wire protocol is specified in
//!   `docs/multifd-protocol.md` in the repository; the parsers
//!   ([`parse_hello`], [`parse_packet_header`], [`parse_packet`],
//!   [`parse_main_message`]) treat their input as hostile.
//! - [`LiveSender`]: the sending side of a live migration (protocol versions
//!   2 and 3): rounds of pages while the guest runs ([`PageSet`]), then the last
//!   round and the device state; [`LiveSender::wait_received`] waits for the
//!   receiver to take the rounds sent (version 3); [`receive`] reads
//!   versions 1 to 3.
#![deny(missing_docs)]

mod endpoint;
mod error;
mod file;
mod live;
mod pace;
mod protocol;
mod region;
mod socket;
mod sys;
mod unpopulated;

pub use endpoint::{parse_endpoint, Endpoint, Listener, Stream, DEAD_PEER_TIMEOUT};
pub use error::{CallerError, Channel, MultifdError};
pub use file::{
    load_from_file, open_with_direct_io, save_pass_to_file, save_to_file, DirectIo,
    FileChannelOptions, FileLayout, FilePass, TransferStats, LOAD_QUEUE_DEPTH, MAX_FILE_CHANNELS,
    SAVE_QUEUE_DEPTH,
};
pub use live::{LiveSender, PageSet, RoundStats};
pub use protocol::{
    check_main_crc, decode_main_payload, decode_payload, parse_hello, parse_main_header,
    parse_main_message, parse_packet, parse_packet_header, parse_runs_into, ChannelCount,
    Compression, Encoding, Hello, MainHeader, MainMessage, Packet, PacketHeader, Role, Run,
    HELLO_LEN, HELLO_MAGIC, LIVE_PROTOCOL_VERSION, MAIN_HEADER_LEN, MAX_DATA_CHANNELS,
    MAX_DEVICE_STATE, MAX_ERROR_MESSAGE, MAX_PAGES_PER_PACKET, MAX_REGIONS, PACKET_HEADER_LEN,
    PACKET_MAGIC, PAGE_SIZE, PROGRESS_PROTOCOL_VERSION, PROTOCOL_VERSION, RUN_LEN,
};
pub use region::MemRegion;
pub use socket::{receive, receive_checked, send, SocketOptions};
pub use sys::TRANSFER_NICE;

/// Compiles the README's example as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
