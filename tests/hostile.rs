//! Bad input gets a clear error, never a panic, hang or unbounded allocation; the server
//! keeps serving its other clients. Speaks raw NBD bytes over the socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Connects and negotiates EXPORT_NAME (simple replies); returns the stream after the reply.
fn connect(t: &TrackerProc, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(&t.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend(1u32.to_be_bytes());
    opt.extend((export.len() as u32).to_be_bytes());
    opt.extend(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    s
}

fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend(0u16.to_be_bytes());
    v.extend(typ.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len.to_be_bytes());
    v
}

/// Reads a simple reply; returns (error, cookie).
fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

#[test]
fn bad_requests_get_errors_or_a_clean_disconnect_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let mut good = connect(&t, "d");

    // Errors that keep the connection: read past the end, write past the end, unknown
    // command, a flag the command does not take, block status without a context.
    let mut s = connect(&t, "d");
    s.write_all(&request(0, 1, 8 * MIB - 10, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 1));
    let mut w = request(1, 2, 8 * MIB, 512);
    w.extend([0u8; 512]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (28, 2));
    s.write_all(&request(99, 3, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 3));
    let mut bad_flag = request(0, 4, 0, 512);
    bad_flag[4..6].copy_from_slice(&(1u16 << 3).to_be_bytes());
    s.write_all(&bad_flag).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 4));
    s.write_all(&request(7, 5, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 5));
    s.write_all(&request(0, 6, u64::MAX - 100, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 6));
    // ...and the connection still works.
    s.write_all(&request(0, 7, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 7));
    let mut data = [1u8; 512];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0u8; 512]);

    // Violations that end the connection: bad magic; a 4 GiB write payload (no allocation).
    let mut s = connect(&t, "d");
    let mut bad = request(0, 1, 0, 512);
    bad[0] = 0;
    s.write_all(&bad).unwrap();
    assert_closed(&mut s);
    let mut s = connect(&t, "d");
    s.write_all(&request(1, 1, 0, u32::MAX)).unwrap();
    assert_closed(&mut s);

    // A client vanishing mid-payload, and one vanishing mid-handshake.
    let mut s = connect(&t, "d");
    let mut w = request(1, 1, 0, 65536);
    w.extend([9u8; 1000]);
    s.write_all(&w).unwrap();
    drop(s);
    let mut s = UnixStream::connect(&t.socket).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0").unwrap();
    drop(s);
    // Handshake violations: unknown client flags, unknown export via EXPORT_NAME.
    let mut s = UnixStream::connect(&t.socket).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert_closed(&mut s);

    // The first client never noticed any of it.
    let mut w = request(1, 42, 4096, 4096);
    w.extend([5u8; 4096]);
    good.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut good), (0, 42));
    good.write_all(&request(3, 43, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut good), (0, 43));
    drop(good);
    // And new clients are still served.
    run(Command::new("qemu-io").args(["-f", "raw", &t.uri("d"), "-c", "read -P 5 4096 4096"]));
    t.stop();
}

#[test]
fn unknown_export_with_go_gets_an_error_and_the_handshake_continues() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let out = Command::new("nbdinfo")
        .arg(t.uri("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown export") || err.contains("missing"),
        "{err}"
    );
    run(Command::new("nbdinfo").arg(t.uri("d")));
    t.stop();
}
