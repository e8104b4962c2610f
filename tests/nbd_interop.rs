//! The tracker as a disk for real NBD clients: QEMU (qemu-io, qemu-img, extended headers),
//! libnbd (nbdinfo, nbdcopy) and the `nbd` crate's old-style client.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn qemu_io_patterns_match_the_image_and_are_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d0.img", 64 * MIB);
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    let uri = t.uri("disk0");
    let out = stdout(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 1M 3M",
        "-c",
        "write -P 0xcd 20M 4k",
        "-c",
        "aio_write -P 0x11 30M 64k",
        "-c",
        "aio_write -P 0x12 31M 64k",
        "-c",
        "aio_flush",
        "-c",
        "discard 2M 64k",
        "-c",
        "write -z 8M 1M",
        "-c",
        "read -P 0xab 1M 1M",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0x12 31M 64k",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("failed"), "{out}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&img));

    // Exactly the written 64 KiB blocks are dirty.
    let map = parse_map(&stdout(
        Command::new("nbdinfo")
            .arg("--map=qemu:dirty-bitmap:vmreplica")
            .arg(&uri),
    ));
    assert_eq!(
        ranges_with(&map, 1),
        vec![
            (MIB, 3 * MIB),
            (8 * MIB, MIB),
            (20 * MIB, 64 * 1024),
            (30 * MIB, 64 * 1024),
            (31 * MIB, 64 * 1024)
        ]
    );
    // base:allocation shows the punched hole and the untouched space as holes.
    let alloc = parse_map(&stdout(Command::new("nbdinfo").arg("--map").arg(&uri)));
    let holes = ranges_with(&alloc, 1);
    assert!(
        holes
            .iter()
            .any(|(o, l)| *o <= 2 * MIB && o + l >= 2 * MIB + 65536),
        "{alloc:?}"
    );
    assert!(
        holes
            .iter()
            .any(|(o, l)| *o <= 40 * MIB && o + l >= 64 * MIB),
        "{alloc:?}"
    );
    t.stop();
    // The image on disk matches what the client wrote.
    let mut f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    f.seek(SeekFrom::Start(20 * MIB)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0xcd));
}

#[test]
fn nbdinfo_lists_exports_and_contexts_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 8 * MIB);
    let b = image(dir.path(), "b.img", 16 * MIB);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let t = TrackerProc::start(
        dir.path(),
        &[("sys", &a), ("data", &b)],
        &["--listen", &listen, "--insecure-plaintext"],
    );
    let list = stdout(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://{listen}")),
    );
    assert!(
        list.contains("export=\"sys\"") && list.contains("export=\"data\""),
        "{list}"
    );
    assert!(list.contains("qemu:dirty-bitmap:vmreplica"), "{list}");
    let size = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://{listen}/data")),
    );
    assert_eq!(size.trim(), (16 * MIB).to_string());
    t.stop();
}

#[test]
fn nbdcopy_in_and_out_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 32 * MIB);
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; (32 * MIB) as usize];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 3 != 0 {
            chunk.fill((i % 251) as u8 + 1);
        }
    }
    std::fs::write(&src, &data).unwrap();
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let uri = t.uri("d");
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    let back = dir.path().join("back.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    t.stop();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "copied-out data differs"
    );
    assert!(std::fs::read(&img).unwrap() == data, "image differs");
}

#[test]
fn old_style_client_export_name_and_simple_replies() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 4 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&t.socket).unwrap();
    let export = nbd::client::handshake(&mut s, b"d").unwrap();
    assert_eq!(export.size, 4 * MIB);
    {
        let mut c = nbd::client::NbdClient::new(&mut s, &export);
        c.seek(SeekFrom::Start(4096)).unwrap();
        c.write_all(&[7u8; 8192]).unwrap();
        c.seek(SeekFrom::Start(4096)).unwrap();
        let mut buf = [0u8; 8192];
        c.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        // Reading past the end is an error reply, not a hang or a disconnect.
        c.seek(SeekFrom::Start(4 * MIB - 10)).unwrap();
        assert!(c.read_exact(&mut buf).is_err());
    }
    drop(s);
    t.stop();
    let data = std::fs::read(&img).unwrap();
    assert!(data[4096..4096 + 8192].iter().all(|b| *b == 7));
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
