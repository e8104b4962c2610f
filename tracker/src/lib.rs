//! vmreplica tracker: serves a VM's disks over NBD, writes them through io_uring, and records
//! every changed block in crash-safe, memory-mapped dirty bitmaps that the shipper reads.
//!
//! The NBD protocol and its socket driver live in `vmreplica_nbd`; here:
//! - [`disk`]: one exported image (a `vmreplica_nbd::BlockDevice`), its write path and
//!   block-status queries;
//! - [`tracking`], [`bitmap`], [`activity_log`]: dirty bits, their crash safety, and
//!   copy-on-write of frozen blocks;
//! - [`tracker`]: the set of disks, the state directory, and frozen generations;
//! - [`control`]: the local control socket (freeze, release, merge, status, seal,
//!   mark-dirty, dirty-ranges);
//! - [`failover`]: seal, a failover's baseline, divergent ranges, the last write's time;
//! - [`engine`]: io_uring and thread-pool image I/O (shared with the other roles, from
//!   `vmreplica_common`).

// The docs are built with private items (scripts/test.sh), where links to them resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod activity_log;
pub mod bitmap;
pub mod control;
pub mod cow;
pub mod crashpoint;
pub mod disk;
pub mod epoch;
pub mod failover;
pub mod frozen;
mod gate;
pub mod imagelock;
pub mod tracker;
pub mod tracking;

pub use vmreplica_common::engine;

pub use tracker::{
    CowLimit, Generation, Parent, Tracker, TrackerConfig, TrackerError, DEFAULT_GRANULARITY,
};
