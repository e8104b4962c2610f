//! Bad input gets a clear error, never a panic, hang or unbounded allocation; the server
//! keeps serving its other clients. Speaks raw NBD bytes over the socket.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
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

/// Descriptors and threads of process `pid`.
fn fds_and_threads(pid: i32) -> (usize, usize) {
    let n = |d: String| std::fs::read_dir(d).unwrap().count();
    (n(format!("/proc/{pid}/fd")), n(format!("/proc/{pid}/task")))
}

/// Descriptors and threads of process `pid` at rest: the least of each seen over 2.5 s.
/// The tracker saves its last-write time (a temporary file and its directory open for a
/// moment) up to 2 s after a write, so one sample taken after writes may count those.
fn fds_and_threads_at_rest(pid: i32) -> (usize, usize) {
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    let mut least = fds_and_threads(pid);
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
        let (f, t) = fds_and_threads(pid);
        least = (least.0.min(f), least.1.min(t));
    }
    least
}

/// Sends `bytes` in pieces of 1 byte (the first `ones` bytes), then of varying sizes up to
/// 70,000 bytes (a small deterministic generator), as a client on a slow link would.
fn send_fragmented(s: &mut UnixStream, bytes: &[u8], ones: usize) {
    let mut x = 12345u64;
    let mut i = 0;
    while i < bytes.len() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = if i < ones {
            1
        } else {
            1 + (x >> 33) as usize % 70_000
        };
        let end = (i + k).min(bytes.len());
        s.write_all(&bytes[i..end]).unwrap();
        i = end;
    }
}

/// Requests split at every byte boundary, payloads that straddle the server's connection
/// buffer or are larger than it (up to the 32 MiB maximum), thousands of small requests
/// packed into one write, and clients that vanish in the middle of a payload: every byte
/// lands where it should, and nothing is left behind (descriptors, threads).
#[test]
fn fragmented_packed_and_abandoned_requests_are_served_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 64 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let mut s = connect(&t, "d");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let sizes = [1u32, 512, 4096, 9000, 65536, 65537, 300_000, 32 << 20];
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (0..*n)
                .map(|j| (j as usize * 7 + i * 13) as u8 | 1)
                .collect()
        })
        .collect();
    let at = |i: usize| if i == 7 { 32 * MIB } else { i as u64 * MIB };
    let mut w = Vec::new();
    for (i, d) in data.iter().enumerate() {
        w.extend(request(1, i as u64, at(i), d.len() as u32));
        w.extend(d);
    }
    let mut r = Vec::new();
    for (i, d) in data.iter().enumerate() {
        r.extend(request(0, 100 + i as u64, at(i), d.len() as u32));
    }
    let mut ws = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || send_fragmented(&mut ws, &w, 200_000));
    for _ in 0..sizes.len() {
        assert_eq!(simple_reply(&mut s).0, 0, "a write failed");
    }
    sender.join().unwrap();
    // The reads only once every write is acknowledged (NBD orders nothing in flight).
    send_fragmented(&mut s, &r, r.len());
    for _ in 0..sizes.len() {
        let (err, cookie) = simple_reply(&mut s);
        assert_eq!(err, 0);
        let want = &data[(cookie - 100) as usize];
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == *want, "read {cookie} returned other bytes");
    }

    // 3,000 writes of 512 bytes in one piece (1.6 MB: several times the connection buffer).
    let mut packed = Vec::new();
    for i in 0..3000u64 {
        packed.extend(request(1, i, 40 * MIB + i * 512, 512));
        packed.extend([(i % 251) as u8 + 1; 512]);
    }
    let mut ws = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || ws.write_all(&packed).unwrap());
    for _ in 0..3000 {
        assert_eq!(simple_reply(&mut s).0, 0);
    }
    sender.join().unwrap();
    let mut back = vec![0u8; 3000 * 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 40 * MIB)
        .unwrap();
    for (i, block) in back.chunks(512).enumerate() {
        assert!(block.iter().all(|b| *b == (i % 251) as u8 + 1), "block {i}");
    }

    // Clients that announce a 32 MiB write and vanish after 100 KB of it.
    let before = fds_and_threads_at_rest(t.pid());
    for _ in 0..50 {
        let mut c = connect(&t, "d");
        c.write_all(&request(1, 1, 0, 32 << 20)).unwrap();
        c.write_all(&[0xee; 100_000]).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fds_and_threads(t.pid()) != before {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?} descriptors and threads, {before:?} before",
            fds_and_threads(t.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing of theirs was written, and the first connection is still served.
    s.write_all(&request(0, 7, 0, 1)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 7));
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], data[0][0]);
    t.stop();
}

/// A client that stays connected but never reads its replies cannot keep the tracker from
/// stopping: after the drain timeout it is disconnected and the tracker exits cleanly.
#[test]
fn a_client_that_never_reads_cannot_keep_the_tracker_from_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 16 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let mut s = connect(&t, "d");
    // 200 MiB of read replies (far more than the socket and the byte budget hold), unread.
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..200u64 {
        if s.write_all(&request(0, i, (i % 15) * MIB, MIB as u32))
            .is_err()
        {
            break; // the server stopped reading: its budget is full
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    t.stop();
    assert!(started.elapsed() < Duration::from_secs(25));
    drop(s);
}
