//! Undo log files: written by a receiving cycle ([`UndoLog`]), read back by rollback,
//! point views, export and retention ([`Loaded`], [`read_entry`]), merged when a point is
//! dropped ([`merge`]).
//!
//! A cycle's log is created when its first receive attempt starts and written ahead of the
//! image: an entry is durable before the write it undoes is issued (see `store::receive`).
//! Opening it again after a crash keeps the intact records and cuts the rest, and also cuts
//! a trailer (a cycle resumed after its log was finished but before the state recorded the
//! point gets it again at its commit). A finished log ends with its trailer, an index of its
//! entries and a footer, so loading it reads the footer and the index, not the whole file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use vmreplica_common::ranges::{Range, RangeSet};
use vmreplica_common::wire::is_zero;

use super::format::{
    decode_index, decode_ranges, encode_index, encode_ranges, Enc, Entry, FormatError, Head,
    Header, Kind, Trailer, FOOTER_LEN, HEADER_LEN, HEAD_LEN, MAX_INDEX_ENTRIES, MAX_MARK_RANGES,
};
use crate::logfile::LogWriter;

fn ctx(path: &Path, e: impl std::fmt::Display) -> String {
    format!("undo log {}: {e}", path.display())
}

fn err(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), ctx(path, e))
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, ctx(path, what))
}

fn format_err(path: &Path, e: FormatError) -> io::Error {
    invalid(path, e)
}

/// fsyncs the directory holding `path`, so a create, rename or unlink of it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Creates directory `dir` and any missing parents, each entry made durable (the parent
/// fsynced), so a power cut cannot lose a directory whose files the state refers to.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(dir, e)),
    }
}

/// Removes `path` (if there) durably.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(path, e)),
    }
}

/// Whether to spend lz4 on old contents. Compression is tried on every entry while it pays;
/// after an entry it could not shrink by an eighth, the next [`SKIP`] entries are stored raw
/// before it is tried again, so incompressible contents (encrypted or compressed guest data,
/// random benchmark blocks) cost a probe now and then instead of lz4 on every byte (the
/// previous design's undo journal compressed everything, and its lz4 CPU showed as a cost of
/// its cycles), while the real files of a guest's disk still get their undo logs about halved
/// (the shipper's lz4 ratio on them is 2.1x).
#[derive(Default)]
pub struct Compressor {
    skip: u32,
}

const SKIP: u32 = 31;

impl Compressor {
    /// `data` as stored: lz4 into `out` if that pays, else raw (use `data`).
    pub fn pack(&mut self, data: &[u8], out: &mut Vec<u8>) -> Enc {
        if self.skip > 0 {
            self.skip -= 1;
            return Enc::Raw;
        }
        out.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        match lz4_flex::block::compress_into(data, out) {
            Ok(n) if n < data.len() - data.len() / 8 => {
                out.truncate(n);
                Enc::Lz4
            }
            _ => {
                self.skip = SKIP;
                Enc::Raw
            }
        }
    }
}

/// A cycle's undo log being written.
pub struct UndoLog {
    path: PathBuf,
    header: Header,
    log: LogWriter,
    entries: Vec<Entry>,
    coverage: RangeSet,
    bytes: u64,
    comp: Compressor,
    scratch: Vec<u8>,
}

/// What [`UndoLog::open`] found besides the entries.
pub struct Recovered {
    /// Ranges the log records as durably applied.
    pub applied: RangeSet,
    /// Bytes cut off: a torn tail, or a trailer.
    pub cut: u64,
}

impl UndoLog {
    /// Creates a new log at `path` (replacing any file there), its header durable.
    pub fn create(path: &Path, header: Header) -> io::Result<UndoLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| err(path, e))?;
        let mut log = LogWriter::open(file, path, 0).map_err(|e| err(path, e))?;
        log.append(&[&header.encode()]).map_err(|e| err(path, e))?;
        log.sync().map_err(|e| err(path, e))?;
        sync_dir(path).map_err(|e| err(path, e))?;
        Ok(UndoLog {
            path: path.to_path_buf(),
            header,
            log,
            entries: Vec::new(),
            coverage: RangeSet::new(),
            bytes: 0,
            comp: Compressor::default(),
            scratch: Vec::new(),
        })
    }

    /// Opens the log at `path` to go on writing it: its intact entries and applied records
    /// are kept; a torn tail, and a trailer with what follows it, are cut off.
    pub fn open(path: &Path) -> io::Result<(UndoLog, Recovered)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(path, e))?;
        let total = file.metadata().map_err(|e| err(path, e))?.len();
        let mut entries = Vec::new();
        let mut coverage = RangeSet::new();
        let mut applied = RangeSet::new();
        let mut bytes = 0;
        let mut stop_at = None;
        let (header, end) = scan_file(&file, path, |head, pos, payload| {
            if stop_at.is_some() {
                return false;
            }
            match head.kind {
                Kind::Entry => {
                    coverage.insert(head.disk, head.offset, head.end());
                    bytes += u64::from(head.len);
                    entries.push(entry_of(*head, pos));
                }
                Kind::Applied => {
                    for r in decode_ranges(payload) {
                        applied.insert_range(r);
                    }
                }
                Kind::Reset => applied = RangeSet::new(),
                _ => stop_at = Some(pos - HEAD_LEN as u64),
            }
            true
        })?;
        let keep = stop_at.unwrap_or(end);
        if keep != total {
            file.set_len(keep).map_err(|e| err(path, e))?;
        }
        // What a process that died wrote may not be durable yet (it was written, not synced),
        // and the coverage read back here lets the images be written where it says old
        // contents are kept: it must be durable first, or a power cut could keep those image
        // writes and lose the entries that undo them.
        file.sync_all().map_err(|e| err(path, e))?;
        let log = LogWriter::open(file, path, keep).map_err(|e| err(path, e))?;
        let me = UndoLog {
            path: path.to_path_buf(),
            header,
            log,
            entries,
            coverage,
            bytes,
            comp: Compressor::default(),
            scratch: Vec::new(),
        };
        Ok((
            me,
            Recovered {
                applied,
                cut: total - keep,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// Every entry, in the order written.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// What the entries cover.
    pub fn coverage(&self) -> &RangeSet {
        &self.coverage
    }

    /// Bytes the entries cover.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Size of the file so far.
    pub fn size(&self) -> u64 {
        self.log.len()
    }

    /// Appends the old contents of `len` bytes at `offset` of `disk`: `old` (None: a hole, or
    /// zeroes, put back by punching a hole). Not durable until [`UndoLog::sync`]. The range
    /// must not overlap one already in the log (callers capture each byte once).
    pub fn append(
        &mut self,
        disk: u16,
        offset: u64,
        len: u32,
        old: Option<&[u8]>,
    ) -> io::Result<Entry> {
        // Checked in the applier's unit tests too, which run optimized: a second capture would
        // record new data as old.
        #[cfg(any(test, debug_assertions))]
        assert!(
            self.coverage
                .overlapping(disk, offset, offset + u64::from(len))
                .is_empty(),
            "{}: {disk}:{offset}+{len} captured twice in one cycle",
            self.path.display()
        );
        let old = old.filter(|d| !is_zero(d));
        let mut scratch = std::mem::take(&mut self.scratch);
        let (enc, payload): (Enc, &[u8]) = match old {
            None => (Enc::Zero, &[]),
            Some(d) => {
                debug_assert_eq!(d.len(), len as usize);
                match self.comp.pack(d, &mut scratch) {
                    Enc::Lz4 => (Enc::Lz4, &scratch),
                    _ => (Enc::Raw, d),
                }
            }
        };
        let head = Head::new(Kind::Entry, enc, disk, offset, len, payload);
        let pos = self.log.len() + HEAD_LEN as u64;
        let r = self.log.append(&[&head.encode(), payload]);
        self.scratch = scratch;
        r.map_err(|e| err(&self.path, e))?;
        let e = entry_of(head, pos);
        self.entries.push(e);
        self.coverage.insert(disk, offset, e.end());
        self.bytes += u64::from(len);
        Ok(e)
    }

    /// Records `ranges` as durably applied (callers made the images durable first). Not
    /// durable until [`UndoLog::sync`].
    pub fn mark_applied(&mut self, ranges: &RangeSet) -> io::Result<()> {
        let all: Vec<Range> = ranges.iter().collect();
        for part in all.chunks(MAX_MARK_RANGES) {
            self.append_record(Kind::Applied, part.len() as u32, &encode_ranges(part))?;
        }
        Ok(())
    }

    /// Records that a rollback is putting the old contents back: nothing recorded as applied
    /// before holds any more. Durable when it returns.
    pub fn reset_applied(&mut self) -> io::Result<()> {
        self.append_record(Kind::Reset, 0, &[])?;
        self.sync()
    }

    fn append_record(&mut self, kind: Kind, len: u32, payload: &[u8]) -> io::Result<u64> {
        let head = Head::new(kind, Enc::Zero, 0, 0, len, payload);
        let at = self.log.len();
        self.log
            .append(&[&head.encode(), payload])
            .map_err(|e| err(&self.path, e))?;
        Ok(at)
    }

    /// From now on the log's blocks are written and synced on a thread of its own, so that
    /// appending goes on meanwhile (see [`UndoLog::sync_later`]).
    pub fn write_behind(&mut self) -> io::Result<()> {
        self.log.write_behind().map_err(|e| err(&self.path, e))
    }

    /// Makes everything appended durable, answering on the returned channel (at once unless
    /// in write-behind mode). If the answer is a failure, the caller [`UndoLog::poison`]s the
    /// log.
    pub fn sync_later(&mut self) -> io::Result<mpsc::Receiver<io::Result<()>>> {
        self.log.sync_later().map_err(|e| err(&self.path, e))
    }

    /// A sync asked for with [`UndoLog::sync_later`] failed: the log refuses every append and
    /// sync after (it is reopened from what reached the file).
    pub fn poison(&mut self, e: &io::Error) {
        self.log.poison(e);
    }

    /// Makes everything appended durable (one fdatasync).
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync().map_err(|e| err(&self.path, e))
    }

    /// Closes the log: trailer, index and footer, durable. Returns its size.
    pub fn finish(mut self) -> io::Result<u64> {
        let t = Trailer {
            entries: self.entries.len() as u64,
            bytes: self.bytes,
            digest: self.coverage.digest(),
            from: self.header.from,
        };
        self.append_record(Kind::Trailer, 0, &t.encode())?;
        let mut sorted = self.entries.clone();
        sorted.sort_by_key(|e| (e.disk, e.offset));
        if sorted.len() <= MAX_INDEX_ENTRIES {
            let at =
                self.append_record(Kind::Index, sorted.len() as u32, &encode_index(&sorted))?;
            self.append_record(Kind::Footer, 0, &at.to_be_bytes())?;
        }
        // The file ends at the footer, where loading looks for it.
        self.log.trim().map_err(|e| err(&self.path, e))?;
        self.sync()?;
        Ok(self.log.len())
    }
}

fn entry_of(head: Head, pos: u64) -> Entry {
    Entry {
        disk: head.disk,
        offset: head.offset,
        len: head.len,
        pos,
        plen: head.plen,
        enc: head.enc,
    }
}

/// Reads the log in `file` from the start, handing each intact record (head, payload
/// position, payload) to `each` until a torn or foreign one or one `each` refuses; returns
/// the header and where the intact records end. Reads through one large buffer.
fn scan_file(
    file: &File,
    path: &Path,
    mut each: impl FnMut(&Head, u64, &[u8]) -> bool,
) -> io::Result<(Header, u64)> {
    let mut r = BufReader::with_capacity(4 << 20, file);
    let mut hb = vec![0u8; HEADER_LEN];
    r.read_exact(&mut hb)
        .map_err(|e| invalid(path, format!("no header ({e})")))?;
    let header = Header::parse(&hb).map_err(|e| format_err(path, e))?;
    let mut pos = HEADER_LEN as u64;
    let mut covered = RangeSet::new();
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; HEAD_LEN];
        if read_full(&mut r, &mut h).map_err(|e| err(path, e))? < HEAD_LEN {
            break;
        }
        let Some(head) = Head::parse(&h) else { break };
        payload.resize(head.plen as usize, 0);
        if read_full(&mut r, &mut payload).map_err(|e| err(path, e))? < payload.len() {
            break;
        }
        if !head.checks(&payload) {
            break;
        }
        if head.kind == Kind::Entry {
            if !covered
                .overlapping(head.disk, head.offset, head.end())
                .is_empty()
            {
                break;
            }
            covered.insert(head.disk, head.offset, head.end());
        }
        if !each(&head, pos + HEAD_LEN as u64, &payload) {
            break;
        }
        pos += head.record_len();
    }
    Ok((header, pos))
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A finished log, loaded: its header, trailer and entries (sorted by disk and offset).
pub struct Loaded {
    pub path: PathBuf,
    pub file: File,
    pub header: Header,
    pub trailer: Trailer,
    pub entries: Vec<Entry>,
    pub size: u64,
}

impl Loaded {
    /// Loads the finished log at `path`: from its index if the footer points at an intact
    /// one, else by reading it through. A log without a trailer is refused (it is not
    /// finished: its cycle never became a point).
    pub fn open(path: &Path) -> io::Result<Loaded> {
        let file = File::open(path).map_err(|e| err(path, e))?;
        let size = file.metadata().map_err(|e| err(path, e))?.len();
        let mut hb = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| invalid(path, format!("no header ({e})")))?;
        let header = Header::parse(&hb).map_err(|e| format_err(path, e))?;
        if let Some((trailer, entries)) = read_indexed(&file, size)? {
            let me = Loaded {
                path: path.to_path_buf(),
                file,
                header,
                trailer,
                entries,
                size,
            };
            me.check_trailer()?;
            return Ok(me);
        }
        let mut entries = Vec::new();
        let mut trailer = None;
        scan_file(&file, path, |head, pos, payload| match head.kind {
            Kind::Entry if trailer.is_none() => {
                entries.push(entry_of(*head, pos));
                true
            }
            Kind::Trailer if trailer.is_none() => {
                trailer = Trailer::decode(payload);
                true
            }
            _ => trailer.is_none() || head.kind != Kind::Entry,
        })?;
        let Some(trailer) = trailer else {
            return Err(invalid(
                path,
                "not finished (no trailer): it is damaged or incomplete",
            ));
        };
        entries.sort_by_key(|e| (e.disk, e.offset));
        let me = Loaded {
            path: path.to_path_buf(),
            file,
            header,
            trailer,
            entries,
            size,
        };
        me.check_trailer()?;
        Ok(me)
    }

    fn check_trailer(&self) -> io::Result<()> {
        let cov: RangeSet = self
            .entries
            .iter()
            .map(|e| Range {
                disk: e.disk,
                offset: e.offset,
                len: u64::from(e.len),
            })
            .collect();
        let bytes: u64 = self.entries.iter().map(|e| u64::from(e.len)).sum();
        if self.trailer.entries != self.entries.len() as u64
            || self.trailer.bytes != bytes
            || cov.bytes() != bytes
            || self.trailer.digest != cov.digest()
            || self.trailer.from != self.header.from
        {
            return Err(invalid(
                &self.path,
                "its entries do not match its trailer (damaged)",
            ));
        }
        Ok(())
    }
}

/// The trailer and index of a finished log through its footer; None if there is no intact
/// footer or index (the caller reads the log through instead).
fn read_indexed(file: &File, size: u64) -> io::Result<Option<(Trailer, Vec<Entry>)>> {
    let Some(foot_at) = size.checked_sub(FOOTER_LEN as u64) else {
        return Ok(None);
    };
    let mut fb = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut fb, foot_at)?;
    let Some(fh) = Head::parse(fb[..HEAD_LEN].try_into().expect("HEAD_LEN")) else {
        return Ok(None);
    };
    if fh.kind != Kind::Footer || !fh.checks(&fb[HEAD_LEN..]) {
        return Ok(None);
    }
    let at = u64::from_be_bytes(fb[HEAD_LEN..].try_into().expect("8 bytes"));
    let mut ib = [0u8; HEAD_LEN];
    if at.checked_add(HEAD_LEN as u64).is_none_or(|e| e > foot_at) {
        return Ok(None);
    }
    file.read_exact_at(&mut ib, at)?;
    let Some(ih) = Head::parse(&ib) else {
        return Ok(None);
    };
    if ih.kind != Kind::Index || at + ih.record_len() != foot_at {
        return Ok(None);
    }
    let mut payload = vec![0u8; ih.plen as usize];
    file.read_exact_at(&mut payload, at + HEAD_LEN as u64)?;
    if !ih.checks(&payload) {
        return Ok(None);
    }
    let Some(entries) = decode_index(&payload) else {
        return Ok(None);
    };
    // The trailer is the record just before the index.
    let Some(tat) = at.checked_sub((HEAD_LEN + super::format::TRAILER_BYTES) as u64) else {
        return Ok(None);
    };
    let mut tb = vec![0u8; HEAD_LEN + super::format::TRAILER_BYTES];
    file.read_exact_at(&mut tb, tat)?;
    let Some(th) = Head::parse(tb[..HEAD_LEN].try_into().expect("HEAD_LEN")) else {
        return Ok(None);
    };
    if th.kind != Kind::Trailer || !th.checks(&tb[HEAD_LEN..]) {
        return Ok(None);
    }
    Ok(Trailer::decode(&tb[HEAD_LEN..]).map(|t| (t, entries)))
}

/// Reads `[start, end)` (inside entry `e`) of the old contents `e` holds into `buf`
/// (`end - start` bytes): one read for a raw entry, none for a hole, the whole payload
/// decompressed for an lz4 one.
pub fn read_entry(file: &File, e: &Entry, start: u64, end: u64, buf: &mut [u8]) -> io::Result<()> {
    debug_assert!(start >= e.offset && end <= e.end() && buf.len() as u64 == end - start);
    let skip = (start - e.offset) as usize;
    match e.enc {
        Enc::Zero => buf.fill(0),
        Enc::Raw => file.read_exact_at(buf, e.pos + skip as u64)?,
        Enc::Lz4 => {
            let mut packed = vec![0u8; e.plen as usize];
            file.read_exact_at(&mut packed, e.pos)?;
            let mut out = vec![0u8; e.len as usize];
            let n = lz4_flex::block::decompress_into(&packed, &mut out)
                .map_err(|x| io::Error::new(io::ErrorKind::InvalidData, format!("lz4: {x}")))?;
            if n != out.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "lz4: short entry",
                ));
            }
            buf.copy_from_slice(&out[skip..skip + buf.len()]);
        }
    }
    Ok(())
}

/// Writes at `dest` one log that undoes both of two consecutive logs: `newer` undoes point B
/// back to A, `older` undoes A back to the point before it; where both cover a byte, the older
/// one wins. Streamed one entry at a time; `dest` is complete (finished) or absent.
pub fn merge(older: &Loaded, newer: &Loaded, dest: &Path) -> io::Result<u64> {
    let tmp = dest.with_extension("undo.tmp");
    let r = merge_into(older, newer, &tmp);
    match r {
        Ok(size) => {
            fs::rename(&tmp, dest).map_err(|e| err(dest, e))?;
            sync_dir(dest).map_err(|e| err(dest, e))?;
            Ok(size)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn merge_into(older: &Loaded, newer: &Loaded, tmp: &Path) -> io::Result<u64> {
    let mut out = UndoLog::create(
        tmp,
        Header {
            from: newer.header.from,
            to: older.header.to,
            lineage: newer.header.lineage,
        },
    )?;
    let mut buf = Vec::new();
    let mut copy = |src: &Loaded, e: &Entry, s: u64, t: u64, out: &mut UndoLog| {
        let n = (t - s) as usize;
        if e.enc == Enc::Zero {
            return out.append(e.disk, s, n as u32, None).map(|_| ());
        }
        buf.resize(n, 0);
        read_entry(&src.file, e, s, t, &mut buf).map_err(|x| err(&src.path, x))?;
        out.append(e.disk, s, n as u32, Some(&buf)).map(|_| ())
    };
    for e in &older.entries {
        copy(older, e, e.offset, e.end(), &mut out)?;
    }
    let cov = out.coverage().clone();
    for e in &newer.entries {
        for (s, t) in cov.uncovered(e.disk, e.offset, e.end()) {
            copy(newer, e, s, t, &mut out)?;
        }
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmreplica_common::lineage::Lineage;

    fn header(from: u64, to: u64) -> Header {
        Header {
            from,
            to,
            lineage: Some(Lineage([1; 16])),
        }
    }

    /// The old contents an undo log puts back, applied onto `img`.
    fn undo_onto(l: &Loaded, img: &mut [Vec<u8>]) {
        for e in &l.entries {
            let mut b = vec![0u8; e.len as usize];
            read_entry(&l.file, e, e.offset, e.end(), &mut b).unwrap();
            img[e.disk as usize][e.offset as usize..e.end() as usize].copy_from_slice(&b);
        }
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_log_is_written_reopened_after_a_crash_finished_and_loaded() {
        for root in ["/var/tmp", "/tmp"] {
            let dir = tempfile::tempdir_in(root).unwrap();
            let p = dir.path().join("5.undo");
            let mut log = UndoLog::create(&p, header(5, 4)).unwrap();
            let text: Vec<u8> = b"old contents "
                .iter()
                .cycle()
                .take(65536)
                .copied()
                .collect();
            let rnd = noise(3, 65536);
            log.append(0, 0, 65536, Some(&text)).unwrap();
            log.append(0, 65536, 65536, Some(&rnd)).unwrap();
            log.append(1, 0, 8192, None).unwrap();
            log.append(1, 8192, 4096, Some(&[0u8; 4096])).unwrap();
            let mut applied = RangeSet::new();
            applied.insert(0, 0, 131072);
            log.mark_applied(&applied).unwrap();
            log.sync().unwrap();
            let synced = log.size();
            // Appended after the last sync, then a crash: a torn record.
            log.append(0, 1 << 20, 65536, Some(&rnd)).unwrap();
            log.log.flush().unwrap();
            drop(log);
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(synced + 100).unwrap();
            let (mut log, rec) = UndoLog::open(&p).unwrap();
            assert_eq!(rec.applied, applied);
            assert_eq!(rec.cut, 100);
            assert_eq!(log.entries().len(), 4);
            assert_eq!(log.entries()[0].enc, Enc::Lz4, "{root}");
            assert_eq!(log.entries()[1].enc, Enc::Raw);
            assert_eq!(
                log.entries()[3].enc,
                Enc::Zero,
                "zeroes are stored as a hole"
            );
            assert_eq!(log.coverage().bytes(), 2 * 65536 + 12288);
            log.append(2, 0, 4096, Some(&[7u8; 4096])).unwrap();
            let size = log.finish().unwrap();
            assert_eq!(fs::metadata(&p).unwrap().len(), size);
            let l = Loaded::open(&p).unwrap();
            assert_eq!(l.header, header(5, 4));
            assert_eq!(l.entries.len(), 5);
            let mut img = vec![vec![9u8; 2 << 20]; 3];
            undo_onto(&l, &mut img);
            assert!(img[0][..65536] == text[..] && img[0][65536..131072] == rnd[..]);
            assert!(img[1][..12288].iter().all(|b| *b == 0));
            assert!(img[2][..4096].iter().all(|b| *b == 7));
            // A part of an lz4 entry reads on its own.
            let mut part = vec![0u8; 100];
            read_entry(&l.file, &l.entries[0], 1000, 1100, &mut part).unwrap();
            assert_eq!(part, text[1000..1100]);
            // Reopened to go on (a resumed cycle whose log was finished): the trailer goes.
            let (log, rec) = UndoLog::open(&p).unwrap();
            assert!(rec.cut > 0);
            assert_eq!(log.entries().len(), 5);
            drop(log);
            assert!(
                Loaded::open(&p).is_err(),
                "an unfinished log is not a point"
            );
        }
    }

    /// A flushed log keeps the zero padding of its last block until it is finished; a crash
    /// there (no trim) loses no entry: the reopen cuts the padding, the log goes on, and the
    /// finished log ends at its footer again.
    #[test]
    fn a_crash_with_the_last_blocks_padding_in_the_file_loses_no_entry() {
        for root in ["/var/tmp", "/tmp"] {
            let dir = tempfile::tempdir_in(root).unwrap();
            let p = dir.path().join("6.undo");
            let mut log = UndoLog::create(&p, header(6, 5)).unwrap();
            let rnd = noise(4, 65536);
            log.append(0, 0, 65536, Some(&rnd)).unwrap();
            log.append(0, 65536, 100, Some(&rnd[..100])).unwrap();
            log.sync().unwrap();
            let len = log.size();
            let file = fs::metadata(&p).unwrap().len();
            assert!(file >= len, "{root}");
            // The crash: the writer vanishes without its drop (which trims).
            std::mem::forget(log);
            let (mut log, rec) = UndoLog::open(&p).unwrap();
            assert_eq!(rec.cut, file - len, "{root}: only the padding is cut");
            assert_eq!(fs::metadata(&p).unwrap().len(), len);
            assert_eq!(log.entries().len(), 2);
            log.append(1, 0, 4096, Some(&[5u8; 4096])).unwrap();
            let size = log.finish().unwrap();
            assert_eq!(fs::metadata(&p).unwrap().len(), size, "{root}: not trimmed");
            let l = Loaded::open(&p).unwrap();
            assert_eq!(l.entries.len(), 3);
            let mut img = vec![vec![9u8; 1 << 20]; 2];
            undo_onto(&l, &mut img);
            assert!(img[0][..65536] == rnd[..] && img[0][65536..65636] == rnd[..100]);
            assert!(img[1][..4096].iter().all(|b| *b == 5));
        }
    }

    #[test]
    fn a_damaged_index_falls_back_to_reading_the_log_and_damaged_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("7.undo");
        let mut log = UndoLog::create(&p, header(7, 6)).unwrap();
        for i in 0..20u64 {
            log.append(0, i * 8192, 4096, Some(&noise(i, 4096)))
                .unwrap();
        }
        log.finish().unwrap();
        let good = Loaded::open(&p).unwrap().entries;
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 1; // the footer
        fs::write(&p, &bytes).unwrap();
        assert_eq!(Loaded::open(&p).unwrap().entries, good);
        bytes[HEADER_LEN + 40] ^= 1; // the first entry's payload
        fs::write(&p, &bytes).unwrap();
        let e = Loaded::open(&p).err().unwrap().to_string();
        assert!(e.contains("7.undo"), "{e}");
        let mut bad = fs::read(&p).unwrap();
        bad[0] = b'Z';
        fs::write(&p, &bad).unwrap();
        let e = Loaded::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn merge_keeps_the_older_contents_where_both_cover() {
        let dir = tempfile::tempdir().unwrap();
        let (op, np, mp) = (
            dir.path().join("2.undo"),
            dir.path().join("3.undo"),
            dir.path().join("3-1.undo"),
        );
        let mut o = UndoLog::create(&op, header(2, 1)).unwrap();
        o.append(0, 4096, 4096, Some(&[2u8; 4096])).unwrap();
        o.finish().unwrap();
        let mut n = UndoLog::create(&np, header(3, 2)).unwrap();
        n.append(0, 0, 12288, Some(&[3u8; 12288])).unwrap();
        n.append(1, 0, 8192, None).unwrap();
        n.finish().unwrap();
        let size = merge(
            &Loaded::open(&op).unwrap(),
            &Loaded::open(&np).unwrap(),
            &mp,
        )
        .unwrap();
        let m = Loaded::open(&mp).unwrap();
        assert_eq!(fs::metadata(&mp).unwrap().len(), size);
        assert_eq!((m.header.from, m.header.to), (3, 1));
        let mut img = vec![vec![9u8; 12288], vec![9u8; 8192]];
        undo_onto(&m, &mut img);
        assert_eq!(&img[0][..4096], &[3u8; 4096][..]);
        assert_eq!(&img[0][4096..8192], &[2u8; 4096][..]);
        assert_eq!(&img[0][8192..], &[3u8; 4096][..]);
        assert_eq!(img[1], vec![0u8; 8192]);
        assert!(!mp.with_extension("undo.tmp").exists());
    }

    /// Valid logs of every shape, as the undo fuzz target's seeds (written to the directory
    /// in VMREPLICA_WRITE_FUZZ_SEEDS, if set): finished, cut mid-record, with applied and
    /// reset records, merged.
    #[test]
    fn fuzz_seeds_are_valid_logs() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let mut log = UndoLog::create(&p("finished"), header(3, 2)).unwrap();
        log.append(0, 0, 4096, Some(&noise(1, 4096))).unwrap();
        log.append(0, 8192, 4096, Some(&[7u8; 4096])).unwrap();
        log.append(1, 0, 65536, None).unwrap();
        log.finish().unwrap();
        let mut log = UndoLog::create(&p("receiving"), header(4, 3)).unwrap();
        log.append(0, 0, 4096, Some(&[1u8; 4096])).unwrap();
        let mut a = RangeSet::new();
        a.insert(0, 0, 4096);
        a.insert(1, 1 << 20, 2 << 20);
        log.mark_applied(&a).unwrap();
        log.reset_applied().unwrap();
        log.append(0, 4096, 100, Some(&noise(2, 100))).unwrap();
        log.sync().unwrap();
        drop(log);
        let full = fs::read(p("receiving")).unwrap();
        fs::write(p("torn"), &full[..full.len() - 7]).unwrap();
        merge(
            &Loaded::open(&p("finished")).unwrap(),
            &Loaded::open(&p("finished")).unwrap(),
            &p("merged"),
        )
        .unwrap();
        let names = ["finished", "receiving", "torn", "merged"];
        for n in names {
            let bytes = fs::read(p(n)).unwrap();
            let (_, found, _) = super::super::format::scan(&bytes).unwrap();
            assert!(!found.is_empty(), "{n}");
        }
        if let Ok(out) = std::env::var("VMREPLICA_WRITE_FUZZ_SEEDS") {
            fs::create_dir_all(&out).unwrap();
            for n in names {
                fs::copy(p(n), Path::new(&out).join(n)).unwrap();
            }
        }
    }
}
