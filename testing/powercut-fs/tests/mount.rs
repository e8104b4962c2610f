//! The file system mounted for real (needs root and /dev/fuse): what survives a power cut
//! (SIGUSR1) and an orderly shutdown (SIGTERM), for the system calls the tracker relies on.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Mounted {
    child: Option<Child>,
    stderr: PathBuf,
    mnt: PathBuf,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

impl Mounted {
    fn new(extra: &[&str]) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        let stderr = dir.path().join("fs.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_powercut-fs"))
            .arg("--verbose")
            .args(extra)
            .arg(&backing)
            .arg(&mnt)
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "powercut-fs did not mount: {}",
            fs::read_to_string(&stderr).unwrap_or_default()
        );
        assert!(is_mounted(&mnt));
        Mounted {
            child: Some(child),
            stderr,
            mnt,
            backing,
            _dir: dir,
        }
    }

    fn m(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn b(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }

    /// Sends `sig`, waits for a clean exit and the unmount; returns the daemon's log.
    fn stop(&mut self, sig: i32) -> String {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(c.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "powercut-fs did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = fs::read_to_string(&self.stderr).unwrap_or_default();
        assert!(st.success(), "powercut-fs exited with {st}: {log}");
        assert!(!is_mounted(&self.mnt), "still mounted after exit");
        log
    }

    fn cut(&mut self) -> String {
        self.stop(libc::SIGUSR1)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let p = std::ffi::CString::new(self.mnt.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: umount2 with a NUL-terminated path.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn only_fsynced_data_survives_a_power_cut() {
    let mut m = Mounted::new(&[]);
    let f = rw(&m.m("f"));
    sync_dir(&m.mnt);
    f.write_all_at(&[b'A'; 10000], 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(&[b'B'; 5000], 2000).unwrap();
    f.write_all_at(b"tail", 20000).unwrap();
    // Reads through the mount see everything; the backing file only what was synced.
    let mut all = Vec::new();
    File::open(m.m("f")).unwrap().read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 20004);
    assert_eq!(&all[1999..2001], b"AB");
    assert_eq!(fs::read(m.b("f")).unwrap(), vec![b'A'; 10000]);
    // A new file whose directory is fsynced keeps its name, not its data.
    let mut g = File::create(m.m("g")).unwrap();
    g.write_all(b"never synced").unwrap();
    drop(g);
    sync_dir(&m.mnt);
    drop(f);
    let log = m.cut();
    assert!(log.contains("power cut"), "{log}");
    assert_eq!(fs::read(m.b("f")).unwrap(), vec![b'A'; 10000]);
    assert_eq!(fs::read(m.b("g")).unwrap(), b"");
}

#[test]
fn names_are_lost_at_a_cut_unless_their_directory_was_fsynced() {
    let mut m = Mounted::new(&[]);
    fs::write(m.b("durable"), b"was there").unwrap();
    fs::write(m.b("victim"), b"victim data").unwrap();
    fs::create_dir(m.m("d")).unwrap();
    sync_dir(&m.mnt);
    // In d (fsynced): a file created and its data fsynced.
    let mut f = File::create(m.m("d/kept")).unwrap();
    f.write_all(b"kept").unwrap();
    f.sync_all().unwrap();
    sync_dir(&m.m("d"));
    // In the root (never fsynced again): a new file with fsynced data, a new directory, an
    // unlink, a rename over an existing file.
    let mut f = File::create(m.m("lost")).unwrap();
    f.write_all(b"data fsynced, name not").unwrap();
    f.sync_all().unwrap();
    fs::create_dir(m.m("newdir")).unwrap();
    fs::remove_file(m.m("durable")).unwrap();
    fs::rename(m.m("d/kept"), m.m("victim")).unwrap();
    assert!(!m.m("durable").exists() && m.m("lost").exists());
    assert_eq!(fs::read(m.m("victim")).unwrap(), b"kept");
    // The trash the file system keeps is not visible.
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains("powercut")), "{names:?}");
    let log = m.cut();
    // Every change in the root is undone, the one in d stays.
    assert!(!m.b("lost").exists(), "{log}");
    assert!(!m.b("newdir").exists(), "{log}");
    assert_eq!(fs::read(m.b("durable")).unwrap(), b"was there");
    assert_eq!(fs::read(m.b("victim")).unwrap(), b"victim data");
    assert_eq!(fs::read(m.b("d/kept")).unwrap(), b"kept");
    assert!(!m.b(".powercut-trash").exists());
    // An orderly shutdown keeps them all.
    let mut m2 = Mounted::new(&[]);
    fs::write(m2.m("a"), b"a").unwrap();
    fs::write(m2.b("b"), b"b").unwrap();
    fs::rename(m2.m("b"), m2.m("c")).unwrap();
    m2.stop(libc::SIGTERM);
    assert_eq!(fs::read(m2.b("a")).unwrap(), b"a");
    assert!(!m2.b("b").exists() && m2.b("c").exists());
}

#[test]
fn seek_data_and_seek_hole_see_real_holes() {
    let m = Mounted::new(&[]);
    let f = rw(&m.m("img"));
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[1u8; 4096], 256 << 10).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    let seek = |pos: i64, whence: i32| {
        // SAFETY: lseek(2) on our descriptor; no memory is passed.
        unsafe { libc::lseek(fd, pos, whence) }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), 256 << 10);
    assert_eq!(seek(256 << 10, libc::SEEK_HOLE), (256 << 10) + 4096);
    // Pending (unsynced) writes and punches count too.
    f.write_all_at(&[2u8; 4096], 512 << 10).unwrap();
    assert_eq!(seek((256 << 10) + 4096, libc::SEEK_DATA), 512 << 10);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on our descriptor.
    assert_eq!(unsafe { libc::fallocate(fd, punch, 256 << 10, 4096) }, 0);
    assert_eq!(seek(0, libc::SEEK_DATA), 512 << 10);
    assert_eq!(seek(1 << 20, libc::SEEK_DATA), -1);
}

#[test]
fn msync_of_a_shared_mapping_reaches_the_daemon_as_fsync() {
    let mut m = Mounted::new(&[]);
    let f = rw(&m.m("map"));
    sync_dir(&m.mnt);
    f.set_len(4 * 4096).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a file of ours, sized above, not changed by anyone else while mapped.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
    map[10] = 1;
    map[4096 + 10] = 2;
    // msync(MS_SYNC) of the first two pages only.
    map.flush_range(0, 2 * 4096).unwrap();
    map[2 * 4096 + 10] = 3;
    // Dirty, never msynced: written back to the daemon when unmapped and closed, but not
    // fsynced, so the power cut drops it.
    drop(map);
    drop(f);
    let log = m.cut();
    let back = fs::read(m.b("map")).unwrap();
    assert_eq!(back.len(), 4 * 4096);
    assert_eq!(
        (back[10], back[4096 + 10], back[2 * 4096 + 10]),
        (1, 2, 0),
        "{log}"
    );
}

#[test]
fn atomic_replace_with_rename_and_directory_fsync() {
    let mut m = Mounted::new(&[]);
    fs::create_dir(m.m("state")).unwrap();
    sync_dir(&m.mnt);
    fs::write(m.m("state/x.json"), b"old").unwrap();
    File::open(m.m("state/x.json")).unwrap().sync_all().unwrap();
    // write temp, fsync, rename over, fsync the directory: durable.
    {
        let mut t = File::create(m.m("state/.x.json.tmp")).unwrap();
        t.write_all(b"new").unwrap();
        t.sync_all().unwrap();
    }
    fs::rename(m.m("state/.x.json.tmp"), m.m("state/x.json")).unwrap();
    File::open(m.m("state")).unwrap().sync_all().unwrap();
    // The same without the fsync of the temp file, then with the directory fsynced: the name
    // moves, the data does not.
    fs::write(m.m("state/y"), b"y data").unwrap();
    fs::rename(m.m("state/y"), m.m("state/x.json")).unwrap();
    assert_eq!(fs::read(m.m("state/x.json")).unwrap(), b"y data");
    sync_dir(&m.m("state"));
    // And without the fsync of the directory: the rename is lost, the durable file stays.
    fs::write(m.m("state/z"), b"z").unwrap();
    File::open(m.m("state/z")).unwrap().sync_all().unwrap();
    fs::rename(m.m("state/z"), m.m("state/x.json")).unwrap();
    m.cut();
    assert_eq!(fs::read(m.b("state/x.json")).unwrap(), b"");
    assert!(!m.b("state/y").exists() && !m.b("state/.x.json.tmp").exists());
    assert!(!m.b("state/z").exists());

    // Write temp, fsync, rename, but no fsync of the directory: the old file stays.
    let mut m = Mounted::new(&[]);
    fs::write(m.b("x"), b"old").unwrap();
    {
        let mut t = File::create(m.m("x.tmp")).unwrap();
        t.write_all(b"new").unwrap();
        t.sync_all().unwrap();
    }
    fs::rename(m.m("x.tmp"), m.m("x")).unwrap();
    m.cut();
    assert_eq!(fs::read(m.b("x")).unwrap(), b"old");
    assert!(!m.b("x.tmp").exists());
}

#[test]
fn fallocate_truncate_and_orderly_shutdown() {
    let mut m = Mounted::new(&[]);
    let f = rw(&m.m("img"));
    f.write_all_at(&[7u8; 64 * 1024], 0).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on our descriptor.
    assert_eq!(unsafe { libc::fallocate(fd, punch, 4096, 8192) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fallocate(fd, zero, 20000, 100) }, 0);
    let mut buf = vec![0u8; 64 * 1024];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[4096..12288].iter().all(|b| *b == 0) && buf[4095] == 7 && buf[12288] == 7);
    assert!(buf[20000..20100].iter().all(|b| *b == 0) && buf[20100] == 7);
    // The punched range is a hole now.
    // SAFETY: lseek(2) on our descriptor.
    assert_eq!(unsafe { libc::lseek(fd, 4096, libc::SEEK_DATA) }, 12288);
    f.set_len(30000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 30000);
    // Nothing synced yet, but SIGTERM is an orderly shutdown: everything is applied.
    assert_eq!(fs::read(m.b("img")).unwrap(), vec![7u8; 64 * 1024]);
    drop(f);
    let log = m.stop(libc::SIGTERM);
    assert!(log.contains("orderly shutdown"), "{log}");
    let back = fs::read(m.b("img")).unwrap();
    assert_eq!(back, buf[..30000]);
}

#[test]
fn flock_works_between_descriptors() {
    let m = Mounted::new(&[]);
    let a = rw(&m.m("lock"));
    let b = rw(&m.m("lock"));
    let try_lock = |f: &std::fs::File| {
        // SAFETY: flock(2) on a descriptor `f` keeps open; no memory is passed.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }
    };
    assert_eq!(try_lock(&a), 0);
    assert_ne!(try_lock(&b), 0);
    drop(a);
    assert_eq!(try_lock(&b), 0);
}

#[test]
fn persist_on_cut_writes_back_some_pages_only() {
    let mut m = Mounted::new(&["--persist-on-cut", "0.5", "--seed", "7"]);
    let f = rw(&m.m("p"));
    sync_dir(&m.mnt);
    f.set_len(64 * 4096).unwrap();
    f.sync_all().unwrap();
    for p in 0..64u64 {
        f.write_all_at(&[1u8; 4096], p * 4096).unwrap();
    }
    drop(f);
    m.cut();
    let back = fs::read(m.b("p")).unwrap();
    let kept = back.chunks(4096).filter(|c| c[0] == 1).count();
    assert!(back.chunks(4096).all(|c| c.iter().all(|b| *b == c[0])));
    assert!((8..=56).contains(&kept), "{kept} of 64 pages kept");
}
