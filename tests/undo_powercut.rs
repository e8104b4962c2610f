//! An undo log reopened after its writer died: what the writer appended reached the file but
//! maybe not the disk, yet the reopened log counts it as captured, and the receive pipeline
//! then writes the images where those entries say the old contents are kept, without syncing
//! the log again. Reopening must make the entries durable first, or a power cut after the
//! restart keeps the image writes and loses the entries that undo them (the previous point
//! would read new data). Checked on `powercut-fs`, which drops what was not fsynced.

mod common;

use common::powercut::{self, powercut_fs_bin, PowercutFs};
use vmreplica_applier::undo::{Header, UndoLog};
use vmreplica_common::lineage::Lineage;

const CHUNK: u32 = 64 << 10;
const ENTRIES: u64 = 16;

#[test]
fn the_entries_a_reopened_undo_log_counts_survive_a_power_cut() {
    let fs_bin = powercut_fs_bin();
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt, fs_log) = powercut::dirs(dir.path());
    let mut fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, 0.0, 1);
    let path = mnt.join("2.undo");
    let header = Header {
        from: 1,
        to: 2,
        lineage: Some(Lineage([7; 16])),
    };
    let mut log = UndoLog::create(&path, header).unwrap();
    for i in 0..ENTRIES {
        let old = vec![i as u8 + 1; CHUNK as usize];
        log.append(0, i * 2 * u64::from(CHUNK), CHUNK, Some(&old))
            .unwrap();
    }
    // The writer goes away here: its appends are written to the file, not synced (a process
    // killed after its writes leaves the same).
    drop(log);

    // The restarted applier reopens the log and takes its entries as captured.
    let (log, _) = UndoLog::open(&path).unwrap();
    assert_eq!(log.entries().len() as u64, ENTRIES);
    drop(log);

    fs.power_cut();
    drop(fs);
    let _fs = PowercutFs::mount(&fs_bin, &backing, &mnt, &fs_log, 0.0, 2);
    let (log, _) = UndoLog::open(&path).unwrap();
    assert_eq!(
        log.entries().len() as u64,
        ENTRIES,
        "entries the reopened log counted as captured were lost in a power cut after the \
         reopen: {}",
        path.display()
    );
}
