//! Types and formats shared by the vmreplica roles (tracker, shipper, applier).
//!
//! Kept deliberately small: names that cross process and network boundaries, the
//! durable-file helpers every role uses for its state, and the image I/O engine (io_uring,
//! or a thread pool) through which the tracker and the applier write images and the shipper
//! reads them.

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod congestion;
pub mod direct;
pub mod engine;
pub mod iobuf;
pub mod jsonline;
pub mod lineage;
pub mod link;
pub mod name;
pub mod pool;
pub mod ranges;
pub mod ratelog;
pub mod resetkey;
pub mod seed;
pub mod sparse;
pub mod stages;
pub mod statefile;
pub mod tls;
pub mod unixsock;
pub mod wire;

pub use name::{validate_name, NameError, MAX_NAME_LEN};
pub use statefile::{read_state, write_atomic, write_state, StateFileError};
