//! The NBD protocol as pure codecs and a handshake state machine: no sockets in here.
//!
//! Follows the NBD protocol document (doc/proto.md of the NBD project, including the
//! extended-headers extension) and QEMU's docs/interop/nbd.rst for the `qemu:` namespace.
//! The I/O driver in [`crate::server`] feeds bytes in and writes the produced bytes out.

pub mod consts;
pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::{
    ExportInfo, Handshake, HandshakeError, HandshakeStatus, MetaContext, Negotiated,
};
pub use reply::{ReplyMode, ReplyWriter};
pub use request::{Command, Request, RequestError, RequestHeader};
