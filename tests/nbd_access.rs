//! Who may use the disks, and how much: NBD over TCP behind TLS (real QEMU and libnbd
//! clients with good and bad certificates, a client that skips STARTTLS), read-only exports,
//! the unix socket's owner, group and mode, a bounded number of connections per export, and
//! running out of file descriptors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A CA, the tracker's certificate (for 127.0.0.1), and QEMU/libnbd credential directories.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.join("pki"),
        };
        pki.vmreplica(&["certs", "init-ca", "--dir", "ca"]);
        pki.vmreplica(&[
            "certs",
            "issue",
            "--ca",
            "ca",
            "--name",
            "tracker-1",
            "--ip",
            "127.0.0.1",
        ]);
        pki
    }

    fn vmreplica(&self, args: &[&str]) {
        std::fs::create_dir_all(&self.dir).unwrap();
        run(Command::new(bin()).current_dir(&self.dir).args(args));
    }

    /// Client credentials for `name` issued by CA `ca` (a directory under the PKI).
    fn client(&self, ca: &str, name: &str) -> PathBuf {
        let out = format!("{ca}-{name}");
        self.vmreplica(&[
            "certs", "x509-dir", "--ca", ca, "--name", name, "--out", &out,
        ]);
        self.dir.join(out)
    }

    fn tracker_args(&self, listen: &str) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--listen".into(),
            listen.into(),
            "--tls-cert".into(),
            p("ca/tracker-1.pem"),
            "--tls-key".into(),
            p("ca/tracker-1.key"),
            "--tls-ca".into(),
            p("ca/ca.pem"),
            "--tls-allow".into(),
            "client-1".into(),
            "--tls-allow".into(),
            "*.clients.example".into(),
        ]
    }
}

fn qemu_io_tls(creds: &Path, port: u16, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=d,tls-creds=tls0"
        ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().unwrap()
}

fn nbdinfo(uri: &str) -> Output {
    Command::new("nbdinfo").arg(uri).output().unwrap()
}

#[test]
fn tls_clients_with_a_good_certificate_read_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let good = pki.client("ca", "client-1");
    let also = pki.client("ca", "host7.clients.example");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(good.join(f).exists(), "{f} missing in {}", good.display());
    }
    let img = image(dir.path(), "d.img", 16 * MIB);
    let port = free_port();
    let args = pki.tracker_args(&format!("127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &args);
    // QEMU's NBD client over TLS.
    let out = qemu_io_tls(&good, port, &["write -P 0x5a 1M 2M", "read -P 0x5a 1M 2M"]);
    assert!(
        out.status.success() && !text(&out).contains("failed"),
        "{}",
        text(&out)
    );
    // libnbd: nbds:// URIs with the credentials directory, another admitted name.
    let uri = |creds: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/d?tls-certificates={}",
            creds.display()
        )
    };
    let info = nbdinfo(&uri(&also));
    assert!(info.status.success(), "{}", text(&info));
    assert!(text(&info).contains("with TLS"), "{}", text(&info));
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(uri(&good)).arg(&copy));
    let data = std::fs::read(&copy).unwrap();
    assert!(data[MIB as usize..3 * MIB as usize]
        .iter()
        .all(|b| *b == 0x5a));
    assert_eq!(data, std::fs::read(&img).unwrap());
    // The writes were tracked like any other.
    let st = t.ctl(&["status"]);
    assert_eq!(st["disks"][0]["dirty_blocks"], 32, "{st}");
    t.stop();
}

#[test]
fn wrong_client_certificates_are_refused_and_the_log_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // Another CA (with the same default name, as two `certs init-ca` runs give).
    pki.vmreplica(&["certs", "init-ca", "--dir", "other"]);
    let foreign = pki.client("other", "client-1");
    let unlisted = pki.client("ca", "intruder");
    let img = image(dir.path(), "d.img", 8 * MIB);
    let port = free_port();
    let args = pki.tracker_args(&format!("127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &args);
    for (creds, why) in [
        (&foreign, "not issued by the CA"),
        (&unlisted, "not on the allow-list"),
    ] {
        let out = qemu_io_tls(creds, port, &["write -P 1 0 64k"]);
        assert!(
            !out.status.success() || text(&out).contains("failed"),
            "qemu-io got in with {}: {}",
            creds.display(),
            text(&out)
        );
        let info = nbdinfo(&format!(
            "nbds://127.0.0.1:{port}/d?tls-certificates={}",
            creds.display()
        ));
        assert!(!info.status.success(), "{}", text(&info));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.log_text().contains(why) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            t.log_text().contains(why),
            "log lacks {why:?}:\n{}",
            t.log_text()
        );
    }
    assert_eq!(t.ctl(&["status"])["disks"][0]["dirty_blocks"], 0);
    assert!(std::fs::read(&img).unwrap().iter().all(|b| *b == 0));
    t.stop();
}

/// Reads one option reply: (option, type, data).
fn option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend(opt.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    s.write_all(&v).unwrap();
}

#[test]
fn a_client_that_skips_starttls_gets_tls_reqd_and_no_data() {
    const TLS_REQD: u32 = (1 << 31) + 5;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let img = image(dir.path(), "d.img", 8 * MIB);
    std::fs::write(&img, vec![0x77u8; 8 * MIB as usize]).unwrap();
    let port = free_port();
    let args = pki.tracker_args(&format!("127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &args);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, 3, &[]); // LIST
    assert_eq!(option_reply(&mut s).1, TLS_REQD);
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend(b"d");
    go.extend(0u16.to_be_bytes());
    send_option(&mut s, 7, &go); // GO
    let (_, typ, msg) = option_reply(&mut s);
    assert_eq!(typ, TLS_REQD);
    assert!(!msg.windows(1).any(|w| w == [0x77]));
    // EXPORT_NAME cannot be refused politely: the server hangs up, having sent nothing.
    send_option(&mut s, 1, b"d");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "data after EXPORT_NAME without TLS: {rest:?}"
    );
    // Real clients that do not ask for TLS.
    let info = nbdinfo(&format!("nbd://127.0.0.1:{port}/d"));
    assert!(!info.status.success(), "{}", text(&info));
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{port}/d"),
            "-c",
            "read 0 4k",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    t.stop();
}

#[test]
fn tcp_without_tls_needs_an_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let port = free_port();
    let out = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--disk")
        .arg(format!("d={}", img.display()))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--insecure-plaintext"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("state").exists());
    let listen = format!("127.0.0.1:{port}");
    let t = TrackerProc::start(
        dir.path(),
        &[("d", &img)],
        &["--listen", &listen, "--insecure-plaintext"],
    );
    assert!(t.log_text().contains("WITHOUT TLS"), "{}", t.log_text());
    let info = nbdinfo(&format!("nbd://{listen}/d"));
    assert!(info.status.success(), "{}", text(&info));
    t.stop();
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 8 * MIB);
    let b = image(dir.path(), "b.img", 8 * MIB);
    std::fs::write(&a, vec![0x42u8; 8 * MIB as usize]).unwrap();
    let t = TrackerProc::start(dir.path(), &[("a", &a), ("b", &b)], &["--read-only", "a"]);
    let info = stdout(Command::new("nbdinfo").arg(t.uri("a")));
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &t.uri("a"), "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || text(&out).contains("failed"),
        "{}",
        text(&out)
    );
    // A client that ignores the flag gets EPERM for every kind of write.
    let mut s = UnixStream::connect(&t.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend(1u32.to_be_bytes());
    opt.extend(1u32.to_be_bytes());
    opt.extend(b"a");
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    assert!(flags & 2 != 0, "NBD_FLAG_READ_ONLY not set: {flags:#x}");
    for (typ, payload) in [(1u16, 4096u32), (4, 0), (6, 0)] {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend(0u16.to_be_bytes());
        r.extend(typ.to_be_bytes());
        r.extend(9u64.to_be_bytes());
        r.extend(0u64.to_be_bytes());
        r.extend(4096u32.to_be_bytes());
        r.extend(vec![1u8; payload as usize]);
        s.write_all(&r).unwrap();
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep).unwrap();
        assert_eq!(
            u32::from_be_bytes(rep[4..8].try_into().unwrap()),
            1,
            "EPERM for {typ}"
        );
    }
    assert!(std::fs::read(&a).unwrap().iter().all(|b| *b == 0x42));
    // The other disk is writable as ever, and reads of the read-only one work.
    run(Command::new("qemu-io").args(["-f", "raw", &t.uri("b"), "-c", "write -P 1 0 4k"]));
    run(Command::new("qemu-io").args(["-f", "raw", &t.uri("a"), "-r", "-c", "read -P 0x42 0 4k"]));
    assert_eq!(t.ctl(&["status"])["disks"][0]["dirty_blocks"], 0);
    t.stop();
}

#[test]
fn the_sockets_owner_group_and_mode_decide_who_connects() {
    let dir = tempfile::tempdir().unwrap();
    // The user must be able to reach the socket's directory.
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for d in [dir.path(), run_dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let img = image(dir.path(), "d.img", 8 * MIB);
    let state = dir.path().join("state");
    let as_nobody = |t: &TrackerProc| {
        Command::new("runuser")
            .args([
                "-u",
                "nobody",
                "--",
                "qemu-io",
                "-f",
                "raw",
                &t.uri("d"),
                "-c",
                "read 0 4k",
            ])
            .output()
            .unwrap()
    };
    // Default: what the umask leaves of 0666 (never writable by others here).
    let t = TrackerProc::start_split(&state, &run_dir, &[("d", &img)], &[]);
    let umask = vmreplica_common::unixsock::umask();
    assert_eq!(
        std::fs::metadata(&t.socket).unwrap().mode() & 0o777,
        0o666 & !umask
    );
    assert_eq!(
        umask & 0o002,
        0o002,
        "this check needs a umask that keeps others from writing the socket"
    );
    assert_eq!(std::fs::metadata(&t.control).unwrap().mode() & 0o777, 0o600);
    let out = as_nobody(&t);
    assert!(!out.status.success(), "nobody connected: {}", text(&out));
    t.stop();
    // Given to the user QEMU runs as.
    let t = TrackerProc::start_split(
        &state,
        &run_dir,
        &[("d", &img)],
        &[
            "--socket-owner",
            "nobody",
            "--socket-group",
            "nogroup",
            "--socket-mode",
            "0660",
        ],
    );
    let m = std::fs::metadata(&t.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid()), (0o660, 65534));
    let out = as_nobody(&t);
    assert!(out.status.success(), "{}", text(&out));
    // The control socket stays the owner's.
    assert_eq!(std::fs::metadata(&t.control).unwrap().mode() & 0o777, 0o600);
    t.stop();
}

/// An NBD client that has finished its handshake (EXPORT_NAME) and holds the connection.
fn held(t: &TrackerProc) -> Option<UnixStream> {
    let mut s = UnixStream::connect(&t.socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).ok()?;
    s.write_all(&3u32.to_be_bytes()).ok()?;
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend(1u32.to_be_bytes());
    opt.extend(1u32.to_be_bytes());
    opt.extend(b"d");
    s.write_all(&opt).ok()?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).ok()?;
    Some(s)
}

#[test]
fn connections_per_export_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &["--max-connections", "2"]);
    let a = held(&t).unwrap();
    let _b = held(&t).unwrap();
    let info = Command::new("nbdinfo").arg(t.uri("d")).output().unwrap();
    assert!(!info.status.success(), "a third connection got in");
    // What the third one is told: NBD_REP_ERR_POLICY, saying why.
    let mut s = UnixStream::connect(&t.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = b"IHAVEOPT".to_vec();
    go.extend(7u32.to_be_bytes());
    go.extend(7u32.to_be_bytes());
    go.extend(1u32.to_be_bytes());
    go.extend(b"d");
    go.extend(0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        (1 << 31) + 2
    );
    let mut msg = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut msg).unwrap();
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("2 connections"), "{msg}");
    drop(a);
    // The slot frees as the connection ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if Command::new("nbdinfo")
            .arg(t.uri("d"))
            .output()
            .unwrap()
            .status
            .success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.stop();
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn running_out_of_descriptors_refuses_connections_without_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let state = dir.path().join("state");
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("tracker.log");
    let mut child = Guard(
        Command::new("prlimit")
            .arg("--nofile=48:48")
            .arg(bin())
            .args(["tracker", "--state-dir"])
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(format!("d={}", img.display()))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "tracker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Far more connections than descriptors: they wait in the backlog.
    let mut conns = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = UnixStream::connect(&socket) {
            conns.push(s);
        }
    }
    let cpu0 = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_secs(pid) - cpu0;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(
        spent < 0.5,
        "the tracker burnt {spent:.2} CPU-seconds in 3 s"
    );
    assert!(
        (1..=3).contains(&lines),
        "{lines} lines about the accept failures:\n{}",
        &text[..text.len().min(4000)]
    );
    // Descriptors back: it serves again.
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let ok = Command::new("nbdinfo")
            .arg(format!("nbd+unix:///d?socket={}", socket.display()))
            .output()
            .unwrap()
            .status
            .success();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the tracker never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(child.try_wait().is_none(), "the tracker exited");
    child.kill();
}

/// A pids cgroup of our own holding `pid`, limited to `max` tasks (threads count); removed
/// when dropped. None where no pids controller can be used.
struct PidsLimit {
    dir: PathBuf,
    procs: PathBuf,
}

impl PidsLimit {
    fn new(pid: i32, max: usize) -> Option<PidsLimit> {
        // cgroup v1's pids hierarchy, or v2's (where the pids controller is enabled).
        let name = format!("vmreplica-test-{}", std::process::id());
        let dir = [
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ]
        .into_iter()
        .map(|b| Path::new(b).join(&name))
        .find(|d| {
            std::fs::create_dir(d).is_ok()
                && (d.join("pids.max").exists() || std::fs::remove_dir(d).is_err())
        })?;
        let l = PidsLimit {
            procs: dir.join("cgroup.procs"),
            dir,
        };
        std::fs::write(l.dir.join("pids.max"), max.to_string()).ok()?;
        std::fs::write(&l.procs, pid.to_string()).ok()?;
        Some(l)
    }

    fn set(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).unwrap();
    }
}

impl Drop for PidsLimit {
    fn drop(&mut self) {
        // Whatever is left goes back to the root group, then the group goes.
        let root = self.dir.parent().unwrap().join("cgroup.procs");
        for pid in std::fs::read_to_string(&self.procs)
            .unwrap_or_default()
            .lines()
        {
            let _ = std::fs::write(&root, pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn running_out_of_threads_refuses_connections_and_the_tracker_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let threads = std::fs::read_dir(format!("/proc/{}/task", t.pid()))
        .unwrap()
        .count();
    let Some(limit) = PidsLimit::new(t.pid(), threads + 2) else {
        panic!("no pids cgroup controller to limit the tracker's threads with");
    };
    let mut held_conns = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = UnixStream::connect(&t.socket) {
            held_conns.push(s);
        }
    }
    let cpu0 = cpu_secs(t.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_secs(t.pid()) - cpu0;
    assert!(
        spent < 0.5,
        "the tracker burnt {spent:.2} CPU-seconds in 2 s"
    );
    let log = t.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("cannot start a thread"))
        .count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
    drop(held_conns);
    limit.set("max");
    let deadline = Instant::now() + Duration::from_secs(40);
    while !Command::new("nbdinfo")
        .arg(t.uri("d"))
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the tracker never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(limit);
    t.stop();
}
