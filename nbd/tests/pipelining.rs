//! The driver with a device that completes requests inline (on the connection's reader
//! thread, whose replies are batched) and one that completes them on another thread, under a
//! client that pipelines far more than the byte budget holds: every request gets exactly one
//! reply, with its data, and the connection closes cleanly.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmreplica_nbd::{BlockDevice, Done, Export, Extent, ReadDone, Server, ServerConfig};

/// A device in memory; `threaded` completes on a thread of its own, else inline.
struct Mem {
    data: Mutex<Vec<u8>>,
    threaded: bool,
}

impl Mem {
    fn complete(&self, f: impl FnOnce() + Send + 'static) {
        if self.threaded {
            std::thread::spawn(f);
        } else {
            f()
        }
    }
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, len: u32, done: ReadDone) {
        let o = offset as usize;
        let buf = self.data.lock().unwrap()[o..o + len as usize].to_vec();
        self.complete(move || done(Ok(buf)))
    }
    fn write(&self, offset: u64, data: Vec<u8>, _fua: bool, done: Done) {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(&data);
        self.complete(move || done(Ok(())))
    }
    fn block_status(&self, _: usize, _: u64, len: u64, _: usize) -> io::Result<Vec<Extent>> {
        Ok(vec![(len, 0)])
    }
}

const SIZE: usize = 8 << 20;
const BIG: u32 = 4 << 20;

fn connect(sock: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    // Fixed newstyle, no zeroes; then NBD_OPT_EXPORT_NAME "disk".
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(
        u64::from_be_bytes(info[..8].try_into().unwrap()),
        SIZE as u64
    );
    s
}

fn request(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&typ.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn run(threaded: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let server = Server::new(
        ServerConfig::default(),
        vec![Export {
            name: "disk".into(),
            description: String::new(),
            device: Arc::new(Mem {
                data: Mutex::new(pattern.clone()),
                threaded,
            }),
            read_only: false,
        }],
    );
    server
        .listen_unix(UnixListener::bind(&sock).unwrap())
        .unwrap();
    let s = connect(&sock);
    let mut w = s.try_clone().unwrap();
    // 40 reads of 4 MiB (160 MiB: over twice the driver's budget, so the reader waits for
    // replies while holding some), then 500 small writes and reads, then a disconnect.
    let sender = std::thread::spawn(move || {
        let mut cookie = 0u64;
        for i in 0..40u64 {
            w.write_all(&request(0, cookie, (i % 2) * u64::from(BIG), BIG))
                .unwrap();
            cookie += 1;
        }
        for i in 0..500u64 {
            let mut r = request(1, cookie, i * 4096, 4096);
            r.extend(std::iter::repeat_n(i as u8, 4096));
            w.write_all(&r).unwrap();
            cookie += 1;
            w.write_all(&request(0, cookie, i * 4096, 4096)).unwrap();
            cookie += 1;
        }
        w.write_all(&request(2, cookie, 0, 0)).unwrap();
        cookie
    });
    let mut r = s;
    let mut seen = std::collections::HashSet::new();
    let total = 40 + 1000;
    for _ in 0..total {
        let mut head = [0u8; 16];
        r.read_exact(&mut head).unwrap();
        assert_eq!(&head[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&head[4..8], &[0; 4], "an error reply");
        let cookie = u64::from_be_bytes(head[8..].try_into().unwrap());
        assert!(seen.insert(cookie), "two replies for request {cookie}");
        if cookie < 40 {
            let mut buf = vec![0u8; BIG as usize];
            r.read_exact(&mut buf).unwrap();
            let o = ((cookie % 2) * u64::from(BIG)) as usize;
            // The small writes land in the first 2 MiB only after every big read was sent.
            assert!(buf[2 << 20..] == pattern[o + (2 << 20)..o + BIG as usize]);
        } else if (cookie - 40) % 2 == 1 {
            // A read after the write of the same block: this connection's write completed
            // before the read was issued (requests are issued in order).
            let mut buf = vec![0u8; 4096];
            r.read_exact(&mut buf).unwrap();
            let i = (cookie - 40) / 2;
            assert!(buf.iter().all(|b| *b == i as u8), "read {i} saw old data");
        }
    }
    assert_eq!(sender.join().unwrap(), total as u64);
    // After NBD_CMD_DISC the server closes the connection.
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.shutdown();
}

#[test]
fn inline_completions_are_batched_and_all_answered() {
    run(false)
}

#[test]
fn completions_from_another_thread_are_all_answered() {
    run(true)
}

fn serve(threaded: bool) -> (tempfile::TempDir, Arc<Server>, Arc<Mem>, UnixStream) {
    serve_with(threaded, ServerConfig::default())
}

fn serve_with(
    threaded: bool,
    config: ServerConfig,
) -> (tempfile::TempDir, Arc<Server>, Arc<Mem>, UnixStream) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(Mem {
        data: Mutex::new(vec![0u8; SIZE]),
        threaded,
    });
    let server = Server::new(
        config,
        vec![Export {
            name: "disk".into(),
            description: String::new(),
            device: Arc::clone(&mem) as Arc<dyn BlockDevice>,
            read_only: false,
        }],
    );
    server
        .listen_unix(UnixListener::bind(&sock).unwrap())
        .unwrap();
    let s = connect(&sock);
    (dir, server, mem, s)
}

/// Replies the client does not read yet (far more than the socket buffers) never hold up the
/// requests behind them: within the byte budget the server keeps reading and executing, and
/// every reply still arrives, in one piece, once the client reads.
#[test]
fn a_client_that_does_not_read_yet_does_not_stall_requests() {
    for threaded in [false, true] {
        let (_dir, server, mem, mut s) = serve(threaded);
        // 16 MiB of read replies, unread, then a write.
        for i in 0..16u64 {
            s.write_all(&request(0, i, 0, 1 << 20)).unwrap();
        }
        let mut w = request(1, 16, 4096, 4096);
        w.extend([7u8; 4096]);
        s.write_all(&w).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while mem.data.lock().unwrap()[4096] != 7 {
            assert!(
                std::time::Instant::now() < deadline,
                "the write behind unread replies was not executed (threaded: {threaded})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..17 {
            let mut head = [0u8; 16];
            s.read_exact(&mut head).unwrap();
            assert_eq!(&head[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
            let cookie = u64::from_be_bytes(head[8..].try_into().unwrap());
            assert!(seen.insert(cookie));
            if cookie < 16 {
                let mut buf = vec![1u8; 1 << 20];
                s.read_exact(&mut buf).unwrap();
                // Each read saw the disk before or after the write: zeroes but for that block.
                assert!(buf[..4096].iter().all(|b| *b == 0));
                assert!(buf[8192..].iter().all(|b| *b == 0));
            }
        }
        s.write_all(&request(2, 17, 0, 0)).unwrap();
        server.shutdown();
    }
}

/// A client that disconnects with replies unsent: the connection ends (its budget released,
/// nothing waits for a socket nobody reads) and the server shuts down.
#[test]
fn a_client_that_goes_away_with_replies_pending_ends_its_connection() {
    for threaded in [false, true] {
        let (_dir, server, _mem, mut s) = serve(threaded);
        for i in 0..40u64 {
            s.write_all(&request(0, i, 0, 1 << 20)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.connections("disk") > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the connection outlived its client (threaded: {threaded})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        server.shutdown();
    }
}

/// A client that keeps its connection open but never reads its replies (more than the
/// socket and the byte budget hold, so the writer blocks and the reader waits for budget)
/// cannot hold up a shutdown: past the drain timeout it is disconnected.
#[test]
fn a_client_that_never_reads_cannot_hold_up_a_shutdown() {
    for threaded in [false, true] {
        let config = ServerConfig {
            drain_timeout: Duration::from_millis(500),
            ..ServerConfig::default()
        };
        let (_dir, server, _mem, mut s) = serve_with(threaded, config);
        // 100 MiB of read replies, unread; the client stays connected.
        for i in 0..100u64 {
            s.write_all(&request(0, i, 0, 1 << 20)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let (tx, rx) = std::sync::mpsc::channel();
        let srv = Arc::clone(&server);
        std::thread::spawn(move || {
            srv.shutdown();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(20)).is_ok(),
            "shutdown waits forever for a client that does not read (threaded: {threaded})"
        );
        assert_eq!(server.connections("disk"), 0);
        drop(s);
    }
}

/// A device whose writes wait (as the tracker's do at its gate while a freeze drains them)
/// on the connection's reader thread, after asking for the replies it holds to be sent.
struct Gated {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read(&self, _offset: u64, len: u32, done: ReadDone) {
        done(Ok(vec![3u8; len as usize]))
    }
    fn write(&self, _offset: u64, _data: Vec<u8>, _fua: bool, done: Done) {
        let mut open = self.open.lock().unwrap();
        if !*open {
            vmreplica_nbd::send_held_replies();
        }
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        done(Ok(()))
    }
    fn block_status(&self, _: usize, _: u64, len: u64, _: usize) -> io::Result<Vec<Extent>> {
        Ok(vec![(len, 0)])
    }
}

/// A read completed on the reader thread, then a write that waits in the device: the read's
/// reply (held back for a batch) goes out while the write waits, not after it.
#[test]
fn replies_held_back_go_out_before_the_reader_waits_in_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let dev = Arc::new(Gated {
        open: Mutex::new(false),
        cv: std::sync::Condvar::new(),
    });
    let server = Server::new(
        ServerConfig::default(),
        vec![Export {
            name: "disk".into(),
            description: String::new(),
            device: Arc::clone(&dev) as Arc<dyn BlockDevice>,
            read_only: false,
        }],
    );
    server
        .listen_unix(UnixListener::bind(&sock).unwrap())
        .unwrap();
    let mut s = connect(&sock);
    // Both in one piece: the reader has the write's bytes at hand, so nothing but the
    // device's request makes it send the read's reply before the write.
    let mut both = request(0, 1, 0, 4096);
    both.extend(request(1, 2, 0, 4096));
    both.extend([9u8; 4096]);
    s.write_all(&both).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 16];
    s.read_exact(&mut head)
        .expect("the read's reply waited for the write held in the device");
    assert_eq!(u64::from_be_bytes(head[8..].try_into().unwrap()), 1);
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
    *dev.open.lock().unwrap() = true;
    dev.cv.notify_all();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.read_exact(&mut head).unwrap();
    assert_eq!(u64::from_be_bytes(head[8..].try_into().unwrap()), 2);
    s.write_all(&request(2, 3, 0, 0)).unwrap();
    server.shutdown();
}
