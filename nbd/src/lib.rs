//! vmreplica's NBD server, apart from anything it serves.
//!
//! Layers, from the wire down:
//! - [`consts`], [`handshake`], [`request`], [`reply`]: the NBD protocol as pure codecs and a
//!   handshake state machine (bytes in, bytes out; no sockets, files or clocks). They follow the
//!   NBD protocol document (doc/proto.md of the NBD project, including the extended-headers
//!   extension) and QEMU's docs/interop/nbd.rst for the `qemu:` namespace.
//! - [`server`]: the thin socket driver (unix and TCP listeners, one reader and one writer
//!   thread per connection, out-of-order replies sent by whichever thread has them when the
//!   socket takes them at once, a byte budget per connection, a bounded number of connections
//!   per export); [`buffers`]: each connection's small pool of write payload buffers;
//!   [`tls`]: NBD_OPT_STARTTLS with rustls, client certificates checked against the CA and an
//!   allow-list.
//! - [`device`]: the [`BlockDevice`] trait a served export implements: size, flags, read,
//!   write, flush, trim, write-zeroes, and block status per metadata context. It knows nothing
//!   of tracking or replication: the tracker's tracked image is one implementation, a
//!   replica's recovery point another.

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod buffers;
pub mod consts;
pub mod device;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod server;
pub mod stream;
pub mod tls;
mod transmission;

pub use device::{BlockDevice, DeviceFlags, Done, Extent, ReadDone};
pub use handshake::{ExportInfo, Handshake, HandshakeError, HandshakeStatus, Negotiated};
pub use reply::{ReplyMode, ReplyWriter};
pub use request::{Command, Request, RequestError, RequestHeader};
pub use server::{Export, Server, ServerConfig};
pub use tls::TlsConfig;
pub use transmission::send_held_replies;
