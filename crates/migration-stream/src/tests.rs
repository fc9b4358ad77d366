//! Unit tests: round trips, and hostile input (truncation, bit flips,
//! crafted headers and records).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::*;

const PS: u32 = 4096;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Serial {
    ier: u8,
    lcr: u8,
    fifo: Vec<u8>,
}

fn serial() -> Serial {
    Serial {
        ier: 1,
        lcr: 3,
        fifo: b"hi".to_vec(),
    }
}

fn layout() -> Vec<RamRegion> {
    vec![
        RamRegion {
            guest_addr: 0,
            size: 4 * u64::from(PS),
        },
        RamRegion {
            guest_addr: 0x10_0000,
            size: 2 * u64::from(PS),
        },
    ]
}

/// A small stream with every record type.
fn sample() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    w.write_section("serial", 0, 2, &serial()).unwrap();
    w.write_raw_section("blob", 7, 1, &[9, 8, 7]).unwrap();
    w.write_ram_layout(&layout()).unwrap();
    let page: Vec<u8> = (0..PS).map(|i| (i % 251) as u8).collect();
    w.write_pages(1, 1, &page).unwrap();
    w.write_zero_pages(0, 0, 4).unwrap();
    w.write_sync(42).unwrap();
    let n = w.bytes_written();
    let out = w.finish().unwrap();
    assert_eq!(out.len() as u64, n + 12);
    out
}

fn read_all(bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut v = Vec::new();
    while let Some(rec) = r.next_record()? {
        v.push(rec);
    }
    Ok(v)
}

/// Builds a stream header with a valid CRC.
fn header(version: u16, flags: u16, page_size: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&page_size.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Builds a record with a valid CRC.
fn record(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut r = ty.to_le_bytes().to_vec();
    r.extend_from_slice(&flags.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(payload);
    let crc = crc32c::crc32c(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

fn layout_payload(regions: &[(u64, u64)]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    for (a, s) in regions {
        p.extend_from_slice(&a.to_le_bytes());
        p.extend_from_slice(&s.to_le_bytes());
    }
    p
}

fn pages_payload(region: u32, first: u64, count: u32, enc: u8, data: &[u8]) -> Vec<u8> {
    let mut p = region.to_le_bytes().to_vec();
    p.extend_from_slice(&first.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p.push(enc);
    p.extend_from_slice(data);
    p
}

fn section_payload(name: &[u8], instance: u32, version: u32, state: &[u8]) -> Vec<u8> {
    let mut p = (name.len() as u16).to_le_bytes().to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&instance.to_le_bytes());
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(&(state.len() as u32).to_le_bytes());
    p.extend_from_slice(state);
    p
}

/// A stream made of a valid header, the given records, and an end record.
fn crafted(records: &[Vec<u8>]) -> Vec<u8> {
    let mut s = header(1, 0, PS);
    for r in records {
        s.extend_from_slice(r);
    }
    s.extend_from_slice(&record(5, 0, &[]));
    s
}

fn err_of(bytes: &[u8]) -> StreamError {
    read_all(bytes).expect_err("stream should be refused")
}

fn layout_record() -> Vec<u8> {
    record(2, 0, &layout_payload(&[(0, 4 * u64::from(PS))]))
}

#[test]
fn round_trip_every_record_type() {
    let bytes = sample();
    let mut r = StreamReader::new(bytes.as_slice()).unwrap();
    assert_eq!(r.page_size(), PS);
    assert_eq!(r.format_version(), FORMAT_VERSION);
    assert!(r.ram_layout().is_none());

    let Some(Record::Section(s)) = r.next_record().unwrap() else {
        panic!("expected a section")
    };
    assert_eq!((s.name.as_str(), s.instance, s.version), ("serial", 0, 2));
    assert_eq!(s.decode::<Serial>(2).unwrap(), serial());

    let rec = r.next_record().unwrap().unwrap();
    assert_eq!(
        rec,
        Record::Section(Section {
            name: "blob".into(),
            instance: 7,
            version: 1,
            data: vec![9, 8, 7]
        })
    );

    assert_eq!(r.next_record().unwrap(), Some(Record::RamLayout(layout())));
    assert_eq!(r.ram_layout(), Some(layout().as_slice()));

    let Some(Record::Pages(p)) = r.next_record().unwrap() else {
        panic!("expected pages")
    };
    assert_eq!((p.region, p.first_page, p.count), (1, 1, 1));
    let page: Vec<u8> = (0..PS).map(|i| (i % 251) as u8).collect();
    assert_eq!(p.kind, PagesKind::Raw(page));

    assert_eq!(
        r.next_record().unwrap(),
        Some(Record::Pages(Pages {
            region: 0,
            first_page: 0,
            count: 4,
            kind: PagesKind::Zero
        }))
    );
    assert_eq!(r.next_record().unwrap(), Some(Record::Sync(42)));
    assert_eq!(r.next_record().unwrap(), Some(Record::End));
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.offset(), bytes.len() as u64);
    assert_eq!(r.records_read(), 7);
}

#[test]
fn empty_stream_round_trips() {
    let bytes = StreamWriter::new(Vec::new(), PS).unwrap().finish().unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 12);
    assert_eq!(read_all(&bytes).unwrap(), vec![Record::End]);
}

#[test]
fn every_page_size_round_trips() {
    let mut ps = MIN_PAGE_SIZE;
    while ps <= MAX_PAGE_SIZE {
        let mut w = StreamWriter::new(Vec::new(), ps).unwrap();
        w.write_ram_layout(&[RamRegion {
            guest_addr: u64::from(ps),
            size: u64::from(ps) * 2,
        }])
        .unwrap();
        w.write_pages(0, 1, &vec![1u8; ps as usize]).unwrap();
        let bytes = w.finish().unwrap();
        let s = summarize(bytes.as_slice()).unwrap();
        assert_eq!((s.page_size, s.raw_pages), (ps, 1));
        ps *= 2;
    }
}

#[test]
fn raw_pages_are_split_into_1mib_records() {
    let pages = 300usize; // 256 + 44
    let data: Vec<u8> = (0..pages * PS as usize)
        .map(|i| (i / PS as usize) as u8)
        .collect();
    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    w.write_ram_layout(&[RamRegion {
        guest_addr: 0,
        size: 512 * u64::from(PS),
    }])
    .unwrap();
    w.write_pages(0, 10, &data).unwrap();
    let bytes = w.finish().unwrap();
    let recs = read_all(&bytes).unwrap();
    let mut joined = Vec::new();
    let mut next_page = 10;
    let mut n = 0;
    for r in recs {
        if let Record::Pages(p) = r {
            assert_eq!(p.first_page, next_page);
            next_page += u64::from(p.count);
            let PagesKind::Raw(d) = p.kind else {
                panic!("raw")
            };
            assert!(d.len() <= RAW_PAGES_PER_RECORD_BYTES);
            joined.extend_from_slice(&d);
            n += 1;
        }
    }
    assert_eq!(n, 2);
    assert_eq!(joined, data);
}

#[test]
fn zero_pages_are_split_at_u32_max() {
    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    w.write_ram_layout(&[RamRegion {
        guest_addr: 0,
        size: 1 << 46,
    }])
    .unwrap();
    let count = 2 * u64::from(u32::MAX) + 5;
    w.write_zero_pages(0, 1, count).unwrap();
    let s = summarize(w.finish().unwrap().as_slice()).unwrap();
    assert_eq!(s.zero_pages, count);
    assert_eq!(s.records, 5); // layout, 3 pages records, end
}

#[test]
fn summary_lists_everything() {
    let bytes = sample();
    let s = summarize(bytes.as_slice()).unwrap();
    assert_eq!(s.format_version, 1);
    assert_eq!(s.page_size, PS);
    assert_eq!(s.sections.len(), 2);
    assert_eq!(
        s.sections[1],
        SectionInfo {
            name: "blob".into(),
            instance: 7,
            version: 1,
            size: 3
        }
    );
    assert_eq!(s.ram_layout, layout());
    assert_eq!((s.raw_pages, s.zero_pages, s.sync_markers), (1, 4, 1));
    assert_eq!(s.total_bytes, bytes.len() as u64);
}

#[test]
fn reader_stops_at_end_and_leaves_what_follows() {
    let mut bytes = sample();
    let len = bytes.len();
    bytes.extend_from_slice(b"next protocol");
    let mut input = bytes.as_slice();
    let mut r = StreamReader::new(&mut input).unwrap();
    while r.next_record().unwrap().is_some() {}
    assert_eq!(r.offset(), len as u64);
    drop(r);
    assert_eq!(input, b"next protocol");
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let bytes = sample();
    for cut in 0..bytes.len() {
        let prefix = &bytes[..cut];
        let result = (|| -> Result<(), StreamError> {
            let mut r = StreamReader::new(prefix)?;
            loop {
                match r.next_record()? {
                    Some(Record::End) => panic!("end record seen in a stream cut at {cut}"),
                    Some(_) => {}
                    None => panic!("Ok(None) before the end record, cut at {cut}"),
                }
            }
        })();
        let e = result.unwrap_err();
        match e {
            StreamError::Truncated { offset, .. } => assert_eq!(offset, cut as u64, "{e}"),
            StreamError::MissingEnd { offset, .. } => assert_eq!(offset, cut as u64, "{e}"),
            other => panic!("cut at {cut}: unexpected error {other}"),
        }
        assert!(summarize(prefix).is_err());
    }
}

#[test]
fn missing_end_message() {
    let mut bytes = sample();
    bytes.truncate(bytes.len() - 12);
    let e = err_of(&bytes);
    assert!(
        matches!(e, StreamError::MissingEnd { records: 6, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with("truncated stream: no end record"),
        "{e}"
    );
}

#[test]
fn every_flipped_bit_is_an_error() {
    let bytes = sample();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                read_all(&b).is_err(),
                "flip of bit {bit} at byte {i} was accepted"
            );
            assert!(summarize(b.as_slice()).is_err());
        }
    }
}

#[test]
fn flipped_page_data_is_a_checksum_error() {
    let bytes = sample();
    // The raw page's data: find the page pattern.
    let page: Vec<u8> = (0..PS).map(|i| (i % 251) as u8).collect();
    let at = bytes
        .windows(page.len())
        .position(|w| w == page.as_slice())
        .unwrap();
    let mut b = bytes.clone();
    b[at + 100] ^= 0x10;
    let e = err_of(&b);
    assert!(
        matches!(e, StreamError::RecordChecksum { record: 3, .. }),
        "{e:?}"
    );
}

#[test]
fn wrong_magic() {
    let mut b = sample();
    b[0] = b'X';
    let e = err_of(&b);
    assert!(matches!(e, StreamError::BadMagic { .. }));
    assert!(e.to_string().contains("not a cryo stream"), "{e}");
    assert!(matches!(
        err_of(b"hello world, this is text"),
        StreamError::BadMagic { .. }
    ));
}

#[test]
fn newer_format_version() {
    let mut b = header(2, 0, PS);
    b.extend_from_slice(&record(5, 0, &[]));
    let e = err_of(&b);
    assert!(
        matches!(
            e,
            StreamError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("version 2") && msg.contains('1'), "{msg}");
    // A newer version is reported even if the rest of its header differs.
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&7u16.to_le_bytes());
    assert!(matches!(
        err_of(&b),
        StreamError::UnsupportedVersion { found: 7, .. }
    ));
    assert!(matches!(
        err_of(&crafted_with_header(header(0, 0, PS))),
        StreamError::UnsupportedVersion { found: 0, .. }
    ));
}

fn crafted_with_header(mut h: Vec<u8>) -> Vec<u8> {
    h.extend_from_slice(&record(5, 0, &[]));
    h
}

#[test]
fn bad_header_fields() {
    let mut b = crafted(&[]);
    b[17] ^= 1;
    assert!(matches!(err_of(&b), StreamError::HeaderChecksum { .. }));
    let e = err_of(&crafted_with_header(header(1, 4, PS)));
    assert!(
        matches!(e, StreamError::BadHeader(_)) && e.to_string().contains("flags"),
        "{e}"
    );
    for ps in [0, 1, 2048, 4095, 4097, 12288, 4 << 20, u32::MAX] {
        let e = err_of(&crafted_with_header(header(1, 0, ps)));
        assert!(
            matches!(e, StreamError::BadHeader(_)) && e.to_string().contains("page size"),
            "{e}"
        );
        assert!(matches!(
            StreamWriter::new(Vec::new(), ps),
            Err(StreamError::InvalidArgument(_))
        ));
    }
}

#[test]
fn unknown_record_type() {
    for ty in [0u16, 6, 0xffff] {
        let e = err_of(&crafted(&[record(ty, 0, b"x")]));
        assert!(
            matches!(e, StreamError::UnknownRecordType { record: 0, offset: 20, record_type } if record_type == ty),
            "{e:?}"
        );
        assert!(
            e.to_string().contains(&format!("unknown record type {ty}")),
            "{e}"
        );
    }
}

#[test]
fn record_flags_and_fixed_sizes() {
    let e = err_of(&crafted(&[record(4, 1, &7u64.to_le_bytes())]));
    assert!(
        matches!(e, StreamError::BadRecord { .. }) && e.to_string().contains("flags"),
        "{e}"
    );
    assert!(matches!(
        err_of(&crafted(&[record(4, 0, &[1, 2, 3])])),
        StreamError::BadRecord { .. }
    ));
    let mut b = header(1, 0, PS);
    b.extend_from_slice(&record(5, 0, &[0]));
    assert!(matches!(err_of(&b), StreamError::BadRecord { .. }));
}

#[test]
fn section_version_too_new() {
    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    w.write_section("serial", 0, 3, &serial()).unwrap();
    let recs = read_all(&w.finish().unwrap()).unwrap();
    let Record::Section(s) = &recs[0] else {
        panic!("section")
    };
    let e = s.decode::<Serial>(2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "section 'serial' instance 0 has version 3; this cryo reads versions up to 2"
    );
    assert!(s.decode::<Serial>(3).is_ok());
}

#[test]
fn section_decode_errors() {
    let s = Section {
        name: "x".into(),
        instance: 1,
        version: 1,
        data: vec![1],
    };
    assert!(matches!(
        s.decode::<Serial>(1),
        Err(StreamError::Decode { .. })
    ));
    let s = Section {
        data: vec![1, 2],
        ..s
    };
    assert!(matches!(
        s.decode::<u8>(1),
        Err(StreamError::TrailingState { extra: 1, .. })
    ));
}

#[test]
fn bad_section_names_and_lengths() {
    let long = [b'a'; 65];
    for name in [&b""[..], &long[..], b"se\nrial", b"\xc3\xa9"] {
        let e = err_of(&crafted(&[record(1, 0, &section_payload(name, 0, 1, &[]))]));
        assert!(matches!(e, StreamError::BadSection { .. }), "{e:?}");
        if let Ok(name) = std::str::from_utf8(name) {
            let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
            assert!(matches!(
                w.write_raw_section(name, 0, 1, &[]),
                Err(StreamError::BadSection { .. })
            ));
        }
    }
    // A 64-byte name with every printable character class is fine.
    let name = "a Z~!@#0".repeat(8);
    assert!(read_all(&crafted(&[record(
        1,
        0,
        &section_payload(name.as_bytes(), 0, 1, &[])
    )]))
    .is_ok());
    // State length disagreeing with the payload.
    let mut p = section_payload(b"ok", 0, 1, &[1, 2, 3]);
    p.pop();
    assert!(matches!(
        err_of(&crafted(&[record(1, 0, &p)])),
        StreamError::BadSection { .. }
    ));
    let mut p = section_payload(b"ok", 0, 1, &[1, 2, 3]);
    p.push(0);
    assert!(matches!(
        err_of(&crafted(&[record(1, 0, &p)])),
        StreamError::BadSection { .. }
    ));
    // Name length larger than the payload.
    let e = err_of(&crafted(&[record(1, 0, &[0x40, 0, b'a'])]));
    assert!(matches!(e, StreamError::BadSection { .. }), "{e:?}");
}

#[test]
fn bad_layouts() {
    let ps = u64::from(PS);
    let cases: Vec<Vec<(u64, u64)>> = vec![
        vec![(0, 0)],                            // zero size
        vec![(0, ps + 1)],                       // size not page multiple
        vec![(1, ps)],                           // address not aligned
        vec![(ps * 4, ps), (0, ps)],             // unsorted
        vec![(0, ps * 2), (ps, ps)],             // overlapping
        vec![(u64::MAX - ps + 1, ps * 2)],       // overflow
        vec![(0, ps); MAX_REGIONS as usize + 1], // too many
    ];
    for regions in cases {
        let e = err_of(&crafted(&[record(2, 0, &layout_payload(&regions))]));
        assert!(
            matches!(e, StreamError::BadLayout { .. }),
            "{regions:?}: {e:?}"
        );
        let rr: Vec<RamRegion> = regions
            .iter()
            .map(|&(guest_addr, size)| RamRegion { guest_addr, size })
            .collect();
        let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
        assert!(matches!(
            w.write_ram_layout(&rr),
            Err(StreamError::BadLayout { .. })
        ));
    }
    // Adjacent regions and a region ending at the top of the address space are fine.
    let ok = [(0, ps), (ps, ps), (u64::MAX - ps + 1 - ps, ps)];
    assert!(read_all(&crafted(&[record(2, 0, &layout_payload(&ok))])).is_ok());
    // Count disagreeing with the payload; a count far too large.
    let mut p = layout_payload(&[(0, ps)]);
    p[0] = 2;
    assert!(matches!(
        err_of(&crafted(&[record(2, 0, &p)])),
        StreamError::BadLayout { .. }
    ));
    let p = u32::MAX.to_le_bytes();
    assert!(matches!(
        err_of(&crafted(&[record(2, 0, &p)])),
        StreamError::BadLayout { .. }
    ));
    // A second layout.
    let e = err_of(&crafted(&[layout_record(), layout_record()]));
    assert!(
        matches!(e, StreamError::BadLayout { record: 1, .. }),
        "{e:?}"
    );
    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    w.write_ram_layout(&layout()).unwrap();
    assert!(matches!(
        w.write_ram_layout(&layout()),
        Err(StreamError::BadLayout { .. })
    ));
}

#[test]
fn pages_out_of_range() {
    let page = vec![0u8; PS as usize];
    for (region, first, count) in [
        (1u32, 0u64, 1u32),
        (0, 4, 1),
        (0, 3, 2),
        (0, u64::MAX, 2),
        (0, 0, 0),
    ] {
        let e = err_of(&crafted(&[
            layout_record(),
            record(3, 0, &pages_payload(region, first, count, 1, &[])),
        ]));
        assert!(
            matches!(e, StreamError::PagesOutOfRange { record: 1, .. }),
            "{e:?}"
        );
    }
    let e = err_of(&crafted(&[
        layout_record(),
        record(3, 0, &pages_payload(0, 4, 1, 0, &page)),
    ]));
    assert!(e.to_string().contains("region 0 has 4 pages"), "{e}");

    let mut w = StreamWriter::new(Vec::new(), PS).unwrap();
    assert!(matches!(
        w.write_pages(0, 0, &page),
        Err(StreamError::PagesBeforeLayout { .. })
    ));
    w.write_ram_layout(&layout()).unwrap();
    assert!(matches!(
        w.write_pages(2, 0, &page),
        Err(StreamError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        w.write_pages(1, 2, &page),
        Err(StreamError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        w.write_zero_pages(0, 1, 4),
        Err(StreamError::PagesOutOfRange { .. })
    ));
    assert!(matches!(
        w.write_pages(0, 0, &page[1..]),
        Err(StreamError::InvalidArgument(_))
    ));
    // Nothing was written by the refused calls: the stream is still valid.
    w.write_zero_pages(0, 0, 0).unwrap();
    w.write_pages(0, 0, &[]).unwrap();
    assert!(read_all(&w.finish().unwrap()).is_ok());
}

#[test]
fn pages_before_layout() {
    let e = err_of(&crafted(&[record(3, 0, &pages_payload(0, 0, 1, 1, &[]))]));
    assert!(
        matches!(
            e,
            StreamError::PagesBeforeLayout {
                record: 0,
                offset: 20
            }
        ),
        "{e:?}"
    );
}

#[test]
fn pages_data_size_must_match() {
    let page = vec![0u8; PS as usize];
    for (enc, data) in [(0u8, &page[1..]), (0, &[0u8; 4097][..]), (1, &[0u8][..])] {
        let e = err_of(&crafted(&[
            layout_record(),
            record(3, 0, &pages_payload(0, 0, 1, enc, data)),
        ]));
        assert!(matches!(e, StreamError::BadRecord { .. }), "{e:?}");
    }
    let e = err_of(&crafted(&[layout_record(), record(3, 0, &[0; 16])]));
    assert!(matches!(e, StreamError::BadRecord { .. }), "{e:?}");
}

#[test]
fn unsupported_encodings() {
    for enc in [2u8, 3, 4, 255] {
        let e = err_of(&crafted(&[
            layout_record(),
            record(3, 0, &pages_payload(0, 0, 1, enc, b"zz")),
        ]));
        assert!(
            matches!(e, StreamError::UnsupportedEncoding { encoding, .. } if encoding == enc),
            "{e:?}"
        );
        assert!(e.to_string().contains("unsupported page encoding"), "{e}");
    }
}

/// A reader that panics if asked for more than `budget` bytes in total.
struct Budget<'a> {
    data: &'a [u8],
    budget: usize,
}

impl Read for Budget<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.read(buf)?;
        self.budget = self.budget.checked_sub(n).expect("read past the budget");
        Ok(n)
    }
}

#[test]
fn huge_length_is_refused_before_reading_the_payload() {
    let mut b = header(1, 0, PS);
    b.extend_from_slice(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    b.extend_from_slice(&[0u8; 100]);
    let mut r = StreamReader::new(Budget {
        data: &b,
        budget: 28,
    })
    .unwrap();
    let e = r.next_record().unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::RecordTooLarge {
                record: 0,
                offset: 20,
                len: 0xffff_ffff,
                max: MAX_PAYLOAD
            }
        ),
        "{e:?}"
    );
    assert_eq!(r.offset(), 28);
    // After an error the reader refuses to go on.
    assert!(matches!(
        r.next_record(),
        Err(StreamError::Failed { offset: 28 })
    ));
}

#[test]
fn claimed_length_beyond_input_is_truncated() {
    let mut b = header(1, 0, PS);
    b.extend_from_slice(&[1, 0, 0, 0]);
    b.extend_from_slice(&(MAX_PAYLOAD).to_le_bytes());
    b.extend_from_slice(&[0u8; 10]);
    let e = err_of(&b);
    assert!(
        matches!(e, StreamError::Truncated { offset: 38, .. }),
        "{e:?}"
    );
}

#[test]
fn configurable_payload_limit() {
    let bytes = sample();
    let limits = ReaderLimits { max_payload: 100 };
    let mut r = StreamReader::with_limits(bytes.as_slice(), limits).unwrap();
    let e = loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("limit not applied"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            e,
            StreamError::RecordTooLarge {
                record: 3,
                max: 100,
                ..
            }
        ),
        "{e:?}"
    );
    // Above the format's maximum the format's maximum applies.
    let limits = ReaderLimits {
        max_payload: u32::MAX,
    };
    let mut b = header(1, 0, PS);
    b.extend_from_slice(&record(1, 0, &[]).as_slice()[..4]);
    b.extend_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let mut r = StreamReader::with_limits(b.as_slice(), limits).unwrap();
    assert!(matches!(
        r.next_record(),
        Err(StreamError::RecordTooLarge {
            max: MAX_PAYLOAD,
            ..
        })
    ));
}

/// Yields its data in small pieces, interrupted now and then, and ends with
/// an `UnexpectedEof` error instead of `Ok(0)`.
struct Awkward<'a> {
    data: &'a [u8],
    calls: usize,
}

impl Read for Awkward<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(3) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.data.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(self.data.len()).min(7);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn short_reads_interrupts_and_unexpected_eof() {
    let bytes = sample();
    let s = summarize(Awkward {
        data: &bytes,
        calls: 0,
    })
    .unwrap();
    assert_eq!(s.total_bytes, bytes.len() as u64);
    let cut = &bytes[..bytes.len() - 30];
    let e = summarize(Awkward {
        data: cut,
        calls: 0,
    })
    .unwrap_err();
    assert!(
        matches!(e, StreamError::Truncated { offset, .. } if offset == cut.len() as u64),
        "{e:?}"
    );
}

#[test]
fn io_errors_carry_the_offset() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    let e = summarize(Failing).unwrap_err();
    assert!(matches!(e, StreamError::Io { offset: 0, .. }));
    assert!(e.to_string().contains("disk on fire"), "{e}");
}

#[test]
fn oversized_state_is_refused_by_the_writer() {
    let mut w = StreamWriter::new(io::sink(), PS).unwrap();
    let big = vec![0u8; MAX_PAYLOAD as usize];
    assert!(matches!(
        w.write_raw_section("big", 0, 1, &big),
        Err(StreamError::RecordTooLarge { .. })
    ));
    assert_eq!(w.bytes_written(), HEADER_LEN as u64);
}

#[test]
fn spec_example_bytes() {
    // The example in docs/stream-format.md, section 4.
    let hex = "43 52 59 4f 53 54 52 4d 01 00 00 00 00 10 00 00 5e 4e f8 c7 \
               01 00 00 00 16 00 00 00 06 00 73 65 72 69 61 6c \
               00 00 00 00 01 00 00 00 02 00 00 00 01 02 ae 84 35 4f \
               05 00 00 00 00 00 00 00 c0 4d 09 e4";
    let expected: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mut w = StreamWriter::new(Vec::new(), 4096).unwrap();
    w.write_raw_section("serial", 0, 1, &[1, 2]).unwrap();
    assert_eq!(w.finish().unwrap(), expected);
    assert_eq!(expected.len(), 66);
    // The CRC32C check value from the spec.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}
