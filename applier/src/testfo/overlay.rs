//! A test failover's disk: recovery point N of one disk (a [`PointView`]) under a scratch
//! overlay, served as a [`BlockDevice`]. Reads come from the point; writes go to a sparse
//! scratch file (`tests/POINT/NAME.scratch`), never to the replica.
//!
//! Copy-on-write at one block (4 KiB, or the scratch file system's block size where larger):
//! a write that covers part of a block first reads the block as the test VM sees it (point,
//! scratch or zeroes) and writes it whole. A trim or write-zeroes of whole blocks is recorded
//! in the zero record ([`super::zerolog`], durable first) and punched out of the scratch
//! file; partial blocks are written as zeroes. So what the test VM changed is exactly the
//! scratch file's allocated blocks (they win) plus the zero record, and both survive an
//! applier restart: [`Overlay::open`] rebuilds the map from them.
//!
//! The scratch file may use at most `limit` bytes (beyond, writes fail with ENOSPC), so a
//! test VM cannot fill the store that replication needs. Reads run on a small [`Pool`] when
//! given one, so a connection has several in flight.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use vmreplica_common::ranges::RangeSet;
use vmreplica_common::sparse;
use vmreplica_nbd::consts::{STATE_HOLE, STATE_ZERO};
use vmreplica_nbd::device::{BlockDevice, DeviceFlags, Done, Extent, ReadDone, Zero};

use super::pool::Pool;
use super::zerolog::ZeroLog;
use crate::pointview::{ExtentKind, PointView};

/// The smallest copy-on-write block.
pub const MIN_BLOCK: u64 = 4096;
/// The largest (a file system with bigger blocks is used at this granularity and may
/// allocate more than a write needs).
const MAX_BLOCK: u64 = 1 << 20;

/// Where a piece of the test VM's disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Scratch,
    Zero,
    Point,
}

/// What the test VM changed: blocks written to the scratch file, ranges zeroed (the written
/// ones win), and the bytes the scratch file holds.
#[derive(Default)]
struct Map {
    written: RangeSet,
    zeroed: RangeSet,
    allocated: u64,
}

/// The overlay of one disk, served as a [`BlockDevice`].
pub struct Overlay {
    inner: Arc<Inner>,
    pool: Option<Arc<Pool>>,
}

struct Inner {
    view: Arc<PointView>,
    /// The point's disk it overlays; None: a blank disk (one the primary does not replicate,
    /// served as zeroes, as a failover recreates it).
    disk: Option<usize>,
    name: String,
    size: u64,
    block: u64,
    path: PathBuf,
    scratch: File,
    zero: Mutex<ZeroLog>,
    map: RwLock<Map>,
    /// Writes, trims and zeroes one at a time (a read-modify-write of a block must not
    /// interleave with another's).
    writing: Mutex<()>,
    limit: u64,
}

fn ctx(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Overlay {
    /// The overlay of disk `disk` of `view` with its scratch files in `dir`: made empty with
    /// `create`, else rebuilt from the scratch file and zero record found there. Reads run on
    /// `pool` if given (else on the caller's thread).
    pub fn open(
        view: Arc<PointView>,
        disk: usize,
        dir: &Path,
        create: bool,
        limit: u64,
        pool: Option<Arc<Pool>>,
    ) -> io::Result<Overlay> {
        let (name, size) = view.disks().get(disk).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("VM {}: no disk {disk}", view.vm()),
            )
        })?;
        Ok(Overlay {
            inner: Arc::new(Inner::open(
                view,
                Some(disk),
                name,
                size,
                dir,
                create,
                limit,
            )?),
            pool,
        })
    }

    /// The overlay of a blank disk `name` of `size` bytes (a disk the primary serves but does
    /// not replicate: its VM gets it empty, as after a failover). Its scratch files are made
    /// when missing (the disk was excluded after the test failover started).
    pub fn open_blank(
        view: Arc<PointView>,
        name: &str,
        size: u64,
        dir: &Path,
        create: bool,
        limit: u64,
        pool: Option<Arc<Pool>>,
    ) -> io::Result<Overlay> {
        let create = create || !dir.join(format!("{name}.scratch")).exists();
        Ok(Overlay {
            inner: Arc::new(Inner::open(
                view,
                None,
                name.to_string(),
                size,
                dir,
                create,
                limit,
            )?),
            pool,
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Bytes the scratch file holds (what the test VM wrote).
    pub fn scratch_bytes(&self) -> u64 {
        self.inner.scratch_bytes()
    }
}

impl Inner {
    fn open(
        view: Arc<PointView>,
        disk: Option<usize>,
        name: String,
        size: u64,
        dir: &Path,
        create: bool,
        limit: u64,
    ) -> io::Result<Inner> {
        let path = dir.join(format!("{name}.scratch"));
        let zpath = dir.join(format!("{name}.zero"));
        let scratch = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(&path)
            .map_err(|e| ctx(&path, e))?;
        let mut map = Map::default();
        let zero = if create {
            scratch.set_len(size).map_err(|e| ctx(&path, e))?;
            scratch.sync_all().map_err(|e| ctx(&path, e))?;
            ZeroLog::create(&zpath, size)?
        } else {
            let len = scratch.metadata().map_err(|e| ctx(&path, e))?.len();
            if len != size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: {len} bytes, the disk has {size}: it was changed outside vmreplica",
                        path.display()
                    ),
                ));
            }
            for (a, l) in sparse::data_regions(&scratch, size).map_err(|e| ctx(&path, e))? {
                map.written.insert(0, a, a + l);
                map.allocated += l;
            }
            let (z, ranges) = ZeroLog::open(&zpath, size)?;
            for (a, l) in ranges {
                map.zeroed.insert(0, a, a + l);
            }
            z
        };
        let fs_block = scratch.metadata().map_err(|e| ctx(&path, e))?.blksize();
        let block = fs_block.clamp(MIN_BLOCK, MAX_BLOCK).next_power_of_two();
        Ok(Inner {
            view,
            disk,
            name,
            size,
            block,
            path,
            scratch,
            zero: Mutex::new(zero),
            map: RwLock::new(map),
            writing: Mutex::new(()),
            limit,
        })
    }

    fn scratch_bytes(&self) -> u64 {
        self.map.read().unwrap_or_else(|e| e.into_inner()).allocated
    }

    /// Where each piece of `[start, end)` is now.
    fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Src)> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let rest = |s: u64, e: u64, out: &mut Vec<(u64, u64, Src)>| {
            let mut pos = s;
            for (a, b) in m.zeroed.overlapping(0, s, e) {
                if a > pos {
                    out.push((pos, a, Src::Point));
                }
                out.push((a, b, Src::Zero));
                pos = b;
            }
            if pos < e {
                out.push((pos, e, Src::Point));
            }
        };
        let mut pos = start;
        for (a, b) in m.written.overlapping(0, start, end) {
            if a > pos {
                rest(pos, a, &mut out);
            }
            out.push((a, b, Src::Scratch));
            pos = b;
        }
        if pos < end {
            rest(pos, end, &mut out);
        }
        out
    }

    /// The test VM's view of `[offset, offset + buf.len())`.
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        for (a, b, src) in self.pieces(offset, end) {
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match src {
                Src::Scratch => self
                    .scratch
                    .read_exact_at(dst, a)
                    .map_err(|e| ctx(&self.path, e))?,
                Src::Zero => dst.fill(0),
                Src::Point => match self.disk {
                    Some(d) => self.view.read_at(d, a, dst)?,
                    None => dst.fill(0),
                },
            }
        }
        Ok(())
    }

    /// The blocks around `[offset, end)`: its start rounded down, its end rounded up (but
    /// not beyond the disk).
    fn around(&self, offset: u64, end: u64) -> (u64, u64) {
        let a = offset / self.block * self.block;
        let b = end
            .div_ceil(self.block)
            .saturating_mul(self.block)
            .min(self.size);
        (a, b)
    }

    /// Writes `data` at `offset` into the scratch file, whole blocks at a time (the parts of
    /// the first and last block it does not cover read as the test VM sees them). Callers
    /// hold `writing`.
    fn write_blocks(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let (a, b) = self.around(offset, end);
        let new_bytes: u64 = {
            let m = self.map.read().unwrap_or_else(|e| e.into_inner());
            let new = m
                .written
                .uncovered(0, a, b)
                .iter()
                .map(|(s, e)| e - s)
                .sum();
            if m.allocated + new > self.limit {
                return Err(no_space());
            }
            new
        };
        let whole;
        let bytes: &[u8] = if a == offset && b == end {
            data
        } else {
            let mut buf = vec![0u8; (b - a) as usize];
            if a < offset {
                let head_end = (a + self.block).min(b);
                self.read_into(a, &mut buf[..(head_end - a) as usize])?;
            }
            if end < b {
                let tail = (b - self.block).max(a);
                self.read_into(tail, &mut buf[(tail - a) as usize..])?;
            }
            buf[(offset - a) as usize..(end - a) as usize].copy_from_slice(data);
            whole = buf;
            &whole
        };
        if let Err(e) = self.scratch.write_all_at(bytes, a) {
            // What did land is not the test VM's (it failed): back to what it was.
            let m = self.map.read().unwrap_or_else(|e| e.into_inner());
            for (s, t) in m.written.uncovered(0, a, b) {
                let _ = sparse::punch_hole(&self.scratch, s, t - s);
            }
            return Err(ctx(&self.path, e));
        }
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        m.written.insert(0, a, b);
        m.allocated += new_bytes;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.scratch.sync_data().map_err(|e| ctx(&self.path, e))
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn do_write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let _w = self.lock_writes();
        self.write_blocks(offset, data)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)`: partial blocks are written as zeroes; whole blocks
    /// are recorded as zeroed (durably), then punched out of the scratch file.
    fn do_zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _w = self.lock_writes();
        let end = offset + len;
        let first = offset.div_ceil(self.block) * self.block;
        let last = if end == self.size {
            end
        } else {
            end / self.block * self.block
        };
        if first >= last {
            // Within one block (or two partial ones): write zeroes.
            self.write_blocks(offset, &vec![0u8; len as usize])?;
        } else {
            if offset < first {
                self.write_blocks(offset, &vec![0u8; (first - offset) as usize])?;
            }
            if last < end {
                self.write_blocks(last, &vec![0u8; (end - last) as usize])?;
            }
            self.zero
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(first, last - first)?;
            let freed = {
                let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
                m.zeroed.insert(0, first, last);
                let freed: u64 = m
                    .written
                    .overlapping(0, first, last)
                    .iter()
                    .map(|(s, e)| e - s)
                    .sum();
                m.written.remove(0, first, last);
                m.allocated -= freed;
                freed
            };
            if freed > 0 {
                sparse::punch_hole(&self.scratch, first, last - first)
                    .map_err(|e| ctx(&self.path, e))?;
            }
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    /// `base:allocation` of `[offset, offset + len)`: what the test VM wrote is data, what it
    /// zeroed a hole, the rest as the point has it.
    fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let push = |l: u64, f: u32, out: &mut Vec<Extent>| match out.last_mut() {
            Some((pl, pf)) if *pf == f => *pl += l,
            _ => out.push((l, f)),
        };
        'pieces: for (a, b, src) in self.pieces(offset, end) {
            match src {
                Src::Scratch => push(b - a, 0, &mut out),
                Src::Zero => push(b - a, STATE_HOLE | STATE_ZERO, &mut out),
                Src::Point => {
                    let Some(disk) = self.disk else {
                        push(b - a, STATE_HOLE | STATE_ZERO, &mut out);
                        continue;
                    };
                    for x in self.view.extents(disk, a, b - a)? {
                        let f = match x.kind {
                            ExtentKind::Data => 0,
                            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                            ExtentKind::Zero => STATE_ZERO,
                        };
                        push(x.len, f, &mut out);
                        if out.len() > max {
                            break 'pieces;
                        }
                    }
                }
            }
            if out.len() > max {
                break;
            }
        }
        out.truncate(max.max(1));
        if out.is_empty() {
            out.push((end.saturating_sub(offset).max(1), 0));
        }
        Ok(out)
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> DeviceFlags {
        DeviceFlags {
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: false,
            multi_conn: true,
        }
    }

    fn read(&self, offset: u64, len: u32, done: ReadDone) {
        let inner = Arc::clone(&self.inner);
        let job = move || {
            let mut buf = vec![0u8; len as usize];
            done(inner.read_into(offset, &mut buf).map(|()| buf))
        };
        match &self.pool {
            Some(p) => p.run(job),
            None => job(),
        }
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool, done: Done) {
        done(self.inner.do_write(offset, &data, fua))
    }

    fn flush(&self, done: Done) {
        done(self.inner.sync())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool, done: Done) {
        done(self.inner.do_zero(offset, len, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, zero: Zero, done: Done) {
        done(self.inner.do_zero(offset, len, zero.fua))
    }

    fn contexts(&self) -> Vec<String> {
        vec![vmreplica_nbd::device::BASE_ALLOCATION.to_string()]
    }

    fn block_status(
        &self,
        context: usize,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<Extent>> {
        if context != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.inner.allocation(offset, len, max)
    }
}
