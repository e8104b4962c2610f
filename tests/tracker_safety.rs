//! The tracker on its error paths, with the real binary and real QEMU tools: a crash between
//! the steps of a merge or a release, a lost state file, a bitmap zeroed behind its back, a
//! second writer on its image, a full state directory under a frozen generation, a bitmap
//! truncated or replaced under the shipper.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vmreplica_tracker::frozen::FrozenReader;
use vmreplica_tracker::Generation;

const MIB: u64 = 1 << 20;

fn qemu_io(target: &str, cmd: &str) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    if !target.starts_with("nbd") {
        c.args(["-f", "raw"]);
    }
    c.args([target, "-c", cmd])
        .output()
        .expect("running qemu-io")
}

fn qemu_io_ok(target: &str, cmd: &str) {
    let out = qemu_io(target, cmd);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {target} -c {cmd:?}: {text}"
    );
}

fn frozen(t: &TrackerProc) -> Option<Generation> {
    let st = t.ctl(&["status"]);
    serde_json::from_value(st["frozen"].clone()).ok()
}

fn read_frozen(g: &Generation, disk: usize, size: u64) -> Vec<u8> {
    let r = FrozenReader::open(&g.disks[disk]).unwrap();
    let mut buf = vec![0u8; size as usize];
    r.read(0, &mut buf).unwrap();
    buf
}

/// A crash right before `op` (merge or release) saves the state: after a restart the
/// generation is still frozen and reads back exactly as it was frozen (its copies kept).
fn crash_before_saving(op: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 16 * MIB);
    let state = dir.path().join("state");
    let point = format!("{op}.before-save");
    let t = TrackerProc::start_split_env(
        &state,
        dir.path(),
        &[("d", &img)],
        &[],
        &[("VMREPLICA_CRASH_AT", &point)],
    );
    qemu_io_ok(&t.uri("d"), "write -P 0x11 0 4M");
    let g = t.ctl(&["freeze"])["generation"].as_u64().unwrap();
    let at_freeze = std::fs::read(&img).unwrap();
    // Overwrites of frozen blocks: their old contents go to the copy-on-write store.
    qemu_io_ok(&t.uri("d"), "write -P 0x22 0 4M");
    // A release by hand needs --force (without the replica's proof).
    let g_s = g.to_string();
    let args: Vec<&str> = match op {
        "release" => vec![op, &g_s, "--force"],
        _ => vec![op, &g_s],
    };
    let out = t.ctl_output(&args);
    assert!(!out.status.success(), "{op} did not crash at {point}");
    let st = t.wait_exit();
    assert!(!st.success(), "the tracker exited cleanly: {st}");
    let t = TrackerProc::start_split(&state, dir.path(), &[("d", &img)], &[]);
    let gen = frozen(&t).unwrap_or_else(|| panic!("generation {g} is gone after the crash"));
    assert_eq!(gen.generation, g);
    assert!(
        read_frozen(&gen, 0, 16 * MIB) == at_freeze,
        "generation {g} no longer reads as frozen after a crash in its {op}"
    );
    t.ctl(&args);
    assert!(frozen(&t).is_none());
    let st = t.ctl(&["status"]);
    let dirty = st["disks"][0]["dirty_blocks"].as_u64().unwrap();
    if op == "merge" {
        assert_eq!(dirty, 4 * MIB / 65536, "{st}");
    }
    t.stop();
}

#[test]
fn a_crash_before_a_merge_is_saved_keeps_the_generation_as_frozen() {
    crash_before_saving("merge");
}

#[test]
fn a_crash_before_a_release_is_saved_keeps_the_generation_as_frozen() {
    crash_before_saving("release");
}

#[test]
fn a_lost_state_file_forces_a_resync_of_every_disk() {
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a.img", 8 * MIB);
        let b = image(dir.path(), "b.img", 8 * MIB);
        let disks = [("a", a.as_path()), ("b", b.as_path())];
        let t = TrackerProc::start(dir.path(), &disks, &[]);
        qemu_io_ok(&t.uri("a"), "write -P 1 0 64k");
        let state = t.state.clone();
        if kill {
            t.kill9();
        } else {
            t.stop();
        }
        // "The state file is corrupt": the natural reaction is to delete it.
        std::fs::remove_file(state.join("tracker.json")).unwrap();
        let t = TrackerProc::start(dir.path(), &disks, &[]);
        let st = t.ctl(&["status"]);
        for d in 0..2 {
            assert_eq!(st["disks"][d]["resync_required"], true, "kill {kill}: {st}");
            assert_eq!(st["disks"][d]["dirty_blocks"], 128, "kill {kill}: {st}");
        }
        assert!(t.log_text().contains("was lost"), "{}", t.log_text());
        // It stays required across restarts until a resync clears it.
        t.stop();
        let t = TrackerProc::start(dir.path(), &disks, &[]);
        assert_eq!(t.ctl(&["status"])["disks"][1]["resync_required"], true);
        t.stop();
    }
}

#[test]
fn a_bitmap_zeroed_behind_the_trackers_back_forces_a_resync() {
    for kill in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a.img", 64 * MIB);
        let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
        // Spread over many 4 MiB extents, so some leave the activity log at a checkpoint.
        for i in 0..12 {
            qemu_io_ok(&t.uri("a"), &format!("write -P 1 {}M 64k", i * 5));
        }
        let state = t.state.clone();
        if kill {
            t.kill9();
        } else {
            t.stop();
        }
        // Restarting as it is needs no resync.
        let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
        let st = t.ctl(&["status"]);
        assert_eq!(st["disks"][0]["resync_required"], false, "{st}");
        // After kill -9 the logged extents are dirty whole.
        let dirty = if kill { 12 * 64 } else { 12 };
        assert_eq!(st["disks"][0]["dirty_blocks"], dirty, "{st}");
        if kill {
            t.kill9();
        } else {
            t.stop();
        }
        // The header stays, the body is zeroed.
        let bm = state.join("a.bitmap");
        let len = std::fs::metadata(&bm).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&bm).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (len - 4096) as usize], 4096)
            .unwrap();
        drop(f);
        let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
        let st = t.ctl(&["status"]);
        assert_eq!(st["disks"][0]["resync_required"], true, "kill {kill}: {st}");
        assert_eq!(st["disks"][0]["dirty_blocks"], 1024, "kill {kill}: {st}");
        t.stop();
    }
}

#[test]
fn the_image_belongs_to_the_tracker() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 8 * MIB);
    let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
    let path = img.to_str().unwrap();
    // A VM (or qemu-io) pointed at the file instead of the socket is refused, as a second VM
    // on a disk in use would be; so is qemu-img, unless told to share (-U).
    let out = qemu_io(path, "write -P 3 0 4k");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("lock"),
        "qemu-io wrote the tracker's image: {text}"
    );
    let copy = dir.path().join("copy.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", path])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "qemu-img read the image while the tracker writes it: {err}"
    );
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "raw", "-O", "raw", path])
        .arg(&copy));
    // A second tracker, with its own state dir.
    let other = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(dir.path().join("other"))
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .arg("--disk")
        .arg(format!("d={path}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("in use by another vmreplica tracker"),
        "{err}"
    );
    assert!(t.ctl(&["status"])["disks"][0]["dirty_blocks"] == 0);
    t.stop();
    // Once the tracker is gone the image is free again.
    qemu_io_ok(path, "write -P 3 0 4k");
    // The same image under two names.
    let link = dir.path().join("link.img");
    std::fs::hard_link(&img, &link).unwrap();
    let out = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(dir.path().join("two"))
        .arg("--socket")
        .arg(dir.path().join("two.sock"))
        .arg("--disk")
        .arg(format!("a={path}"))
        .arg("--disk")
        .arg(format!("b={}", link.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("same image"), "{err}");
    assert!(!dir.path().join("two").exists());
    // A writer holding the image: the tracker refuses to start.
    let mut holder = Guard(
        Command::new("qemu-io")
            .args(["-f", "raw", path])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = Command::new(bin())
        .args(["tracker", "--state-dir"])
        .arg(dir.path().join("three"))
        .arg("--socket")
        .arg(dir.path().join("three.sock"))
        .arg("--disk")
        .arg(format!("d={path}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("open for writing by another process"),
        "{err}"
    );
    holder.kill();
}

/// The state dir fills up under a frozen generation: copy-on-write fails with ENOSPC. The
/// guest's writes go on (the generation is abandoned, the disk resynchronised later), and a
/// full image reaches it as ENOSPC (so QEMU's werror=enospc can pause the VM), not EIO.
#[test]
fn a_full_state_dir_never_fails_the_guest_and_enospc_stays_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small"), 24 * MIB);
    let img = fs.dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let t = TrackerProc::start_split(&fs.dir.join("state"), dir.path(), &[("d", &img)], &[]);
    // The first half holds data, the second half is a hole.
    qemu_io_ok(&t.uri("d"), "write -P 0x11 0 8M");
    let g = t.ctl(&["freeze", "--full"]);
    let gen: Generation = serde_json::from_value(g).unwrap();
    let reader = FrozenReader::open(&gen.disks[0]).unwrap();
    let filler = fs.fill();
    // Overwrites need copies the state dir has no room for: they succeed all the same.
    qemu_io_ok(&t.uri("d"), "write -P 0x22 0 4M");
    let st = t.ctl(&["status"]);
    assert_eq!(st["disks"][0]["resync_required"], true, "{st}");
    assert!(st["frozen"].is_null(), "the generation was kept: {st}");
    let mut buf = vec![0u8; MIB as usize];
    let e = reader.read(0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("abandoned"), "{e}");
    assert!(t.log_text().contains("abandoned"), "{}", t.log_text());
    // A write into the hole needs space the image has not got: ENOSPC, as from a disk.
    let out = qemu_io(&t.uri("d"), "write -P 0x33 12M 1M");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("No space left on device"),
        "a full image did not answer ENOSPC: {text}"
    );
    // Space back: writes work, nothing was lost from the dirty set.
    std::fs::remove_file(&filler).unwrap();
    qemu_io_ok(&t.uri("d"), "write -P 0x33 12M 1M");
    let st = t.ctl(&["status"]);
    assert_eq!(st["disks"][0]["dirty_blocks"], 256, "{st}");
    t.stop();
}

#[test]
fn a_truncated_or_replaced_bitmap_is_an_error_for_the_shipper_not_a_crash() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "d.img", 16 * MIB);
        let t = TrackerProc::start(dir.path(), &[("d", &img)], &[]);
        qemu_io_ok(&t.uri("d"), "write -P 0x11 0 4M");
        let gen: Generation = serde_json::from_value(t.ctl(&["freeze"])).unwrap();
        let reader = FrozenReader::open(&gen.disks[0]).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        reader.read(0, &mut buf).unwrap();
        let bm = Path::new(&gen.disks[0].bitmap);
        if replace {
            let copy = bm.with_extension("copy");
            std::fs::copy(bm, &copy).unwrap();
            std::fs::rename(&copy, bm).unwrap();
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .open(bm)
                .unwrap()
                .set_len(4096)
                .unwrap();
        }
        let e = reader.read(0, &mut buf).unwrap_err().to_string();
        let want = if replace { "replaced" } else { "truncated" };
        assert!(e.contains(want), "{e}");
        // The tracker's own mapping of a truncated file is not safe to use any more.
        t.kill9();
    }
}
