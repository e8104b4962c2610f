//! The scratch overlay over a real store: reads are the point's, writes (partial blocks,
//! trims, zeroes) land in the scratch files only, block status tells data, holes and zeroes
//! apart, a reopen (an applier restart) serves the same bytes, the scratch limit holds, and
//! concurrent writes into one block both survive.

use std::sync::Arc;

use vmreplica_common::wire::CycleKind;
use vmreplica_nbd::consts::{STATE_HOLE, STATE_ZERO};
use vmreplica_nbd::device::{BlockDevice, Zero};

use super::overlay::Overlay;
use crate::pointview::PointView;
use crate::store::tests::{initial, read_images, seeded, ship, store, tmp, G, SIZE};
use crate::store::Retention;

fn read(o: &Overlay, offset: u64, len: usize) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    o.read(
        offset,
        len as u32,
        Box::new(move |r| {
            tx.send(r).unwrap();
        }),
    );
    rx.recv().unwrap().unwrap()
}

fn done(f: impl FnOnce(vmreplica_nbd::Done)) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    f(Box::new(move |r| {
        tx.send(r).unwrap();
    }));
    rx.recv().unwrap()
}

fn write(o: &Overlay, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let d = data.to_vec();
    done(|cb| o.write(offset, d, false, cb))
}

#[test]
fn the_overlay_reads_the_point_keeps_writes_in_scratch_and_survives_a_reopen() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let mut primary = seeded(5);
    let (mut vs, _) = initial(&s, &primary);
    let point1 = primary.clone();
    // Cycle 2 overwrites block 0 of disk 0 and writes data into its hole (its second half).
    let g = u64::from(G);
    primary[0][..G as usize].fill(0xee);
    let hb = (SIZE / 2 / g + 2) as usize;
    primary[0][hb * G as usize..(hb + 1) * G as usize].fill(0x11);
    ship(
        &mut vs,
        2,
        CycleKind::Delta,
        &primary,
        &[(0, 0), (0, hb as u64)],
    )
    .unwrap();
    let replica_before = read_images(&vs);

    let view = Arc::new(PointView::open(vs.shared(), 1).unwrap());
    let tdir = dir.path().join("vm1/tests/1");
    std::fs::create_dir_all(&tdir).unwrap();
    let o = Overlay::open(Arc::clone(&view), 0, &tdir, true, u64::MAX, None).unwrap();
    let mut want = point1[0].clone();
    assert!(
        read(&o, 0, SIZE as usize) == want,
        "the point, not the replica"
    );

    // A write inside one block, one across two, trims and zeroes of whole and partial blocks.
    let edits: Vec<(u64, Vec<u8>)> = vec![
        (1000, vec![1u8; 5000]),
        (g - 10, vec![2u8; 20]),
        (3 * g + 100, vec![3u8; 2 * G as usize]),
    ];
    for (off, data) in &edits {
        write(&o, *off, data).unwrap();
        want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    done(|cb| o.trim(8 * g + 512, 4 * g, false, cb)).unwrap();
    want[(8 * g + 512) as usize..(12 * g + 512) as usize].fill(0);
    let z = Zero {
        fua: true,
        no_hole: false,
        fast: false,
    };
    done(|cb| o.write_zeroes(3 * g, g, z, cb)).unwrap();
    want[(3 * g) as usize..(4 * g) as usize].fill(0);
    // Rewrite part of a trimmed range: the write wins over the zero record.
    write(&o, 9 * g, &[4u8; 100]).unwrap();
    want[(9 * g) as usize..(9 * g + 100) as usize].fill(4);
    done(|cb| o.flush(cb)).unwrap();
    assert!(read(&o, 0, SIZE as usize) == want);

    // Block status: written blocks are data, zeroed ones holes, the rest the point's (its
    // hole, and the zeroes cycle 2's undo log recorded where it wrote into the hole).
    let bs = o.block_status(0, 0, SIZE, 1000).unwrap();
    let flags_at = |at: u64| {
        let mut pos = 0;
        for (l, f) in &bs {
            if at < pos + l {
                return *f;
            }
            pos += l;
        }
        panic!("{at} beyond the extents {bs:?}");
    };
    assert_eq!(bs.iter().map(|e| e.0).sum::<u64>(), SIZE);
    assert_eq!(flags_at(1000), 0);
    assert_eq!(flags_at(10 * g), STATE_HOLE | STATE_ZERO);
    assert_eq!(flags_at(9 * g), 0, "rewritten after the trim");
    assert_eq!(flags_at(hb as u64 * g), STATE_ZERO, "the undo log's zeroes");
    assert_eq!(
        flags_at(SIZE - 1),
        STATE_HOLE | STATE_ZERO,
        "the point's hole"
    );
    assert_eq!(o.block_status(0, 0, SIZE, 1).unwrap().len(), 1);

    // Reopened from its files (an applier restart): the same bytes.
    let scratch = o.scratch_bytes();
    drop(o);
    let o = Overlay::open(Arc::clone(&view), 0, &tdir, false, u64::MAX, None).unwrap();
    assert!(read(&o, 0, SIZE as usize) == want, "after a reopen");
    assert_eq!(o.scratch_bytes(), scratch);

    // Nothing reached the replica, and the point is still the point.
    assert!(read_images(&vs) == replica_before);
    let mut p = vec![0u8; SIZE as usize];
    view.read_at(0, 0, &mut p).unwrap();
    assert!(p == point1[0]);
}

#[test]
fn the_scratch_limit_holds_and_concurrent_writes_into_one_block_both_survive() {
    let dir = tmp();
    let s = store(dir.path(), Retention::keep_all());
    let (vs, _) = initial(&s, &seeded(6));
    let view = Arc::new(PointView::open(vs.shared(), 1).unwrap());
    let tdir = dir.path().join("t");
    std::fs::create_dir_all(&tdir).unwrap();
    let o = Arc::new(Overlay::open(Arc::clone(&view), 1, &tdir, true, 3 * 4096, None).unwrap());
    write(&o, 0, &[1u8; 8192]).unwrap();
    // Rewriting what is there costs nothing more.
    write(&o, 0, &[2u8; 8192]).unwrap();
    let e = write(&o, 65536, &[3u8; 8192]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    write(&o, 65536, &[3u8; 10]).unwrap();
    // A trim frees what it covers.
    done(|cb| o.trim(0, 8192, false, cb)).unwrap();
    write(&o, 131072, &[4u8; 8192]).unwrap();

    // Bytes of one block written at once from two threads: both land.
    let tdir = dir.path().join("t2");
    std::fs::create_dir_all(&tdir).unwrap();
    let o = Arc::new(Overlay::open(Arc::clone(&view), 0, &tdir, true, u64::MAX, None).unwrap());
    let before = read(&o, 1 << 20, 4096);
    let ts: Vec<_> = (0..2u8)
        .map(|i| {
            let o = Arc::clone(&o);
            std::thread::spawn(move || {
                for k in 0..200u64 {
                    let at = (1 << 20) + u64::from(i) * 2048 + (k % 16) * 128;
                    write(&o, at, &[i + 10; 128]).unwrap();
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    let after = read(&o, 1 << 20, 4096);
    assert!(after[..2048].iter().all(|b| *b == 10));
    assert!(after[2048..].iter().all(|b| *b == 11));
    assert_ne!(before, after);
}
