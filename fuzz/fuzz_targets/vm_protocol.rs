//! Fuzzes the QMP and guest-agent clients (`vmreplica_vm`) with what the other end sends:
//! QEMU, or a guest agent inside a guest that may be hostile. The input is the peer's output
//! over a socketpair, then end of stream.
//!
//! Checked on every input: no panic, no hang (every call ends in a reply, an error, or the
//! end of the stream), bounded memory (lines are capped).
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmreplica_vm::{GuestAgent, LineConn, Peer, Qmp};

const T: Duration = Duration::from_millis(200);

/// A connection whose peer has sent `bytes` and then stopped writing (it still reads).
fn peer_sent(bytes: &[u8], peer: Peer) -> (LineConn, UnixStream) {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(bytes).unwrap();
    b.shutdown(std::net::Shutdown::Write).unwrap();
    (LineConn::from_stream(a, peer), b)
}

fuzz_target!(|data: &[u8]| {
    // Within the socket buffer, so the write above never blocks.
    let data = &data[..data.len().min(64 << 10)];
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let (c, _b) = peer_sent(rest, Peer::qmp(Path::new("/fuzz/qmp.sock")));
            if let Ok(mut q) = Qmp::handshake(c, T) {
                let _ = q.qemu_version();
                let _ = q.query_status();
                let _ = q.execute("query-block", None);
                let _ = q.wait_event("SHUTDOWN", T);
                let _ = q.take_events(Duration::ZERO);
            }
        }
        1 => {
            let (c, _b) = peer_sent(rest, Peer::agent(Path::new("/fuzz/qga.sock")));
            let _ = GuestAgent::over(c, T).sync();
        }
        _ => {
            let (c, _b) = peer_sent(rest, Peer::agent(Path::new("/fuzz/qga.sock")));
            let mut g = GuestAgent::over(c, T);
            g.assume_synced();
            let _ = g.fsfreeze_status();
            let _ = g.fsfreeze_freeze(T);
            let _ = g.fsfreeze_thaw(T);
            let _ = g.ping();
        }
    }
});
