//! Start-up errors are clear, name the problem, and modify nothing.

mod common;

use std::process::Command;

use common::*;

fn tracker(state: &std::path::Path, disks: &[String], extra: &[&str]) -> (bool, String) {
    let mut c = Command::new(bin());
    c.arg("tracker").arg("--state-dir").arg(state);
    for d in disks {
        c.arg("--disk").arg(d);
    }
    c.args(extra);
    c.arg("--socket").arg(state.with_extension("sock"));
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = image(dir.path(), "a.img", 1 << 20);
    let disk = format!("a={}", img.display());

    let (ok, err) = tracker(
        &state,
        &[format!("a={}/nope.img", dir.path().display())],
        &[],
    );
    assert!(!ok && err.contains("nope.img"), "{err}");
    for g in ["3000", "2M", "2K", "96K"] {
        let (ok, err) = tracker(&state, std::slice::from_ref(&disk), &["--granularity", g]);
        assert!(!ok && err.contains("granularity"), "{g}: {err}");
    }
    let (ok, err) = tracker(&state, &["../x=/dev/null".into()], &[]);
    assert!(!ok && err.contains("../x"), "{err}");
    let (ok, err) = tracker(&state, &[disk.clone(), disk.clone()], &[]);
    assert!(!ok && err.contains("twice"), "{err}");
    let empty = image(dir.path(), "empty.img", 0);
    let (ok, err) = tracker(&state, &[format!("e={}", empty.display())], &[]);
    assert!(!ok && err.contains("empty"), "{err}");
    assert!(!state.exists(), "a refused start created the state dir");
}

#[test]
fn a_state_dir_of_other_disks_or_in_use_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 1 << 20);
    let b = image(dir.path(), "b.img", 1 << 20);
    let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
    // In use by a running tracker.
    let (ok, err) = tracker(&t.state, &[format!("a={}", a.display())], &[]);
    assert!(!ok && err.contains("in use"), "{err}");
    t.stop();
    let state = dir.path().join("state");
    let before = std::fs::read(state.join("tracker.json")).unwrap();
    let (ok, err) = tracker(&state, &[format!("b={}", b.display())], &[]);
    assert!(!ok && err.contains("belongs to other disks"), "{err}");
    let (ok, err) = tracker(
        &state,
        &[format!("a={}", a.display())],
        &["--granularity", "4K"],
    );
    assert!(!ok && err.contains("granularity"), "{err}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let (ok, err) = tracker(&state, &[format!("a={}", a.display())], &[]);
    assert!(!ok && err.contains("bytes"), "{err}");
    assert_eq!(std::fs::read(state.join("tracker.json")).unwrap(), before);
    // A corrupt state file is named in the error.
    std::fs::write(state.join("tracker.json"), b"{garbage").unwrap();
    let (ok, err) = tracker(&state, &[format!("a={}", a.display())], &[]);
    assert!(
        !ok && err.contains("tracker.json") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn lost_activity_log_after_a_crash_marks_the_disk_for_resync() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(dir.path(), "a.img", 8 << 20);
    let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
    run(Command::new("qemu-io").args(["-f", "raw", &t.uri("a"), "-c", "write 0 4k"]));
    let state = t.state.clone();
    t.kill9();
    std::fs::write(state.join("a.al"), vec![0xffu8; 16384]).unwrap();
    let t = TrackerProc::start(dir.path(), &[("a", &a)], &[]);
    let st = t.ctl(&["status"]);
    assert_eq!(st["disks"][0]["resync_required"], true, "{st}");
    assert!(t.log_text().contains("resync"), "{}", t.log_text());
    // Nothing forgotten: everything is dirty.
    assert_eq!(st["disks"][0]["dirty_blocks"], 128, "{st}");
    t.stop();
}
