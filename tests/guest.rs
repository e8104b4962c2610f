//! A real guest: a Debian cloud kernel with a busybox initramfs boots under
//! `qemu-system-x86_64 -accel tcg` with its disk on the tracker, makes an ext4 filesystem,
//! writes files across reboots; the image is checked with debugfs and the dirty map against
//! what the guest wrote.

mod common;

use std::process::Command;

use common::guest::guest_dir;
use common::*;

const MIB: u64 = 1 << 20;

fn dirty(t: &TrackerProc, export: &str) -> Vec<(u64, u64)> {
    ranges_with(
        &parse_map(&stdout(
            Command::new("nbdinfo")
                .arg("--map=qemu:dirty-bitmap:vmreplica")
                .arg(t.uri(export)),
        )),
        1,
    )
}

#[test]
fn guest_boots_on_the_tracker_and_exactly_its_writes_are_dirty() {
    let gdir = guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "vm1-disk0.img", 256 * MIB);
    let t = TrackerProc::start(dir.path(), &[("disk0", &img)], &[]);
    let root = env!("CARGO_MANIFEST_DIR");

    // Two raw writes: exactly their 64 KiB blocks are dirty, nothing else.
    run(Command::new("bash")
        .args(["scripts/guest/boot.sh"])
        .arg(&gdir)
        .arg(t.uri("disk0"))
        .args(["raw-write", "120"])
        .current_dir(root));
    assert_eq!(
        dirty(&t, "disk0"),
        vec![(MIB, 256 * 1024), (100 * MIB, 64 * 1024)]
    );
    let g = t.ctl(&["freeze"]);
    t.ctl(&["release", &g["generation"].to_string(), "--force"]);
    assert_eq!(dirty(&t, "disk0"), vec![]);

    // mkfs, write, reboot, write more, reboot, read back; debugfs checks the image.
    let before = std::fs::read(&img).unwrap();
    run(Command::new("bash")
        .arg("scripts/guest/test-guest.sh")
        .arg(&gdir)
        .arg(t.uri("disk0"))
        .arg(&img)
        .current_dir(root));
    let after = std::fs::read(&img).unwrap();
    let d = dirty(&t, "disk0");
    let is_dirty = |off: u64| d.iter().any(|(o, l)| *o <= off && off < o + l);
    let mut changed = 0;
    for (i, (a, b)) in before.chunks(65536).zip(after.chunks(65536)).enumerate() {
        if a != b {
            changed += 1;
            assert!(
                is_dirty(i as u64 * 65536),
                "block {i} changed but is not dirty"
            );
        }
    }
    assert!(changed > 10, "the guest changed only {changed} blocks");
    t.stop();
}
