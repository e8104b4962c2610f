//! The wire codec's tests: round trips, old versions, hostile frames, paging, chunks.
use super::*;
use crate::direct;
use crate::iobuf::IoBuf;

fn tag(cycle: u64) -> Tag {
    Tag {
        lineage: Lineage([7; 16]),
        cycle,
        epoch: 3,
    }
}

fn point(cycle: u64) -> LineagePoint {
    LineagePoint {
        lineage: Lineage([9; 16]),
        cycle,
    }
}

fn frame(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    encode(m, &mut buf).unwrap();
    buf
}

fn all() -> Vec<Message> {
    let l = Lineage([9; 16]);
    vec![
        Message::Hello {
            version: 3,
            vm: "vm1".into(),
            lineage: Some(l),
        },
        Message::Hello {
            version: 3,
            vm: "vm1".into(),
            lineage: None,
        },
        Message::Welcome {
            paused: None,
            version: 3,
            lineage: Some(l),
            last_cycle: 7,
            last_freeze: 77,
            receiving: Some(Receiving {
                lineage: l,
                cycle: 8,
                kind: CycleKind::Resync,
                freeze: 88,
            }),
            definition: Some(DefinitionHash([5; 16])),
            role: Role::Replica,
        },
        Message::Welcome {
            paused: None,
            version: 3,
            lineage: None,
            last_cycle: 0,
            last_freeze: 0,
            receiving: None,
            definition: None,
            role: Role::FailedOver {
                lineage: l,
                parent: point(5),
            },
        },
        Message::Welcome {
            paused: None,
            version: 3,
            lineage: Some(l),
            last_cycle: 9,
            last_freeze: 0,
            receiving: None,
            definition: Some(DefinitionHash([6; 16])),
            role: Role::Primary {
                lineage: Lineage([1; 16]),
                parent: point(9),
            },
        },
        Message::Welcome {
            paused: None,
            version: 3,
            lineage: Some(l),
            last_cycle: 9,
            last_freeze: 0,
            receiving: None,
            definition: None,
            role: Role::ReversePending { parent: point(9) },
        },
        Message::Welcome {
            version: 4,
            lineage: Some(l),
            last_cycle: 9,
            last_freeze: 0,
            receiving: None,
            definition: None,
            role: Role::Replica,
            paused: Some(1_796_000_000),
        },
        Message::Welcome {
            version: 4,
            lineage: Some(l),
            last_cycle: 9,
            last_freeze: 3,
            receiving: None,
            definition: Some(DefinitionHash([6; 16])),
            role: Role::Replica,
            paused: None,
        },
        Message::Paused {
            since: 1_796_000_000,
        },
        Message::Resumed { at: 0 },
        Message::PauseNoted {
            paused: Some(1_796_000_000),
        },
        Message::PauseNoted { paused: None },
        Message::BeginCycle {
            lineage: l,
            cycle: 8,
            kind: CycleKind::Initial,
            freeze: 88,
            disks: vec![DiskInfo {
                name: "sys".into(),
                size: 1 << 30,
                granularity: 65536,
            }],
            parent: None,
            meta: CycleMeta::default(),
        },
        Message::BeginCycle {
            lineage: l,
            cycle: 12,
            kind: CycleKind::Reverse,
            freeze: 89,
            disks: vec![],
            parent: Some(point(9)),
            meta: CycleMeta::default(),
        },
        Message::Divergent {
            ranges: vec![Range {
                disk: 0,
                offset: 1 << 20,
                len: 65536,
            }],
            last: true,
        },
        Message::Promote {
            lineage: l,
            cycle: 9,
            back: Endpoint {
                addr: "192.0.2.1:7443".into(),
                name: "site-a".into(),
            },
            here: Endpoint {
                addr: "192.0.2.2:7443".into(),
                name: "site-b".into(),
            },
            interval: "5m".into(),
            start: true,
            definition: Some("version = 1\nname = \"vm1\"\n".repeat(1000)),
        },
        Message::Promoted {
            lineage: Lineage([2; 16]),
        },
        Message::Reverse {
            start: false,
            discard_local: true,
            last_write_at: 1_700_000_000,
            back: Endpoint {
                addr: "a:1".into(),
                name: "a".into(),
            },
            here: Endpoint {
                addr: "b:2".into(),
                name: "b".into(),
            },
            interval: "continuous".into(),
        },
        Message::ReverseOk {
            lineage: Lineage([2; 16]),
            parent: point(9),
            since: 1_700_000_001,
        },
        Message::BeginCycle {
            lineage: l,
            cycle: 9,
            kind: CycleKind::Delta,
            freeze: 89,
            disks: vec![DiskInfo {
                name: "sys".into(),
                size: 1 << 30,
                granularity: 65536,
            }],
            parent: None,
            meta: CycleMeta {
                app_consistent: true,
                frozen_at: 1_790_000_000,
                interval: 300,
                rpo_limit: 3600,
                excluded: vec![("swap".into(), 4 << 30)],
            },
        },
        Message::Resume {
            lineage: l,
            cycle: 8,
            epoch: 4,
            ranges: vec![Range {
                disk: 1,
                offset: 4096,
                len: 1 << 33,
            }],
            last: true,
        },
        Message::Chunk(Chunk::pack(tag(8), 0, 65536, &[7u8; 4096], true)),
        Message::Acked {
            cycle: 8,
            epoch: 4,
            bytes: 1 << 20,
        },
        Message::Manifest {
            lineage: l,
            cycle: 8,
            epoch: 4,
            ranges: 3,
            bytes: 99,
            digest: 5,
        },
        Message::Applied {
            lineage: l,
            cycle: 8,
        },
        Message::Error {
            code: code::NOT_ALLOWED,
            message: "no".into(),
        },
        Message::HashRequest {
            disk: "sys".into(),
            offset: 0,
            block: 65536,
            count: 16,
        },
        Message::Hashes {
            disk: "sys".into(),
            offset: 0,
            hashes: vec![1, 2, 3],
        },
        Message::Definition {
            hash: DefinitionHash([3; 16]),
            definition: "version = 1\nname = \"vm1\"\n".into(),
            reverse: Some(ReverseTarget {
                replica: "192.0.2.1:7443".into(),
                server_name: "replica-2".into(),
            }),
        },
        Message::Definition {
            hash: DefinitionHash([3; 16]),
            definition: String::new(),
            reverse: None,
        },
        Message::DefinitionStored {
            hash: DefinitionHash([3; 16]),
            error: Some("VM definition vm1: bad".into()),
        },
        Message::DefinitionStored {
            hash: DefinitionHash([3; 16]),
            error: None,
        },
    ]
}

#[test]
fn every_message_round_trips_and_partial_frames_wait() {
    for m in all() {
        let buf = frame(&m);
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Ok(None), "{m:?} cut at {cut}");
        }
        assert_eq!(decode(&buf), Ok(Some((m.clone(), buf.len()))));
    }
}

#[test]
fn version_1_hello_and_welcome_decode_so_they_can_be_refused() {
    // Version 1 layouts: type, version, then the VM name / the last cycle.
    let mut hello = vec![T_HELLO, 0, 1, 0, 3];
    hello.extend_from_slice(b"vm1");
    let mut f = (hello.len() as u32).to_be_bytes().to_vec();
    f.extend(hello);
    assert_eq!(
        decode(&f).unwrap().unwrap().0,
        Message::Hello {
            version: 1,
            vm: "vm1".into(),
            lineage: None
        }
    );
    let mut welcome = vec![T_WELCOME, 0, 1];
    welcome.extend(5u64.to_be_bytes());
    let mut f = (welcome.len() as u32).to_be_bytes().to_vec();
    f.extend(welcome);
    assert_eq!(
        decode(&f).unwrap().unwrap().0,
        Message::Welcome {
            paused: None,
            version: 1,
            lineage: None,
            last_cycle: 5,
            last_freeze: 0,
            receiving: None,
            definition: None,
            role: Role::Replica,
        }
    );
    // Version 2's welcome ends before the role.
    let v2 = Message::Welcome {
        paused: None,
        version: 2,
        lineage: Some(Lineage([3; 16])),
        last_cycle: 5,
        last_freeze: 6,
        receiving: None,
        role: Role::Replica,
        definition: None,
    };
    let f = frame(&v2);
    assert_eq!(decode(&f).unwrap().unwrap().0, v2);
    let mut v3 = frame(&Message::Welcome {
        paused: None,
        version: 3,
        lineage: Some(Lineage([3; 16])),
        last_cycle: 5,
        last_freeze: 6,
        receiving: None,
        role: Role::Replica,
        definition: None,
    });
    assert_eq!(v3.len(), f.len() + 1, "the role is one byte more");
    v3.pop();
    v3[3] -= 1;
    assert!(decode(&v3).is_err(), "a version 3 welcome carries its role");
    // A version 2 hello must carry its lineage field.
    let mut cut = frame(&Message::Hello {
        version: 2,
        vm: "vm1".into(),
        lineage: None,
    });
    cut.pop();
    cut[3] -= 1;
    assert!(decode(&cut).is_err());
}

#[test]
fn a_chunk_frame_splits_into_head_and_payload() {
    let c = Chunk::pack(tag(8), 1, 65536, &[7u8; 4096], true);
    let whole = frame(&Message::Chunk(c.clone()));
    let head = chunk_frame_head(&c);
    assert_eq!([head.as_slice(), &c.payload].concat(), whole);
    assert_eq!(head.len(), 4 + CHUNK_HEAD);
    assert!(is_chunk(&head[4..]));
    let (got, plen) = decode_chunk_head(head[4..].try_into().unwrap()).unwrap();
    assert_eq!(plen, c.payload.len());
    assert_eq!(
        Chunk {
            payload: c.payload.clone(),
            ..got
        },
        c
    );
    let mut bad = head.clone();
    // The length field: after type, lineage, cycle, epoch, disk and offset.
    let at = 4 + 1 + 16 + 8 + 8 + 2 + 8;
    bad[at..at + 4].copy_from_slice(&(MAX_CHUNK + 1).to_be_bytes());
    assert_eq!(
        decode_chunk_head(bad[4..].try_into().unwrap()),
        Err(WireError::ChunkTooLarge(MAX_CHUNK + 1))
    );
    bad[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        decode_chunk_head(bad[4..].try_into().unwrap()),
        Err(WireError::BadChunk { .. })
    ));
    assert!(!is_chunk(&[T_HELLO]));
}

#[test]
fn hostile_frames_are_refused_without_big_allocations() {
    assert_eq!(
        decode(&[0xff, 0xff, 0xff, 0xff]),
        Err(WireError::FrameTooLarge(u32::MAX.into()))
    );
    // A list count far beyond the frame's bytes.
    let mut f = vec![0, 0, 0, 38, T_RESUME];
    f.extend([0u8; 16]);
    f.extend(8u64.to_be_bytes());
    f.extend(1u64.to_be_bytes());
    f.push(1);
    f.extend(u32::MAX.to_be_bytes());
    assert!(matches!(decode(&f), Err(WireError::ListTooLong(_))));
    assert!(matches!(
        decode(&[0, 0, 0, 1, 200]),
        Err(WireError::UnknownType(200))
    ));
    let mut buf = frame(&Message::Acked {
        cycle: 1,
        epoch: 1,
        bytes: 1,
    });
    buf[3] += 1;
    buf.push(0);
    assert_eq!(decode(&buf), Err(WireError::Trailing(1)));
}

#[test]
fn the_encoder_refuses_frames_over_the_limit_and_a_huge_resume_is_paged() {
    // More than 190,000 chunks' worth of ranges (apart, so none merge): one frame could
    // not hold them.
    let mut applied = RangeSet::new();
    for i in 0..300_000u64 {
        applied.insert((i % 3) as u16, i * 131072, i * 131072 + 65536);
    }
    let l = Lineage([1; 16]);
    let whole = Message::Resume {
        lineage: l,
        cycle: 9,
        epoch: 2,
        ranges: applied.iter().collect(),
        last: true,
    };
    let mut out = vec![1, 2, 3];
    assert!(matches!(
        encode(&whole, &mut out),
        Err(WireError::FrameTooLarge(_))
    ));
    assert_eq!(out, [1, 2, 3], "a refused frame leaves nothing behind");
    let pages = resume_pages(l, 9, 2, &applied);
    assert!(pages.len() >= 3);
    let mut back = RangeSet::new();
    let mut lasts = Vec::new();
    for p in &pages {
        let f = frame(p);
        assert!(f.len() <= MAX_FRAME as usize + 4);
        match decode(&f).unwrap().unwrap().0 {
            Message::Resume {
                ranges,
                last,
                epoch,
                ..
            } => {
                assert_eq!(epoch, 2);
                lasts.push(last);
                ranges.into_iter().for_each(|r| back.insert_range(r));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(back, applied);
    assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
    assert_eq!(lasts.last(), Some(&true));
    // Nothing applied: one empty, last page.
    assert_eq!(resume_pages(l, 9, 2, &RangeSet::new()).len(), 1);
    // A string longer than the limit is cut at a character boundary, not split.
    let long = "é".repeat(3000);
    let f = frame(&Message::Error {
        code: 1,
        message: long,
    });
    match decode(&f).unwrap().unwrap().0 {
        Message::Error { message, .. } => assert!(message.len() <= MAX_STRING as usize),
        other => panic!("{other:?}"),
    }
}

#[test]
fn chunks_pick_their_encoding_and_verify_checksums() {
    let t = tag(1);
    let zero = Chunk::pack(t, 0, 0, &[0u8; 65536], true);
    assert_eq!((zero.encoding, zero.payload.len()), (Encoding::Zero, 0));
    assert_eq!(zero.unpack(), Ok(None));
    let text: Vec<u8> = b"replicate me "
        .iter()
        .cycle()
        .take(65536)
        .copied()
        .collect();
    let c = Chunk::pack(t, 0, 0, &text, true);
    assert_eq!(c.encoding, Encoding::Lz4);
    assert!(c.payload.len() < 2000);
    assert_eq!(c.unpack().unwrap().unwrap(), text);
    let noise = incompressible(65536);
    let r = Chunk::pack(t, 0, 0, &noise, true);
    assert_eq!(r.encoding, Encoding::Raw);
    let mut bad = c.clone();
    bad.payload[10] ^= 0x55;
    assert!(bad.unpack().is_err());
    let mut lie = r.clone();
    lie.checksum ^= 1;
    assert!(matches!(lie.unpack(), Err(WireError::BadChunk { .. })));
    let mut zlie = zero.clone();
    zlie.len = 4096;
    assert!(zlie.unpack().is_err());
    // A scratch buffer left longer and dirty by an earlier chunk still unpacks exactly.
    let mut scratch = vec![0xee; 2 * 65536];
    let short = Chunk::pack(t, 0, 0, &text[..4096], true);
    assert_eq!(
        short.unpack_into(&mut scratch).unwrap(),
        Some(&text[..4096])
    );
    assert_eq!(c.unpack_into(&mut scratch).unwrap(), Some(&text[..]));
    assert_eq!(r.unpack_into(&mut scratch).unwrap(), Some(&noise[..]));
    assert_eq!(zero.unpack_into(&mut scratch).unwrap(), None);
    assert!(bad.unpack_into(&mut scratch).is_err());
    // Aligned: the bytes land at an aligned start of the (dirty, reused) buffer, exactly
    // `len` of them up to its end, whether they were compressed or raw.
    let mut buf = IoBuf::from(vec![0xee; 3 * 65536]);
    for (chunk, want) in [(&short, &text[..4096]), (&c, &text[..]), (&r, &noise[..])] {
        let at = chunk.unpack_aligned(&mut buf).unwrap().unwrap();
        assert_eq!((buf.as_ptr() as usize + at) % direct::ALIGN, 0);
        assert_eq!(&buf[at..], want);
    }
    assert_eq!(zero.unpack_aligned(&mut buf).unwrap(), None);
    assert!(bad.unpack_aligned(&mut buf).is_err());
    assert!(lie.unpack_aligned(&mut buf).is_err());
    let mut short_raw = r.clone();
    short_raw.payload.pop();
    assert!(short_raw.unpack_aligned(&mut buf).is_err());
    // A packed payload keeps no worst-case spare capacity while it is in flight, whatever
    // the chunk's size (up to MAX_CHUNK, compressed in one allocation shrunk in place).
    assert_eq!(c.payload.capacity(), c.payload.len());
    let mut big = text.repeat(MAX_CHUNK as usize / text.len());
    big[1000..1000 + 4096].copy_from_slice(&noise[..4096]);
    let b = Chunk::pack(t, 0, 0, &big, true);
    assert_eq!(b.encoding, Encoding::Lz4);
    assert_eq!(b.payload.capacity(), b.payload.len());
    assert_eq!(b.unpack().unwrap().unwrap(), big);
    // A chunk as large as MAX_CHUNK lands in huge-page memory, ready for a direct write.
    if !cfg!(miri) {
        let mut buf = IoBuf::from(vec![0xee; 3 * 65536]);
        assert_eq!(b.unpack_aligned(&mut buf).unwrap(), Some(0));
        assert!(matches!(buf, IoBuf::Direct(_)) && buf[..] == big[..]);
    }
}

#[test]
fn zero_blocks_amid_data_travel_as_zero_markers() {
    const B: usize = 4096;
    let t = tag(1);
    // Blocks: data, zero, zero, data, zero (the last one short), from a disk offset that
    // is not a block boundary: the first "block" is the 1 KiB up to the boundary.
    let mut data = vec![0u8; 1024 + 4 * B + 100];
    data[..1024].fill(7);
    data[1024 + 2 * B..1024 + 3 * B].fill(9);
    let offset = 3 * B as u64 + 3072;
    let chunks = Chunk::pack_blocks(t, 2, offset, &data, B as u32, true);
    let shape: Vec<(u64, u32, Encoding)> = chunks
        .iter()
        .map(|c| (c.offset, c.len, c.encoding))
        .collect();
    let o = offset;
    assert_eq!(
        shape,
        vec![
            (o, 1024, Encoding::Lz4),
            (o + 1024, 2 * B as u32, Encoding::Zero),
            (o + 1024 + 2 * B as u64, B as u32, Encoding::Lz4),
            (o + 1024 + 3 * B as u64, B as u32 + 100, Encoding::Zero),
        ]
    );
    // Unpacked back to back, they are the data; together they tile the run.
    let mut back = Vec::new();
    let mut covered = RangeSet::new();
    for c in &chunks {
        assert_eq!((c.tag, c.disk), (t, 2));
        covered.insert_range(c.range());
        match c.unpack().unwrap() {
            Some(d) => back.extend(d),
            None => back.extend(vec![0u8; c.len as usize]),
        }
    }
    assert_eq!(back, data);
    assert_eq!(
        covered.iter().collect::<Vec<_>>(),
        vec![Range {
            disk: 2,
            offset,
            len: data.len() as u64
        }]
    );
    // All data, or all zero: one chunk, as `pack` makes it.
    assert_eq!(
        Chunk::pack_blocks(t, 0, 0, &[5; 3 * B], B as u32, true).len(),
        1
    );
    let z = Chunk::pack_blocks(t, 0, 0, &[0; 3 * B], B as u32, true);
    assert_eq!((z.len(), z[0].encoding), (1, Encoding::Zero));
    // No block size: packed whole.
    assert_eq!(Chunk::pack_blocks(t, 0, offset, &data, 0, true).len(), 1);
    assert!(Chunk::pack_blocks(t, 0, 0, &[], B as u32, true).is_empty());
}

/// Malformed lz4 payloads, as a hostile peer may send them, are refused with an error that
/// names the chunk, through every way of unpacking, and never read or write out of bounds
/// (the decoder runs on buffers of exactly the chunk's length; run under Miri or ASan to see
/// that too): garbage, a cut payload, a match reaching before the output's start, a literal
/// run longer than the payload, a valid block of fewer or more bytes than the chunk says.
#[test]
fn malformed_lz4_payloads_are_refused() {
    let t = tag(1);
    let text: Vec<u8> = (0..65536u32).map(|i| (i % 97) as u8).collect();
    let good = Chunk::pack(t, 4, 8192, &text, true);
    assert_eq!(good.encoding, Encoding::Lz4);
    let mut hostile: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 64],
        incompressible(5000),
        good.payload[..good.payload.len() / 2].to_vec(),
        good.payload[..good.payload.len() - 1].to_vec(),
        // 4 literals, then a match at offset 0xffff: before the start of the output.
        vec![0x40, 1, 2, 3, 4, 0xff, 0xff],
        // 15 + 255 + 255 literals announced, 3 there.
        vec![0xf0, 0xff, 0xff, 0x00, 1, 2, 3],
        // A match of length 4 + 15 + 255 + ... from offset 1, longer than the chunk.
        [vec![0x1f, 9, 1, 0], vec![0xff; 300], vec![0x00, 0x00]].concat(),
    ];
    let shorter = lz4_flex::block::compress(&text[..60000]);
    let longer = lz4_flex::block::compress(&[text.clone(), text.clone()].concat());
    hostile.extend([shorter, longer, [good.payload.clone(), vec![0; 8]].concat()]);
    for (i, payload) in hostile.into_iter().enumerate() {
        let mut c = good.clone();
        c.payload = payload;
        let mut scratch = vec![0xee; 1000];
        let mut buf = IoBuf::from(vec![0xee; 1000]);
        for err in [
            c.unpack().map(|_| ()),
            c.unpack_into(&mut scratch).map(|_| ()),
            c.unpack_aligned(&mut buf).map(|_| ()),
        ] {
            match err {
                Err(WireError::BadChunk {
                    disk: 4,
                    offset: 8192,
                    ref reason,
                }) if reason.starts_with("lz4") || reason.contains("length") => {}
                other => panic!("payload {i}: {other:?}"),
            }
        }
    }
}

/// Chunks stay plain lz4 blocks (no size prefix, no frame): what this build packs, lz4_flex (as
/// older shippers and appliers used) unpacks, and the other way round.
#[test]
fn lz4_blocks_cross_between_liblz4_and_lz4_flex() {
    let t = tag(1);
    let mut data: Vec<u8> = (0..300_000u32)
        .flat_map(|i| (i % 1009).to_le_bytes())
        .collect();
    data.extend(b"a shared library, some text, ".repeat(10_000));
    data.truncate(MAX_CHUNK as usize);
    for len in [1usize, 13, 4096, 65536 + 7, data.len()] {
        let d = &data[..len];
        let ours = Chunk::pack(t, 0, 0, d, true);
        if ours.encoding == Encoding::Lz4 {
            assert_eq!(lz4_flex::block::decompress(&ours.payload, len).unwrap(), d);
        }
        let mut theirs = ours.clone();
        theirs.encoding = Encoding::Lz4;
        theirs.payload = lz4_flex::block::compress(d);
        assert_eq!(theirs.unpack().unwrap().unwrap(), d, "{len}");
    }
}

/// The cached checksum of a zero run is the checksum of that many zeroes, for more lengths
/// than the cache keeps (evicted lengths are computed again), and zero chunks made by `pack`,
/// `zeroes` and received as markers agree with it; a marker with a wrong one is refused.
#[test]
fn zero_runs_carry_the_checksum_of_their_zeroes() {
    for round in 0..2 {
        for len in (1..200u32)
            .map(|i| i * 4099 % MAX_CHUNK + round)
            .chain([MAX_CHUNK])
        {
            assert_eq!(
                zero_checksum(len),
                checksum(&vec![0; len as usize]),
                "{len}"
            );
        }
    }
    let t = tag(1);
    let packed = Chunk::pack(t, 0, 0, &[0; 12288], true);
    assert_eq!(packed.encoding, Encoding::Zero);
    assert_eq!(packed.checksum, checksum(&[0; 12288]));
    assert_eq!(Chunk::zeroes(t, 0, 0, 12288), packed);
    assert_eq!(packed.unpack().unwrap(), None);
    let mut wrong = packed.clone();
    wrong.len = 8192;
    assert!(wrong.unpack().is_err());
}

/// A welcome of version 2 from before definitions travelled (it ends after `receiving`)
/// decodes as holding none; a flag other than 1 where the hash would start is refused; a
/// definition past its limit is refused before it is read.
#[test]
fn welcomes_without_a_definition_decode_and_oversized_definitions_are_refused() {
    let w = Message::Welcome {
        paused: None,
        version: 2,
        lineage: None,
        last_cycle: 3,
        last_freeze: 4,
        receiving: None,
        definition: None,
        role: Role::Replica,
    };
    let f = frame(&w);
    assert_eq!(decode(&f).unwrap().unwrap().0, w);
    let mut zero_flag = f.clone();
    zero_flag.push(0);
    zero_flag[3] += 1;
    assert_eq!(decode(&zero_flag), Err(WireError::BadFlag(0)));
    let mut big = vec![0, 0, 0, 21, T_DEFINITION];
    big.extend([0u8; 16]);
    big.extend((MAX_DEFINITION + 1).to_be_bytes());
    assert_eq!(
        decode(&big),
        Err(WireError::DefinitionTooLarge(MAX_DEFINITION + 1))
    );
    let mut not_utf8 = vec![0, 0, 0, 24, T_DEFINITION];
    not_utf8.extend([0u8; 16]);
    not_utf8.extend(2u32.to_be_bytes());
    not_utf8.extend([0xff, 0xfe, 0]);
    assert_eq!(decode(&not_utf8), Err(WireError::BadString));
}

/// A `BeginCycle` without cycle metadata is the same frame as before it existed (older
/// shippers' frames read as default metadata); metadata follows the disks behind a tag.
#[test]
fn failover_messages_are_bounded_and_divergent_ranges_are_paged() {
    // A definition longer than the limit is refused, without allocating it.
    let mut f = vec![T_PROMOTE];
    f.extend([0u8; 16]);
    f.extend(9u64.to_be_bytes());
    for s in ["a:1", "a", "b:2", "b", "5m"] {
        f.extend((s.len() as u16).to_be_bytes());
        f.extend(s.as_bytes());
    }
    f.push(1);
    f.push(1);
    f.extend((MAX_DEFINITION + 1).to_be_bytes());
    let mut framed = (f.len() as u32).to_be_bytes().to_vec();
    framed.extend(f);
    assert_eq!(decode(&framed), Err(WireError::BadString));
    // An unknown role is refused.
    let mut w = frame(&Message::Welcome {
        paused: None,
        version: 3,
        lineage: None,
        last_cycle: 0,
        last_freeze: 0,
        receiving: None,
        role: Role::Replica,
        definition: None,
    });
    *w.last_mut().unwrap() = 9;
    assert_eq!(decode(&w), Err(WireError::BadKind(9)));
    // Divergent ranges of any number arrive in pages that each fit a frame.
    let mut set = RangeSet::new();
    for i in 0..250_000u64 {
        set.insert(0, i * 131072, i * 131072 + 65536);
    }
    let pages = divergent_pages(&set);
    assert_eq!(pages.len(), 3);
    let mut back = RangeSet::new();
    for (i, p) in pages.iter().enumerate() {
        let mut buf = Vec::new();
        encode(p, &mut buf).unwrap();
        match decode(&buf).unwrap().unwrap().0 {
            Message::Divergent { ranges, last } => {
                assert_eq!(last, i == 2);
                ranges.into_iter().for_each(|r| back.insert_range(r));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(back, set);
    assert!(matches!(
        &divergent_pages(&RangeSet::new())[..],
        [Message::Divergent { last: true, ranges }] if ranges.is_empty()
    ));
}

/// A `BeginCycle` without cycle metadata is the same frame as before it existed (frames
/// without it read as default metadata); metadata follows the parent behind a tag.
#[test]
fn cycle_metadata_is_an_optional_tail_of_begin_cycle() {
    let plain = Message::BeginCycle {
        lineage: Lineage([1; 16]),
        cycle: 3,
        kind: CycleKind::Delta,
        freeze: 5,
        disks: vec![],
        parent: None,
        meta: CycleMeta::default(),
    };
    let f = frame(&plain);
    // tag + lineage + cycle + kind + freeze + disk count + no parent (version 3)
    assert_eq!(f.len(), 4 + 1 + 16 + 8 + 1 + 8 + 4 + 1);
    let Message::BeginCycle { meta, .. } = decode(&f).unwrap().unwrap().0 else {
        panic!()
    };
    assert_eq!(meta, CycleMeta::default());
    let mut bad = f.clone();
    bad.push(9);
    let n = (bad.len() - 4) as u32;
    bad[..4].copy_from_slice(&n.to_be_bytes());
    assert_eq!(decode(&bad), Err(WireError::BadFlag(9)));
}

/// Version 4's welcome always flags its definition and carries the replica's pause; a
/// version 3 welcome (no pause, the definition absent when none) still decodes, so that a
/// version 3 applier is refused by its version and not by a decoding error; a truncated
/// pause or a bad flag is refused; the refusal names both versions and the older site.
#[test]
fn version_4_welcomes_carry_the_pause_and_version_3_ones_still_decode() {
    let v4 = |definition, paused| Message::Welcome {
        version: 4,
        lineage: Some(Lineage([3; 16])),
        last_cycle: 5,
        last_freeze: 6,
        receiving: None,
        role: Role::Replica,
        definition,
        paused,
    };
    let v3 = Message::Welcome {
        version: 3,
        lineage: Some(Lineage([3; 16])),
        last_cycle: 5,
        last_freeze: 6,
        receiving: None,
        role: Role::Replica,
        definition: None,
        paused: None,
    };
    let old = frame(&v3);
    assert_eq!(decode(&old).unwrap().unwrap().0, v3);
    // Version 4: a definition flag (0) and a pause flag (0) more.
    let none = frame(&v4(None, None));
    assert_eq!(none.len(), old.len() + 2);
    assert_eq!(decode(&none).unwrap().unwrap().0, v4(None, None));
    let paused = frame(&v4(Some(DefinitionHash([1; 16])), Some(42)));
    assert_eq!(paused.len(), old.len() + 1 + 16 + 1 + 8);
    assert_eq!(
        decode(&paused).unwrap().unwrap().0,
        v4(Some(DefinitionHash([1; 16])), Some(42))
    );
    // A version 4 welcome must carry both flags; a cut pause or a flag of 2 is refused.
    let mut cut = none.clone();
    cut.pop();
    cut[3] -= 1;
    assert!(decode(&cut).is_err());
    let mut bad = none.clone();
    *bad.last_mut().unwrap() = 2;
    assert_eq!(decode(&bad), Err(WireError::BadFlag(2)));
    let mut short = frame(&Message::PauseNoted { paused: Some(7) });
    short.pop();
    short[3] -= 1;
    assert!(decode(&short).is_err());
    // The refusal names both versions and which site runs the older vmreplica.
    let m = version_refused("the applier", 3, "this shipper", "replica", "primary");
    assert!(
        m.contains("version 3") && m.contains(&format!("version {PROTOCOL_VERSION}")),
        "{m}"
    );
    assert!(m.contains("upgrade vmreplica on the replica site"), "{m}");
    let m = version_refused("the applier", 9, "this shipper", "replica", "primary");
    assert!(
        m.contains("upgrade vmreplica on this (primary) site"),
        "{m}"
    );
}
