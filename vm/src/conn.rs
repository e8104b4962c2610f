//! A blocking, deadline-bound line connection over a unix socket: what QMP and the guest
//! agent share. Lines are bounded, so a hostile or broken peer cannot make us allocate
//! without limit; every read and write has a deadline.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::error::Peer;

/// The longest line accepted (QEMU's largest replies, such as `query-qmp-schema`, are a few
/// hundred KiB).
pub const MAX_LINE: usize = 16 << 20;

/// What can go wrong on the wire, before the protocol layer names it.
#[derive(Debug)]
pub enum WireError {
    Timeout,
    Closed,
    TooLong,
    Io(std::io::Error),
}

pub struct LineConn {
    stream: UnixStream,
    buf: Vec<u8>,
    peer: Peer,
    max_line: usize,
}

fn remaining(deadline: Instant) -> Result<Duration, WireError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(WireError::Timeout);
    }
    // set_read_timeout refuses zero; a microsecond left is as good as none.
    Ok((deadline - now).max(Duration::from_millis(1)))
}

impl LineConn {
    pub fn connect(peer: Peer, deadline: Instant) -> Result<LineConn, WireError> {
        remaining(deadline)?;
        let stream = UnixStream::connect(&peer.socket).map_err(WireError::Io)?;
        Ok(Self::from_stream(stream, peer))
    }

    /// Wraps an already connected stream (a socket handed over, or a test's socketpair).
    pub fn from_stream(stream: UnixStream, peer: Peer) -> LineConn {
        LineConn {
            stream,
            buf: Vec::new(),
            peer,
            max_line: MAX_LINE,
        }
    }

    #[cfg(test)]
    pub fn set_max_line(&mut self, n: usize) {
        self.max_line = n;
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Reads more bytes into the buffer; returns how many.
    fn fill(&mut self, deadline: Instant) -> Result<usize, WireError> {
        loop {
            self.stream
                .set_read_timeout(Some(remaining(deadline)?))
                .map_err(WireError::Io)?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue; // remaining() turns an expired deadline into Timeout
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }

    /// The next line, without its `\n` (and `\r`).
    pub fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, WireError> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..scanned + i + 1).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            if scanned > self.max_line {
                return Err(WireError::TooLong);
            }
            self.fill(deadline)?;
        }
    }

    /// Drops everything up to and including the next `byte`.
    pub fn skip_past(&mut self, byte: u8, deadline: Instant) -> Result<(), WireError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == byte) {
                self.buf.drain(..=i);
                return Ok(());
            }
            self.buf.clear();
            self.fill(deadline)?;
        }
    }

    pub fn write_all(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), WireError> {
        let mut done = 0;
        while done < bytes.len() {
            self.stream
                .set_write_timeout(Some(remaining(deadline)?))
                .map_err(WireError::Io)?;
            match self.stream.write(&bytes[done..]) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e)
                    if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) =>
                {
                    return Err(WireError::Closed)
                }
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
    }

    /// Forgets buffered input (after a timeout the stream is out of step).
    pub fn discard_buffered(&mut self) {
        self.buf.clear();
    }
}

/// A line for an error message: lossy UTF-8, at most 200 characters.
pub fn excerpt(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let mut e: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        e.push('…');
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (LineConn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (
            LineConn::from_stream(a, Peer::qmp(std::path::Path::new("/test.sock"))),
            b,
        )
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn splits_lines_across_reads_and_strips_crlf() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"{\"a\":1}\r\n{\"b\"").unwrap();
        assert_eq!(c.read_line(soon(1000)).unwrap(), b"{\"a\":1}");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            peer.write_all(b":2}\n").unwrap();
            peer
        });
        assert_eq!(c.read_line(soon(2000)).unwrap(), b"{\"b\":2}");
        drop(t.join().unwrap());
        assert!(matches!(c.read_line(soon(1000)), Err(WireError::Closed)));
    }

    #[test]
    fn times_out_without_a_newline_and_bounds_line_length() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"no newline").unwrap();
        let t0 = Instant::now();
        assert!(matches!(c.read_line(soon(200)), Err(WireError::Timeout)));
        assert!(t0.elapsed() < Duration::from_secs(2));
        c.set_max_line(1000);
        peer.write_all(&[b'x'; 5000]).unwrap();
        assert!(matches!(c.read_line(soon(1000)), Err(WireError::TooLong)));
    }

    #[test]
    fn skips_to_a_sentinel() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"stale {\"return\": 7}\n\xff{\"return\": 9}\n")
            .unwrap();
        c.skip_past(0xff, soon(1000)).unwrap();
        assert_eq!(c.read_line(soon(1000)).unwrap(), b"{\"return\": 9}");
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"abc"), "abc");
        assert_eq!(excerpt(&[b'y'; 500]).chars().count(), 201);
    }
}
