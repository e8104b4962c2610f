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

/// qemu-io driven line by line, its output (stdout and stderr) collected as it comes.
struct QemuIo {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl QemuIo {
    fn open(image_opts: &str) -> QemuIo {
        use std::process::Stdio;
        let mut child = Command::new("qemu-io")
            .arg("--image-opts")
            .arg(image_opts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running qemu-io");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for mut pipe in pipes {
            let out = std::sync::Arc::clone(&out);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        QemuIo { child, stdin, out }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the output says `what` (at most `limit`: a bound, not a measure).
    fn wait_for(&self, what: &str, limit: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let out = self.output();
            if out.contains(what) {
                return out;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never said {what:?}:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `file.reconnect-delay` on a VM's drive (as `dist/vm1.toml` and the README have it): a
/// write the guest makes while the tracker is down (killed, as before `Restart=on-failure`
/// brings it back) waits, and completes once a tracker serves the disk again; it is in the
/// image and tracked. Without the option the same write fails: the option is what holds it.
#[test]
fn a_drives_reconnect_delay_holds_writes_while_the_tracker_restarts() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d0.img", 64 * MIB);
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    let opts = |extra: &str| {
        format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},\
             file.export=disk0{extra}",
            t.socket.display()
        )
    };
    let wrote = |offset: u64| format!("wrote 65536/65536 bytes at offset {offset}");
    // Without a reconnect delay: the write fails once its tracker is gone.
    let mut plain = QemuIo::open(&opts(""));
    plain.send("write -P 0x11 0 64k");
    plain.wait_for(&wrote(0), Duration::from_secs(30));
    let mut held = QemuIo::open(&opts(",file.reconnect-delay=30"));
    held.send("write -P 0x22 64k 64k");
    held.wait_for(&wrote(65536), Duration::from_secs(30));
    let (state, socket) = (t.state.clone(), t.socket.clone());
    t.kill9();
    plain.send("write -P 0x33 2M 64k");
    let out = plain.wait_for("write failed", Duration::from_secs(30));
    assert!(!out.contains(&wrote(2 * MIB)), "{out}");
    // With it: the write waits for a tracker, which comes back on the same state and socket.
    held.send("write -P 0x5a 1M 64k");
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    assert_eq!((&t.state, &t.socket), (&state, &socket));
    held.wait_for(&wrote(MIB), Duration::from_secs(60));
    // (One command at a time: qemu-io reads a line only when its input becomes readable.)
    held.send("read -P 0x5a 1M 64k");
    let out = held.wait_for(
        "read 65536/65536 bytes at offset 1048576",
        Duration::from_secs(30),
    );
    assert!(!out.contains("failed"), "{out}");
    held.send("quit");
    assert!(wait_timeout(&mut held.child, Duration::from_secs(30)).success());
    // Tracked: the restarted tracker has the block dirty, for the shipper's next cycle.
    let map = parse_map(&stdout(
        Command::new("nbdinfo")
            .arg("--map=qemu:dirty-bitmap:vmreplica")
            .arg(t.uri("disk0")),
    ));
    assert!(
        ranges_with(&map, 1)
            .iter()
            .any(|(o, l)| *o <= MIB && o + l >= MIB + 65536),
        "{map:?}"
    );
    t.stop();
    let mut f = std::fs::File::open(&img).unwrap();
    let mut buf = vec![0u8; 65536];
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
}
